/* runtime.c: console, exit, checkpoints and the #UD hook of minivmm's C guests. */
#include "minivmm.h"

extern void minivmm_ud_entry(void);
extern void minivmm_probe_failed(void);
extern int minivmm_probe_call(void (*fn)(void));
extern volatile uint8_t minivmm_probing, minivmm_probe_ud;

static void (*ud_handler)(struct minivmm_frame *);
static uint64_t idt[2 * 16] __attribute__((aligned(16)));   /* vectors 0-15, 16 bytes each */

static inline void outb(uint16_t port, uint8_t value)
{
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

void minivmm_putc(char c) { outb(0xe9, (uint8_t)c); }

void minivmm_puts(const char *s)
{
    while (*s)
        minivmm_putc(*s++);
}

void minivmm_put_hex32(uint32_t value)
{
    for (int shift = 28; shift >= 0; shift -= 4)
        minivmm_putc("0123456789abcdef"[(value >> shift) & 0xf]);
}

void minivmm_exit(int status)
{
    outb(0xf4, (uint8_t)status);
    for (;;)
        __asm__ volatile("hlt");
}

void minivmm_checkpoint(void) { outb(0xf5, 0); }

/* A present 64-bit interrupt gate with the code selector 0x08 (SDM Vol. 3A, 6.14.1). */
static void install_ud_gate(void)
{
    uint64_t handler = (uint64_t)minivmm_ud_entry;
    idt[2 * 6] = (handler & 0xffff) | (0x08ull << 16) | (0x8e00ull << 32) | ((handler >> 16 & 0xffff) << 48);
    idt[2 * 6 + 1] = handler >> 32;
    struct __attribute__((packed)) { uint16_t limit; uint64_t base; } idtr = {sizeof idt - 1, (uint64_t)idt};
    __asm__ volatile("lidt %0" : : "m"(idtr));
}

/* An empty IDT: a #UD is fatal again, as it is before any handler is set. */
static void remove_idt(void)
{
    struct __attribute__((packed)) { uint16_t limit; uint64_t base; } idtr = {0, 0};
    __asm__ volatile("lidt %0" : : "m"(idtr));
}

void minivmm_on_ud(void (*handler)(struct minivmm_frame *))
{
    ud_handler = handler;
    if (handler)
        install_ud_gate();
    else
        remove_idt();
}

int minivmm_probe(void (*fn)(void))
{
    install_ud_gate();
    int ran = minivmm_probe_call(fn);
    if (!ud_handler)
        remove_idt();
    return ran;
}

/* Called by the gate: a probe's #UD resumes at minivmm_probe_failed. */
void minivmm_ud_dispatch(struct minivmm_frame *frame)
{
    if (minivmm_probing) {
        minivmm_probe_ud = 1;
        frame->rip = (uint64_t)minivmm_probe_failed;
    } else if (ud_handler) {
        ud_handler(frame);
    }
}

void minivmm_report(const char *feature, int cpuid, int probe, const char *uses)
{
    minivmm_puts(feature);
    minivmm_puts(": cpuid=");
    minivmm_putc(cpuid ? '1' : '0');
    minivmm_puts(" probe=");
    minivmm_putc(probe < 0 ? '-' : probe ? '1' : '0');
    minivmm_puts(" uses=");
    minivmm_puts(uses);
    minivmm_putc('\n');
}
