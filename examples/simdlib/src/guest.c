/* The test guest: initialise simdlib, report its choices in the SPEC's detection
 * format, then run a long computation through it with a checkpoint a quarter of the
 * way (where a test migrates the VM: the rest outlasts pre-copy) and print the
 * result, the same on every path. */
#include "minivmm.h"
#include "simd.h"

#define STEPS 1200000u

static void report(const char *name, struct simd_detection d)
{
    minivmm_report(name, d.cpuid, d.probe, d.use ? name : "generic");
}

int main(void)
{
    simd_init();
    report("popcnt", simd.popcnt);
    report("sse4_1", simd.sse4_1);
    uint32_t x = 12345, sum = 0;
    for (uint32_t i = 0; i < STEPS; i++) {
        if (i == STEPS / 4)
            minivmm_checkpoint();
        x = simd_mul(x, 1664525u) + 1013904223u;
        sum += simd_popcount(x);
    }
    minivmm_puts("result: 0x");
    minivmm_put_hex32(sum);
    minivmm_putc('\n');
    return 0;
}
