/* minivmm.h: the freestanding runtime of minivmm's C guests (guest ABI v1).
 *
 * crt0.S enters main() in 64-bit long mode with the stack at the top of guest RAM and
 * powers off with main's return value as the exit status. Output goes to the debug
 * console (port 0xE9). Nothing else is there: no libc, no heap, no constructors.
 */
#ifndef MINIVMM_H
#define MINIVMM_H

#include <stdint.h>

/* The frame the CPU pushes for a fault in 64-bit mode (Intel SDM Vol. 3A, 6.14.1);
 * #UD pushes no error code. Writing rip changes where the guest resumes. */
struct minivmm_frame {
    uint64_t rip, cs, rflags, rsp, ss;
};

void minivmm_putc(char c);
void minivmm_puts(const char *s);
void minivmm_put_hex32(uint32_t value);
void minivmm_exit(int status) __attribute__((noreturn));
void minivmm_checkpoint(void);

/* Called on #UD with the fault's frame; NULL (the default) makes #UD fatal, as
 * without an IDT. The handler runs with interrupts off and returns with iretq. */
void minivmm_on_ud(void (*handler)(struct minivmm_frame *frame));

/* Run fn() under a #UD handler: 1 if it ran, 0 if it raised #UD. fn is one feature's
 * instruction and a return, written in asm so the compiler adds nothing around it. */
int minivmm_probe(void (*fn)(void));

/* The SPEC detection line "FEATURE: cpuid=0|1 probe=0|1|- uses=PATH". probe < 0: not probed. */
void minivmm_report(const char *feature, int cpuid, int probe, const char *uses);

int main(void);

#endif
