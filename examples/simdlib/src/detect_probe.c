/* simdlib's detection, done wrong: try each instruction under a #UD handler and trust
 * the result. A CPUID mask does not stop an instruction from executing, so under EVC
 * this finds features the cluster's baseline hides, and the paths it picks crash after
 * a live migration to a host that really lacks them. (It asks CPUID only to report.) */
#include <cpuid.h>
#include "minivmm.h"
#include "simd.h"

void try_popcnt(void);
void try_sse4_1(void);
__asm__(".intel_syntax noprefix\n"
        "try_popcnt: popcnt eax, ebx\n ret\n"
        "try_sse4_1: ptest xmm0, xmm0\n ret\n"
        ".att_syntax prefix\n");

void simd_detect(struct simd_features *out)
{
    unsigned eax, ebx, ecx = 0, edx;
    __get_cpuid(1, &eax, &ebx, &ecx, &edx);
    int popcnt = minivmm_probe(try_popcnt), sse4_1 = minivmm_probe(try_sse4_1);
    out->popcnt = (struct simd_detection){ecx >> 23 & 1, popcnt, popcnt};
    out->sse4_1 = (struct simd_detection){ecx >> 19 & 1, sse4_1, sse4_1};
}
