/* sigframe_avx512.c: a Linux program (build: gcc -static -O1 -mavx512f -o sigframe_avx512
   sigframe_avx512.c) that holds values in ZMM16 and K1, faults (ud2), and whose SIGILL
   handler clobbers both and steps over the ud2: rt_sigreturn must bring them back from
   the signal frame's XSAVE area (its opmask and Hi16_ZMM components), as Linux does. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>
static unsigned long long features;
static void handler(int signo, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    memcpy(&features, (unsigned char *)uc->uc_mcontext.fpregs + 472, 8);
    __asm__ volatile("vpternlogd $0xff, %%zmm16, %%zmm16, %%zmm16\n\tkxnorw %%k1, %%k1, %%k1" ::: "xmm16", "k1");
    uc->uc_mcontext.gregs[REG_RIP] += 2;   /* past the ud2 */
}
int main(void) {
    struct sigaction sa = {0};
    sa.sa_sigaction = handler; sa.sa_flags = SA_SIGINFO;
    sigaction(SIGILL, &sa, NULL);
    unsigned long long value = 0x1122334455667788ULL, out[8];
    unsigned mask;
    __asm__ volatile("vpbroadcastq %2, %%zmm16\n\tmovl $0x5a5a, %%eax\n\tkmovw %%eax, %%k1\n\tud2\n\t"
                     "vmovdqu64 %%zmm16, %0\n\tkmovw %%k1, %1"
                     : "=m"(out), "=r"(mask) : "r"(value) : "xmm16", "k1", "rax", "memory");
    printf("zmm16=%llx,%llx k1=%x xfeatures=%llx\n", out[0], out[7], mask, features);
    return 0;
}
