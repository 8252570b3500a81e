/* refusals.c: what Linux refuses a program, as the program sees it (build: gcc -static
   -O1 -o refusals refusals.c; run: refusals MODE [handle]). In the frame modes a SIGUSR1
   handler breaks its own signal frame one way and returns through rt_sigreturn; the
   other modes execute what only CPL 0 may, or need a signal frame that cannot be
   written. With "handle", a SIGSEGV handler (on an alternate stack) prints what it got
   and leaves by siglongjmp; without it SIGSEGV kills. Run natively and under minivmm,
   the output and the exit status are the same. */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static sigjmp_buf back;
static const char *mode;
static int raw_gp;               /* the SIGSEGV is a #GP the program's own instruction raised */

static int is(const char *name) { return strcmp(mode, name) == 0; }

static int ring0(void) {
    static const char *const names[] = {"rdmsr", "wrmsr", "movcr4", "movcr0", "rdpmc", "hlt", "cli", "out"};
    for (unsigned i = 0; i < sizeof names / sizeof *names; i++)
        if (is(names[i])) return 1;
    return 0;
}

static void on_segv(int signo, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *regs = uc->uc_mcontext.gregs;
    printf("SIGSEGV code=%d", info->si_code);
    if (raw_gp || is("cs") || is("ss") || is("rip"))   /* a #GP: its trap number, error code, CS */
        printf(" trapno=%lld err=%#llx cs=%#llx", regs[REG_TRAPNO], regs[REG_ERR], regs[REG_CSGSFS] & 0xffff);
    printf("\n");
    siglongjmp(back, 1);
}

static void break_frame(int signo, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *regs = uc->uc_mcontext.gregs;
    unsigned char *fp = (unsigned char *)uc->uc_mcontext.fpregs;
    unsigned long long word;
    if (is("cs")) regs[REG_CSGSFS] = (regs[REG_CSGSFS] & ~0xffffll) | 0x10;              /* the kernel's CS */
    if (is("ss") || is("ss-lenient")) regs[REG_CSGSFS] = (regs[REG_CSGSFS] & 0xffffffffffffll) | 0x18ll << 48;
    if (is("ss-lenient")) uc->uc_flags &= ~0x4ul;                                        /* UC_STRICT_RESTORE_SS */
    if (is("rip")) regs[REG_RIP] = (greg_t)0x8000000000000000ull;
    if (is("eflags")) regs[REG_EFL] = (regs[REG_EFL] | 0x3000) & ~0x200;                 /* IOPL 3, IF clear */
    if (is("mxcsr")) uc->uc_mcontext.fpregs->mxcsr |= 1u << 20;
    if (is("magic")) {                                   /* no FP_XSTATE_MAGIC1: the legacy state alone */
        memset(fp + 464, 0, 4);
        uc->uc_mcontext.fpregs->_xmm[0].element[0] = 0x12345678;
    }
    if (is("xcomp") || is("xstate-bv") || is("reserved")) {
        int at = is("xcomp") ? 520 : is("xstate-bv") ? 512 : 552;   /* XCOMP_BV, XSTATE_BV, reserved bytes */
        memcpy(&word, fp + at, 8);
        word |= is("xstate-bv") ? 1ull << 62 : 1;
        memcpy(fp + at, &word, 8);
    }
    if (is("fpnull")) uc->uc_mcontext.fpregs = NULL;     /* the initial FPU state */
    if (is("nested")) raise(SIGUSR1);                    /* SA_NODEFER: deeper on the alternate stack */
}

static void privileged(void) {
    unsigned long value = 0x1000;
    unsigned lo, hi;
    raw_gp = 1;
    if (is("rdmsr")) __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(0xc0000101));
    if (is("wrmsr")) __asm__ volatile("wrmsr" ::"a"(0x1000), "d"(0), "c"(0xc0000101));   /* GS base */
    if (is("movcr4")) __asm__ volatile("mov %0, %%cr4" ::"r"(value));
    if (is("movcr0")) __asm__ volatile("mov %%cr0, %0" : "=r"(value));
    if (is("rdpmc")) __asm__ volatile("rdpmc" : "=a"(lo), "=d"(hi) : "c"(0));
    if (is("hlt")) __asm__ volatile("hlt");
    if (is("cli")) __asm__ volatile("cli");
    if (is("out")) __asm__ volatile("outb %%al, $0xf4" ::"a"(3));   /* minivmm's power-off port */
    syscall(SYS_arch_prctl, ARCH_GET_GS, &value);
    printf("ran %s: GS base %#lx\n", mode, value);
}

static void *region(int prot) {
    return mmap(NULL, 1 << 16, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
}

int main(int argc, char **argv) {
    struct sigaction usr1 = {0}, segv = {0};
    stack_t alternate = {.ss_sp = region(PROT_READ | PROT_WRITE), .ss_size = 1 << 16};
    unsigned xmm0, mxcsr = 0x9f80;
    unsigned long flags;
    setvbuf(stdout, NULL, _IONBF, 0);
    mode = argc > 1 ? argv[1] : "";
    if (argc > 2) {
        sigaltstack(&alternate, NULL);
        segv.sa_sigaction = on_segv;
        segv.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
        sigaction(SIGSEGV, &segv, NULL);
    }
    if (sigsetjmp(back, 1)) {
        printf("recovered\n");
        return 0;
    }
    if (ring0()) {
        privileged();
        return 0;
    }
    usr1.sa_sigaction = break_frame;
    usr1.sa_flags = SA_SIGINFO;
    if (is("read-only") || is("nested")) {   /* the handler's frame on an alternate stack */
        alternate.ss_sp = region(is("read-only") ? PROT_READ : PROT_READ | PROT_WRITE);
        sigaltstack(&alternate, NULL);
        usr1.sa_flags |= SA_ONSTACK | SA_NODEFER;
    }
    sigaction(SIGUSR1, &usr1, NULL);
    if (is("unmapped") || is("unmapped-ud")) {   /* SIGUSR1, or SIGILL from UD2, with RSP pointing at nothing */
        char *gone = (char *)region(PROT_READ | PROT_WRITE) + 4096;
        munmap(gone - 4096, 1 << 16);
        sigaction(SIGILL, &usr1, NULL);
        if (is("unmapped"))
            __asm__ volatile("mov %%rsp, %%r12\n\tmov %[gone], %%rsp\n\tsyscall\n\tmov %%r12, %%rsp"
                             : : "a"(SYS_tgkill), "D"(getpid()), "S"(gettid()), "d"(SIGUSR1), [gone] "r"(gone)
                             : "r12", "rcx", "r11", "memory");
        else
            __asm__ volatile("mov %%rsp, %%r12\n\tmov %[gone], %%rsp\n\tud2\n\tmov %%r12, %%rsp"
                             : : [gone] "r"(gone) : "r12", "memory");
        printf("returned\n");
        return 0;
    }
    __asm__ volatile("movd %0, %%xmm0\n\tldmxcsr %1" ::"r"(7u), "m"(mxcsr) : "xmm0");
    raise(SIGUSR1);
    __asm__ volatile("movd %%xmm0, %0\n\tstmxcsr %1\n\tpushfq\n\tpopq %2" : "=r"(xmm0), "=m"(mxcsr), "=r"(flags));
    printf("survived %s: xmm0 %#x mxcsr %#x iopl %lu if %lu\n", mode, xmm0, mxcsr, flags >> 12 & 3, flags >> 9 & 1);
    return 0;
}
