/* Tries to switch CPUID faulting off (arch_prctl ARCH_SET_CPUID, 1: CPUID enabled) and
   to read its state (ARCH_GET_CPUID), then reads POPCNT's CPUID bit. Prints
   "get=G set=S errno=E popcnt=P". */
#include <asm/prctl.h>
#include <cpuid.h>
#include <errno.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(void) {
    long get = syscall(SYS_arch_prctl, ARCH_GET_CPUID, 0);
    errno = 0;
    long set = syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    int error = errno;
    unsigned a, b, c, d;
    __get_cpuid(1, &a, &b, &c, &d);
    printf("get=%ld set=%ld errno=%d popcnt=%u\n", get, set, error, (c >> 23) & 1);
    return 0;
}
