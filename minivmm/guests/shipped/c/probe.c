/* probe: detection by trial, the way the vendors tell software not to do it. Each
 * feature's instruction runs under a #UD handler and the guest trusts the result. An
 * EVC mask does not stop an instruction from executing, so on a Nehalem in an
 * intel-penryn cluster this guest finds popcnt and sse4_2 that CPUID hides, and the
 * code it chose breaks after a migration to a host that really lacks them. It prints
 * what CPUID says beside each probe, and uses the probe. */
#include <cpuid.h>
#include "minivmm.h"

/* One instruction and a return each: nothing the compiler could reorder around. */
void probe_sse4_1(void);
void probe_sse4_2(void);
void probe_popcnt(void);
void probe_aes(void);
void probe_pclmulqdq(void);
void probe_movbe(void);
void probe_bmi1(void);
__asm__(".intel_syntax noprefix\n"
        "probe_sse4_1: ptest xmm0, xmm0\n ret\n"
        "probe_sse4_2: crc32 eax, ebx\n ret\n"
        "probe_popcnt: popcnt eax, ebx\n ret\n"
        "probe_aes: aesenc xmm0, xmm1\n ret\n"
        "probe_pclmulqdq: pclmulqdq xmm0, xmm1, 0\n ret\n"
        "probe_movbe: movbe eax, dword ptr [rsp]\n ret\n"
        "probe_bmi1: andn eax, ebx, ecx\n ret\n"
        ".att_syntax prefix\n");

struct feature { const char *name; void (*probe)(void); unsigned leaf, reg, bit; };

static int cpuid_bit(unsigned leaf, unsigned reg, unsigned bit)
{
    unsigned r[4];
    if (__get_cpuid_max(0, 0) < leaf)
        return 0;
    __cpuid_count(leaf, 0, r[0], r[1], r[2], r[3]);
    return r[reg] >> bit & 1;
}

int main(void)
{
    /* CPUID bits: Intel SDM Vol. 2A, Table 3-10 and 3-8 (register 1 = EBX, 2 = ECX). */
    static const struct feature features[] = {
        {"sse4_1", probe_sse4_1, 1, 2, 19}, {"sse4_2", probe_sse4_2, 1, 2, 20},
        {"popcnt", probe_popcnt, 1, 2, 23}, {"aes", probe_aes, 1, 2, 25},
        {"pclmulqdq", probe_pclmulqdq, 1, 2, 1}, {"movbe", probe_movbe, 1, 2, 22},
        {"bmi1", probe_bmi1, 7, 1, 3},
    };
    for (unsigned i = 0; i < sizeof features / sizeof features[0]; i++) {
        const struct feature *f = &features[i];
        int found = minivmm_probe(f->probe);
        minivmm_report(f->name, cpuid_bit(f->leaf, f->reg, f->bit), found, found ? f->name : "generic");
    }
    return 0;
}
