/* probe_avx2.c: a Linux program (build: gcc -static -O2 -o probe_avx2 probe_avx2.c) that
   detects AVX2 both ways: as the vendors say (CPUID.7:EBX[5], OSXSAVE, AVX, and XGETBV
   showing the OS saves YMM state), and by executing VPADDD ymm under a SIGILL handler
   that leaves with siglongjmp. It then sums a table on the path its probe chose (with
   --cpuid: the path CPUID chose), printing the detection line, a checksum and the path. */
#include <cpuid.h>
#include <immintrin.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

static sigjmp_buf probe_env;
static unsigned table[4096];

static void on_sigill(int signo) {
    (void)signo;
    siglongjmp(probe_env, 1);
}

__attribute__((target("avx2"))) static void touch_avx2(void) {
    __asm__ volatile("vpaddd %%ymm0, %%ymm0, %%ymm0" ::: "xmm0");
}

static int probe_avx2(void) {
    struct sigaction action, previous;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_sigill;
    sigaction(SIGILL, &action, &previous);
    int found = 0;
    if (sigsetjmp(probe_env, 1) == 0) {
        touch_avx2();
        found = 1;
    }
    sigaction(SIGILL, &previous, NULL);
    return found;
}

static int cpuid_avx2(void) {
    unsigned a, b, c, d;
    __get_cpuid(1, &a, &b, &c, &d);
    if (!(c >> 27 & 1) || !(c >> 28 & 1))  /* OSXSAVE and AVX */
        return 0;
    unsigned lo, hi;
    __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 6) != 6)                    /* the OS saves XMM and YMM state */
        return 0;
    __get_cpuid_count(7, 0, &a, &b, &c, &d);
    return b >> 5 & 1;
}

__attribute__((target("avx2"))) static unsigned long sum_avx2(int rounds) {
    __m256i acc = _mm256_setzero_si256();
    for (int r = 0; r < rounds; r++)
        for (int i = 0; i < 4096; i += 8)
            acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(_mm256_loadu_si256((__m256i *)&table[i]),
                                                           _mm256_set1_epi32(r + 1)));
    unsigned out[8];
    _mm256_storeu_si256((__m256i *)out, acc);
    unsigned long sum = 0;
    for (int i = 0; i < 8; i++) sum += out[i];
    return sum;
}

static unsigned long sum_generic(int rounds) {
    unsigned lanes[8] = {0};
    for (int r = 0; r < rounds; r++)
        for (int i = 0; i < 4096; i++) lanes[i % 8] += table[i] * (unsigned)(r + 1);
    unsigned long sum = 0;
    for (int i = 0; i < 8; i++) sum += lanes[i];
    return sum;
}

int main(int argc, char **argv) {
    for (int i = 0; i < 4096; i++) table[i] = i * 2654435761u;
    int cpuid = cpuid_avx2(), probe = probe_avx2();
    int use = argc > 1 && strcmp(argv[1], "--cpuid") == 0 ? cpuid : probe;
    printf("avx2: cpuid=%d probe=%d uses=%s\n", cpuid, probe, use ? "avx2" : "generic");
    fflush(stdout);
    unsigned long sum = use ? sum_avx2(40) : sum_generic(40);
    printf("checksum: %lu\npath: %s\n", sum, use ? "avx2" : "generic");
    return 0;
}
