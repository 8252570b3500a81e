/* probe_popcnt.c: a Linux program (build: gcc -static -O1 -o probe_popcnt probe_popcnt.c)
   that detects POPCNT both ways: CPUID.1:ECX[23], and by executing it under a SIGILL
   handler that leaves with siglongjmp. It then sums population counts in a long loop
   on the path its probe chose, printing the detection line, a checksum and the path. */
#include <cpuid.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

static sigjmp_buf probe_env;

static void on_sigill(int signo) {
    (void)signo;
    siglongjmp(probe_env, 1);
}

static int probe_popcnt(void) {
    struct sigaction action, previous;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_sigill;
    sigaction(SIGILL, &action, &previous);
    int found = 0;
    if (sigsetjmp(probe_env, 1) == 0) {
        unsigned long out, in = 0xff;
        __asm__ volatile("popcnt %1, %0" : "=r"(out) : "r"(in));
        found = out == 8;
    }
    sigaction(SIGILL, &previous, NULL);
    return found;
}

int main(int argc, char **argv) {
    unsigned a, b, c, d;
    __get_cpuid(1, &a, &b, &c, &d);
    int cpuid = (c >> 23) & 1, probe = probe_popcnt();
    int use = argc > 1 && strcmp(argv[1], "--cpuid") == 0 ? cpuid : probe;
    printf("popcnt: cpuid=%d probe=%d uses=%s\n", cpuid, probe, use ? "popcnt" : "generic");
    fflush(stdout);
    unsigned long sum = 0, x = 0x9e3779b97f4a7c15ul;
    for (long i = 0; i < 2000000; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        unsigned long bits;
        if (use) __asm__("popcnt %1, %0" : "=r"(bits) : "r"(x));
        else bits = (unsigned long)__builtin_popcountl(x);
        sum += bits;
    }
    printf("checksum: %lu\npath: %s\n", sum, use ? "popcnt" : "generic");
    return 0;
}
