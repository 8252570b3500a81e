/* ports.c: port I/O at CPL 3 with IOPL 0 is #GP (SIGSEGV) for IN, OUT, INS and OUTS
   (SDM Vol. 1, 19.5.1); a handler reports each and skips it. The code that follows holds
   bytes that could each start an IN or an FUCOMI, inside the immediates of MOVs that run. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>

static volatile int length;

static void on_segv(int signo, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    printf("SIGSEGV code=%d trapno=%lld err=%lld\n", info->si_code, (long long)uc->uc_mcontext.gregs[REG_TRAPNO],
           (long long)uc->uc_mcontext.gregs[REG_ERR]);
    uc->uc_mcontext.gregs[REG_RIP] += length;
}

int main(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &action, NULL);
    static char buffer[16] = "untouched";
    unsigned long rax = 0x1122334455667788ul, rdi = (unsigned long)buffer, rsi = (unsigned long)buffer, rcx = 3;
    length = 2; __asm__ volatile("outb %%al, $0x80" : : "a"(rax));
    length = 1; __asm__ volatile("inl %%dx, %%eax" : "+a"(rax) : "d"(0x80));
    printf("in: rax=%lx\n", rax);
    length = 2; __asm__ volatile("rep insb" : "+D"(rdi), "+c"(rcx) : "d"(0x80) : "memory");
    printf("ins: rdi moved %ld, rcx=%lu, buffer=%s\n", (long)(rdi - (unsigned long)buffer), rcx, buffer);
    length = 2; __asm__ volatile("rep outsb" : "+S"(rsi), "+c"(rcx) : "d"(0x80) : "memory");
    printf("outs: rsi moved %ld, rcx=%lu\n", (long)(rsi - (unsigned long)buffer), rcx);
#ifndef WITHOUT_IMMEDIATES
    __asm__ volatile(".rept 800\n\tmovl $0xecececec, %%eax\n\tmovl $0xdbe8dbe8, %%eax\n\t.endr" : : : "eax");
#endif
    puts("done");
    return 0;
}
