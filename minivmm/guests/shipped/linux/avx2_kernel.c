/* avx2_kernel.c: a Linux program (build: gcc -static -O2 -mavx2 -mfma -mf16c -o avx2_kernel
   avx2_kernel.c) that computes with AVX2, FMA and F16C intrinsics in rounds: gathers,
   lane permutes, variable shifts, fused multiply-adds and half-float conversions, printing
   a checksum after each round (ARG iterations a round, default 20000). A migration or
   snapshot in the middle of a round must carry its vector state (YMM accumulators). */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static int32_t table[1024];

static uint64_t fold(__m256i v) {
    uint64_t out[4];
    _mm256_storeu_si256((__m256i *)out, v);
    return out[0] ^ (out[1] * 3) ^ (out[2] * 5) ^ (out[3] * 7);
}

int main(int argc, char **argv) {
    int iterations = argc > 1 ? atoi(argv[1]) : 20000;  /* per round */
    for (int i = 0; i < 1024; i++) table[i] = i * 2654435761u;
    __m256i acc = _mm256_set1_epi32(1), index = _mm256_setr_epi32(0, 7, 99, 300, 511, 640, 777, 1023);
    __m256 f = _mm256_set1_ps(1.5f);
    for (int round = 0; round < 6; round++) {
        for (int i = 0; i < iterations; i++) {
            __m256i g = _mm256_i32gather_epi32(table, index, 4);
            acc = _mm256_add_epi32(acc, g);
            acc = _mm256_permutevar8x32_epi32(acc, _mm256_setr_epi32(3, 1, 4, 1, 5, 0, 2, 6));
            acc = _mm256_xor_si256(acc, _mm256_sllv_epi32(acc, _mm256_and_si256(g, _mm256_set1_epi32(7))));
            acc = _mm256_permute4x64_epi64(acc, 0x4e);
            index = _mm256_and_si256(_mm256_add_epi32(index, _mm256_srli_epi32(acc, 28)), _mm256_set1_epi32(1023));
            f = _mm256_fmadd_ps(f, _mm256_set1_ps(0.999f), _mm256_cvtepi32_ps(_mm256_srli_epi32(g, 24)));
        }
        __m128i half = _mm256_cvtps_ph(f, 0);
        __m256 back = _mm256_cvtph_ps(half);
        uint64_t sum = fold(acc) ^ fold(_mm256_castps_si256(back));
        printf("round %d: %016llx\n", round, (unsigned long long)sum);
        fflush(stdout);
    }
    return 0;
}
