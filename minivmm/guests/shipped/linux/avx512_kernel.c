/* avx512_kernel.c: a Linux program (build: gcc -static -O2 -mavx512f -mavx512bw
   -mavx512vl -o avx512_kernel avx512_kernel.c) that computes with AVX-512 in rounds:
   masked gathers, masked adds, compares into opmask registers and mask arithmetic, a
   cross-lane permute, ternary logic and byte blends under a 64-bit mask, printing a
   checksum after each round (ARG iterations a round, default 20000). A migration or
   snapshot in the middle of a round must carry ZMM registers and opmask registers. */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static int32_t table[4096];

static uint64_t fold(__m512i v) {
    uint64_t out[8], sum = 0;
    _mm512_storeu_si512(out, v);
    for (int i = 0; i < 8; i++) sum = sum * 31 + out[i];
    return sum;
}

int main(int argc, char **argv) {
    int iterations = argc > 1 ? atoi(argv[1]) : 20000;  /* per round */
    for (int i = 0; i < 4096; i++) table[i] = i * 2654435761u;
    __m512i acc = _mm512_set1_epi32(1);
    __m512i index = _mm512_setr_epi32(0, 7, 99, 300, 511, 640, 777, 1023, 1500, 2047, 2222, 3000, 3333, 3900, 4000, 4095);
    __m512i order = _mm512_setr_epi32(3, 1, 4, 15, 9, 2, 6, 5, 13, 8, 0, 7, 12, 10, 11, 14);
    __mmask16 m = 0x5a5a;
    __mmask64 bytes = 0x0123456789abcdefULL;
    for (int round = 0; round < 6; round++) {
        for (int i = 0; i < iterations; i++) {
            __m512i g = _mm512_mask_i32gather_epi32(acc, m | 1, index, table, 4);
            acc = _mm512_mask_add_epi32(acc, m, acc, g);
            m = _mm512_cmpgt_epi32_mask(g, acc) ^ (__mmask16)(m << 1 | m >> 15);
            acc = _mm512_permutexvar_epi32(order, acc);
            acc = _mm512_ternarylogic_epi32(acc, g, index, 0x96);
            bytes = bytes << 3 | bytes >> 61;
            acc = _mm512_mask_blend_epi8(bytes, acc, _mm512_rol_epi32(g, 7));
            index = _mm512_and_si512(_mm512_add_epi32(index, _mm512_srli_epi32(acc, 27)), _mm512_set1_epi32(4095));
        }
        printf("round %d: %016llx %04x\n", round, (unsigned long long)fold(acc), (unsigned)m);
        fflush(stdout);
    }
    return 0;
}
