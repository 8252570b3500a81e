/* detect_both.c: a Linux program (build: gcc -static -O1 -o detect_both detect_both.c)
   that detects sse4_1, sse4_2, popcnt and avx2 both ways, as the guest detect_both does:
   by asking CPUID, and by executing one instruction of each (PTEST, CRC32, POPCNT,
   VPADDD ymm) under a SIGILL handler that leaves with siglongjmp. One detection line
   each (docs/abi.md): a mask or EVC mode changes the cpuid column, never the probe. */
#include <cpuid.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

static sigjmp_buf probe_env;

static void on_sigill(int signo) {
    (void)signo;
    siglongjmp(probe_env, 1);
}

static int probe(int which) {
    struct sigaction action, previous;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_sigill;
    sigaction(SIGILL, &action, &previous);
    int found = 0;
    if (sigsetjmp(probe_env, 1) == 0) {
        unsigned long in = 0xff, out = 0;
        switch (which) {
        case 0: __asm__ volatile("pxor %%xmm0, %%xmm0\n\tptest %%xmm0, %%xmm0" ::: "xmm0", "cc"); break;
        case 1: __asm__ volatile("crc32q %1, %0" : "+r"(out) : "r"(in)); break;
        case 2: __asm__ volatile("popcnt %1, %0" : "=r"(out) : "r"(in)); break;
        case 3: __asm__ volatile("vpaddd %%ymm0, %%ymm0, %%ymm0\n\tvzeroupper" ::: "xmm0"); break;
        }
        found = 1;
    }
    sigaction(SIGILL, &previous, NULL);
    return found;
}

int main(void) {
    static const char *names[] = {"sse4_1", "sse4_2", "popcnt", "avx2"};
    unsigned a, b, c, d, b7 = 0;
    __get_cpuid(1, &a, &b, &c, &d);
    if (__get_cpuid_max(0, NULL) >= 7) __cpuid_count(7, 0, a, b7, a, a);
    int cpuid[] = {(c >> 19) & 1, (c >> 20) & 1, (c >> 23) & 1, (b7 >> 5) & 1};
    for (int i = 0; i < 4; i++) {
        int found = probe(i);
        printf("%s: cpuid=%d probe=%d uses=%s\n", names[i], cpuid[i], found, found ? names[i] : "generic");
    }
    return 0;
}
