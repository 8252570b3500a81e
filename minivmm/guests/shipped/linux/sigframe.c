/* sigframe.c: a Linux program (build: gcc -static -O1 -o sigframe sigframe.c) whose
   SIGUSR1 handler reads the signal frame's fpstate as glibc and the kernel define it
   (sw_reserved at byte 464: FP_XSTATE_MAGIC1, sizes, the XCR0 features; MAGIC2 after
   the XSAVE area) and changes the saved XMM0, which rt_sigreturn must restore. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>
static char line[200];
static void handler(int signo, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    unsigned char *fp = (unsigned char *)uc->uc_mcontext.fpregs;
    unsigned magic1, extended, size, magic2 = 0; unsigned long long features;
    memcpy(&magic1, fp + 464, 4); memcpy(&extended, fp + 468, 4); memcpy(&features, fp + 472, 8); memcpy(&size, fp + 480, 4);
    if (magic1 == 0x46505853) memcpy(&magic2, fp + size, 4);
    snprintf(line, sizeof line, "magic1=%x extended=%u xfeatures=%llx xstate_size=%u magic2=%x aligned=%d",
             magic1, extended, features, size, magic2, (int)((unsigned long)fp % 64 == 0));
    uc->uc_mcontext.fpregs->_xmm[0].element[0] = 0x12345678;   /* what rt_sigreturn restores */
}
int main(void) {
    struct sigaction sa = {0};
    sa.sa_sigaction = handler; sa.sa_flags = SA_SIGINFO;
    sigaction(SIGUSR1, &sa, NULL);
    unsigned out;
    __asm__ volatile("movd %0, %%xmm0" ::"r"(7u) : "xmm0");
    raise(SIGUSR1);
    __asm__ volatile("movd %%xmm0, %0" : "=r"(out));
    printf("%s xmm0=%x\n", line, out);
    return 0;
}
