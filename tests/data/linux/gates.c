/* gates.c: software interrupts and fast system calls a 64-bit program may try, as the
   kernel answers them (build: gcc -static -O1; run: gates). INT n through gates only
   the kernel may use is #GP(n*8+2) at the instruction; INT3, INT $3 and INT $4 trap
   after it; INT $0x80 is the 32-bit system call; SYSENTER is Intel's 32-bit fast call
   (#UD on AMD in 64-bit mode); SYSCALL works whatever RSP holds. Natively and under
   minivmm (on a host of the machine's vendor) the output is the same. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>
#include <unistd.h>

static sigjmp_buf back;
static unsigned long at, after, stashed = 0x12345678;
static greg_t seen[NGREG];
static int seen_signal, seen_code;
static void *seen_addr;

static void on_signal(int signo, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    memcpy(seen, uc->uc_mcontext.gregs, sizeof seen);
    seen_signal = signo;
    seen_code = info->si_code;
    seen_addr = info->si_addr;
    siglongjmp(back, 1);
}

static void report(const char *what) {
    printf("%s: signal %d code %d trapno %lld err %#llx cs %#llx rip %s\n", what, seen_signal, seen_code,
           seen[REG_TRAPNO], seen[REG_ERR], seen[REG_CSGSFS] & 0xffff,
           (unsigned long)seen[REG_RIP] == at ? "at it" : (unsigned long)seen[REG_RIP] == after ? "after it" : "elsewhere");
}

/* One INT n (CD ib), its address and the next one's noted. */
#define INT(n) do {                                                                                             \
        if (!sigsetjmp(back, 1))                                                                                \
            __asm__ volatile("lea 1f(%%rip), %%rax\n\tmov %%rax, %0\n\tlea 2f(%%rip), %%rax\n\tmov %%rax, %1\n\t"  \
                             "1: int $" #n "\n\t2:" : "=m"(at), "=m"(after) : : "rax", "memory");               \
        report("int $" #n);                                                                                     \
    } while (0)

int main(void) {
    static char stack[1 << 16];
    stack_t alternate = {.ss_sp = stack, .ss_size = sizeof stack};
    struct sigaction action = {0};
    setvbuf(stdout, NULL, _IONBF, 0);
    sigaltstack(&alternate, NULL);
    action.sa_sigaction = on_signal;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    for (int s = 1; s < 32; s++)
        sigaction(s, &action, NULL);
    INT(0); INT(1); INT(2); INT(3); INT(4); INT(5); INT(6); INT(13); INT(14); INT(32); INT(0x81); INT(255);
    if (!sigsetjmp(back, 1))
        __asm__ volatile("lea 1f(%%rip), %%rax\n\tmov %%rax, %0\n\tlea 2f(%%rip), %%rax\n\tmov %%rax, %1\n\t"
                         "1: int3\n\t2:" : "=m"(at), "=m"(after) : : "rax", "memory");
    report("int3");

    /* INT $0x80: the 32-bit calls, numbers in EAX, arguments in EBX ECX EDX ... */
    static const char hello[] = "hello from int $0x80\n";
    long result;
    __asm__ volatile("int $0x80" : "=a"(result) : "a"(4), "b"(1), "c"(hello), "d"(sizeof hello - 1) : "memory");
    printf("write: %ld\n", result);
    __asm__ volatile("int $0x80" : "=a"(result) : "a"(0x100000014) : "memory");    /* getpid; EAX's upper half ignored */
    printf("getpid: %d\n", result == getpid());
    __asm__ volatile("int $0x80" : "=a"(result) : "a"(20000) : "memory");
    printf("unknown: %ld\n", result);
    __asm__ volatile("int $0x80" : "=a"(result) : "a"(45), "b"(0) : "memory");      /* brk(0): the break */
    printf("brk: %d\n", result == (long)sbrk(0));

    /* SYSENTER with RBP, where the vDSO keeps the 32-bit stack pointer, at a readable
       word (the sixth argument) or at nothing: the call runs (or is -EFAULT), and its
       return to 32-bit code faults at the vDSO's landing pad */
    unsigned long r8 = 8, r9 = 9, r10 = 10;
    for (int readable = 1; readable >= 0; readable--) {
        seen_signal = 0;
        if (!sigsetjmp(back, 1)) {
            register unsigned long rr8 __asm__("r8") = r8, rr9 __asm__("r9") = r9, rr10 __asm__("r10") = r10;
            __asm__ volatile("push %%rbp\n\tmov %[sp], %%rbp\n\tlea 1f(%%rip), %%rax\n\tmov %%rax, %[at]\n\t"
                             "mov $20, %%eax\n\t1: sysenter\n\tpop %%rbp"
                             : [at] "=m"(at) : [sp] "r"(readable ? (unsigned long)&stashed : 0ul),
                               "r"(rr8), "r"(rr9), "r"(rr10) : "rax", "rcx", "r11", "memory");
            printf("sysenter returned\n");
        }
        printf("sysenter %s: signal %d code %d addr-is-rip %d trapno %lld err %#llx cs %#llx ss %#llx\n",
               readable ? "readable" : "unreadable", seen_signal, seen_code, seen_addr == (void *)seen[REG_RIP],
               seen[REG_TRAPNO], seen[REG_ERR], seen[REG_CSGSFS] & 0xffff, (seen[REG_CSGSFS] >> 48) & 0xffff);
        if (seen_signal == SIGSEGV)
            printf("  rax %s rbp %#llx rsp %#llx r8 %lld r9 %lld r10 %lld\n",
                   seen[REG_RAX] == getpid() ? "getpid" : seen[REG_RAX] == -14 ? "-EFAULT" : "other",
                   seen[REG_RBP], seen[REG_RSP] == (greg_t)&stashed ? 1ll : seen[REG_RSP],
                   seen[REG_R8], seen[REG_R9], seen[REG_R10]);
        else if (seen_signal == SIGILL)
            printf("  at it %d\n", (unsigned long)seen[REG_RIP] == at);
    }

    /* SYSCALL: the kernel never touches the user stack */
    static const unsigned long garbage[] = {0x1234, 0x8000000000000000ul, 0};
    for (int i = 0; i < 3; i++) {
        __asm__ volatile("mov %%rsp, %%r12\n\tmov %2, %%rsp\n\tsyscall\n\tmov %%r12, %%rsp"
                         : "=a"(result) : "a"(39), "r"(garbage[i]) : "r12", "rcx", "r11", "memory");
        printf("syscall with rsp %#lx: getpid %d\n", garbage[i], result == getpid());
    }
    return 0;
}
