/* threads_checksum.c: a Linux program (build: gcc -static -O1 -pthread -o threads_checksum
   threads_checksum.c) of four threads that each read CPUID and sum a buffer of their own
   on the path it chose: AVX2 (VPADDQ on YMM registers) where CPUID reports AVX2 and the
   OS enabled YMM state (OSXSAVE and XGETBV), else plain C. They sleep a little between
   rounds, so that system calls fall throughout their work. The main thread prints each
   thread's path and checksum, in order, once all have ended: the same on every CPU.
   With --probe the threads skip CPUID and use AVX2 regardless, as a #UD-guided detection
   that found AVX2 on the first host would. */
#include <cpuid.h>
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define WORDS 4096
#define ROUNDS 40

struct job { int id; int avx2; uint64_t sum; uint64_t data[WORDS] __attribute__((aligned(32))); };
static int probe;

static int has_avx2(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27)) || __get_cpuid_max(0, 0) < 7) return 0;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 6) != 6) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b >> 5) & 1;
}

__attribute__((target("avx2"))) static uint64_t sum_avx2(const uint64_t *data) {
    __m256i acc = _mm256_setzero_si256();
    for (int i = 0; i < WORDS; i += 4)
        acc = _mm256_add_epi64(acc, _mm256_load_si256((const __m256i *)(data + i)));
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, acc);
    return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

static uint64_t sum_plain(const uint64_t *data) {
    uint64_t lanes[4] = {0, 0, 0, 0};
    for (int i = 0; i < WORDS; i += 4)
        for (int k = 0; k < 4; k++) lanes[k] += data[i + k];
    return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

static void *work(void *arg) {
    struct job *job = arg;
    job->avx2 = probe || has_avx2();
    uint64_t x = 0x9E3779B97F4A7C15ull * (job->id + 1), sum = 0;
    for (int round = 0; round < ROUNDS; round++) {
        for (int i = 0; i < WORDS; i++) job->data[i] = x = x * 6364136223846793005ull + 1442695040888963407ull;
        sum = sum * 31 + (job->avx2 ? sum_avx2(job->data) : sum_plain(job->data));
        struct timespec pause = {0, 1000};
        nanosleep(&pause, NULL);
    }
    job->sum = sum;
    return NULL;
}

int main(int argc, char **argv) {
    probe = argc > 1 && !strcmp(argv[1], "--probe");
    static struct job jobs[4];
    pthread_t threads[4];
    for (int i = 0; i < 4; i++) {
        jobs[i].id = i;
        pthread_create(&threads[i], NULL, work, &jobs[i]);
    }
    for (int i = 0; i < 4; i++) pthread_join(threads[i], NULL);
    for (int i = 0; i < 4; i++)
        printf("thread %d: path=%s checksum=%016llx\n", i, jobs[i].avx2 ? "avx2" : "plain",
               (unsigned long long)jobs[i].sum);
    return 0;
}
