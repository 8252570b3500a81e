/* probe_prefetchw.c: a Linux program (build: gcc -static -O1 -o probe_prefetchw probe_prefetchw.c)
   that detects PREFETCHW both ways: CPUID.80000001H:ECX[8] (PRFCHW, Linux's 3dnowprefetch),
   and by executing it under a SIGILL handler that leaves with siglongjmp. Intel CPUs
   before Broadwell execute it without ever reporting it: the probe finds a feature
   CPUID never named. */
#include <cpuid.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

static sigjmp_buf probe_env;
static char line[64];

static void on_sigill(int signo) {
    (void)signo;
    siglongjmp(probe_env, 1);
}

static int probe_prefetchw(void) {
    struct sigaction action, previous;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_sigill;
    sigaction(SIGILL, &action, &previous);
    int found = 0;
    if (sigsetjmp(probe_env, 1) == 0) {
        __asm__ volatile("prefetchw %0" : : "m"(line[0]));
        found = 1;
    }
    sigaction(SIGILL, &previous, NULL);
    return found;
}

int main(void) {
    unsigned a, b, c = 0, d;
    int cpuid = __get_cpuid(0x80000001, &a, &b, &c, &d) && (c >> 8 & 1);
    printf("prefetchw: cpuid=%d probe=%d\n", cpuid, probe_prefetchw());
    return 0;
}
