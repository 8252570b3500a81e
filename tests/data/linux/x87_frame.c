/* x87_frame.c: the x87 registers in a signal frame, as the handler reads and changes
   them (build: gcc -static -O1; run: x87_frame). FXSAVE's image holds ST(0)..ST(7) in
   stack order and the abridged tag word by physical register; the program starts with
   every register empty. Natively and under minivmm the output is the same. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static void on_usr1(int signo, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    struct _libc_fpstate *fp = uc->uc_mcontext.fpregs;
    for (int i = 0; i < 3; i++) {
        unsigned long long significand;
        memcpy(&significand, fp->_st[i].significand, 8);
        printf("st%d %04x %016llx\n", i, fp->_st[i].exponent, significand);
    }
    printf("fsw %#x ftw %#x\n", fp->swd, fp->ftw);
    memset(fp->_st[0].significand, 0, 8);                 /* ST(0) becomes 2.0 */
    fp->_st[0].significand[3] = 0x8000;
    fp->_st[0].exponent = 0x4000;
}

int main(void) {
    struct sigaction usr1 = {.sa_sigaction = on_usr1, .sa_flags = SA_SIGINFO};
    long double top, next;
    unsigned short tags;
    setvbuf(stdout, NULL, _IONBF, 0);
    sigaction(SIGUSR1, &usr1, NULL);
    __asm__ volatile("fnstenv -28(%%rsp)\n\tmov -20(%%rsp), %%ax\n\tmov %%ax, %0" : "=m"(tags) : : "rax", "memory");
    printf("tags at start %#x\n", tags);
    __asm__ volatile("fld1\n\tfldpi\n\tsyscall\n\tfstpt %0\n\tfstpt %1" : "=m"(top), "=m"(next)
                     : "a"(SYS_tgkill), "D"(getpid()), "S"(getpid()), "d"(SIGUSR1) : "rcx", "r11", "memory");
    printf("after the handler: %Lg %Lg\n", top, next);
    return 0;
}
