/* detect.c: a Linux program (build: gcc -static -O1 -o detect detect.c, or musl-gcc) that prints, for
   sse4_1, sse4_2, popcnt and avx2, what libgcc (__builtin_cpu_supports), glibc
   (CPU_FEATURE_ACTIVE, <sys/platform/x86.h>) and /proc/cpuinfo say. Under minivmm all
   three follow the VM's CPUID view: run it with --host penryn, or --evc intel-penryn. */
#include <stdio.h>
#include <string.h>
#ifdef __GLIBC__
#include <sys/platform/x86.h>
#define GLIBC_ACTIVE(f) (CPU_FEATURE_ACTIVE(f) != 0)
#else
#define GLIBC_ACTIVE(f) (-1) /* musl has no such interface */
#endif

static int cpuinfo_has(const char *flag) {
    char line[8192];
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return -1;
    int found = 0;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "flags", 5) == 0) {
            char *p = strchr(line, ':');
            for (char *t = strtok(p + 1, " \n"); t; t = strtok(NULL, " \n"))
                if (strcmp(t, flag) == 0) found = 1;
        }
    }
    fclose(f);
    return found;
}

int main(void) {
    printf("sse4_1 libgcc=%d glibc=%d cpuinfo=%d\n", __builtin_cpu_supports("sse4.1") != 0,
           GLIBC_ACTIVE(SSE4_1), cpuinfo_has("sse4_1"));
    printf("sse4_2 libgcc=%d glibc=%d cpuinfo=%d\n", __builtin_cpu_supports("sse4.2") != 0,
           GLIBC_ACTIVE(SSE4_2), cpuinfo_has("sse4_2"));
    printf("popcnt libgcc=%d glibc=%d cpuinfo=%d\n", __builtin_cpu_supports("popcnt") != 0,
           GLIBC_ACTIVE(POPCNT), cpuinfo_has("popcnt"));
    printf("avx2 libgcc=%d glibc=%d cpuinfo=%d\n", __builtin_cpu_supports("avx2") != 0,
           GLIBC_ACTIVE(AVX2), cpuinfo_has("avx2"));
    return 0;
}
