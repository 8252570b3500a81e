/* simdlib's operations and their dispatch. */
#include "simd.h"

struct simd_features simd;
uint32_t (*simd_popcount)(uint32_t x);
uint32_t (*simd_mul)(uint32_t a, uint32_t b);

__attribute__((target("popcnt"))) static uint32_t popcount_popcnt(uint32_t x)
{
    return (uint32_t)__builtin_popcount(x);   /* compiles to POPCNT */
}

static uint32_t popcount_swar(uint32_t x)
{
    x = x - ((x >> 1) & 0x55555555u);
    x = (x & 0x33333333u) + ((x >> 2) & 0x33333333u);
    return (((x + (x >> 4)) & 0x0f0f0f0fu) * 0x01010101u) >> 24;
}

static uint32_t mul_sse4_1(uint32_t a, uint32_t b)
{
    uint32_t out;
    __asm__("movd %1, %%xmm0\n\t"
            "movd %2, %%xmm1\n\t"
            "pmulld %%xmm1, %%xmm0\n\t"    /* SSE4.1 */
            "pextrd $0, %%xmm0, %0"        /* SSE4.1 */
            : "=r"(out) : "r"(a), "r"(b) : "xmm0", "xmm1");
    return out;
}

static uint32_t mul_generic(uint32_t a, uint32_t b)
{
    return a * b;
}

void simd_init(void)
{
    simd_detect(&simd);
    simd_popcount = simd.popcnt.use ? popcount_popcnt : popcount_swar;
    simd_mul = simd.sse4_1.use ? mul_sse4_1 : mul_generic;
}
