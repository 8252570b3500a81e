/* simdlib: a tiny library that picks its code paths from the CPU's features.
 *
 * simd_init() detects once (detect_cpuid.c asks CPUID, as the vendors require;
 * detect_probe.c tries instructions under a #UD handler, the broken way) and points
 * each operation at the best path the CPU allows. */
#ifndef SIMD_H
#define SIMD_H

#include <stdint.h>

struct simd_detection {
    int cpuid;      /* what CPUID reports: 0 or 1 */
    int probe;      /* what executing the instruction found: 0, 1, or -1 when not probed */
    int use;        /* the decision */
};

struct simd_features {
    struct simd_detection popcnt, sse4_1;
};

void simd_detect(struct simd_features *out);    /* one of detect_*.c */

void simd_init(void);
extern struct simd_features simd;
extern uint32_t (*simd_popcount)(uint32_t x);   /* POPCNT or a SWAR count */
extern uint32_t (*simd_mul)(uint32_t a, uint32_t b);  /* SSE4.1 PMULLD or IMUL */

#endif
