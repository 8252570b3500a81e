/* builtin_cpu: detection by the book, with GCC's own code. __builtin_cpu_supports reads
 * the table libgcc's __cpu_indicator_init fills from CPUID (and XGETBV for AVX), the
 * detection most C programs use through function multiversioning and ifuncs. It asks
 * CPUID only, so under an EVC mask it sees the cluster's baseline, not the host: its
 * choices stay valid after any migration inside the cluster. It prints one SPEC line
 * per feature and takes the path CPUID allows. */
#include "minivmm.h"

struct feature { const char *name; int supported; };

int main(void)
{
    __builtin_cpu_init();   /* no constructors run in a freestanding guest */
    struct feature features[] = {
        {"sse4_1", __builtin_cpu_supports("sse4.1")},
        {"sse4_2", __builtin_cpu_supports("sse4.2")},
        {"popcnt", __builtin_cpu_supports("popcnt")},
        {"aes", __builtin_cpu_supports("aes")},
        {"pclmulqdq", __builtin_cpu_supports("pclmul")},
        {"movbe", __builtin_cpu_supports("movbe")},
        {"bmi1", __builtin_cpu_supports("bmi")},
        {"avx", __builtin_cpu_supports("avx")},
        {"avx2", __builtin_cpu_supports("avx2")},
    };
    for (unsigned i = 0; i < sizeof features / sizeof features[0]; i++)
        minivmm_report(features[i].name, features[i].supported, -1,
                       features[i].supported ? features[i].name : "generic");
    return 0;
}
