/* simdlib's detection, done right: ask CPUID (Intel SDM Vol. 2A, CPUID.01H:ECX
 * POPCNT[bit 23], SSE4_1[bit 19]). Under EVC this sees the cluster's baseline, so the
 * paths it picks run on every host the VM can migrate to. */
#include <cpuid.h>
#include "simd.h"

void simd_detect(struct simd_features *out)
{
    unsigned eax, ebx, ecx = 0, edx;
    __get_cpuid(1, &eax, &ebx, &ecx, &edx);
    out->popcnt = (struct simd_detection){ecx >> 23 & 1, -1, ecx >> 23 & 1};
    out->sse4_1 = (struct simd_detection){ecx >> 19 & 1, -1, ecx >> 19 & 1};
}
