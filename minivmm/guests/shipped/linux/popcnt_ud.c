/* popcnt_ud.c: a Linux program (build: gcc -static -O1 -o popcnt_ud popcnt_ud.c) that
   executes POPCNT without asking CPUID. On a host without POPCNT the CPU raises #UD and
   Linux sends SIGILL: the program dies with status 132. */
#include <stdio.h>

int main(int argc, char **argv) {
    unsigned long value = (unsigned long)argc * 0x0101010101010101ul, count;
    __asm__ volatile("popcnt %1, %0" : "=r"(count) : "r"(value));
    printf("popcnt(%#lx) = %lu\n", value, count);
    return 0;
}
