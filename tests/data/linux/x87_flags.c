/* x87_flags.c: the exception flags of FCOMI, FUCOMI and FISTTP, and the #MF an unmasked
   one raises at the next waiting instruction, as the program sees them (build: gcc
   -static -O1; run: x87_flags). Natively and under minivmm the output is the same. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>

struct f80 { unsigned long long mantissa; unsigned short exponent; } __attribute__((packed));
static const struct f80 operands[] = {
    {0x8000000000000000ull, 0x3fff},   /* 1.0 */
    {0xc000000000000001ull, 0x7fff},   /* a quiet NaN */
    {0x8000000000000001ull, 0x7fff},   /* a signalling NaN */
    {0x8000000000000000ull, 0x7fff},   /* infinity */
    {0x0000000000000001ull, 0x0000},   /* a denormal */
    {0x4000000000000000ull, 0x3fff},   /* an unnormal: an unsupported format */
    {0xa000000000000000ull, 0x4000},   /* 2.5 */
    {0xa000000000000000ull, 0xc000},   /* -2.5 */
    {0x9502f90000000000ull, 0x4020},   /* 1e10 */
    {0x9c40000000000000ull, 0x400e},   /* 40000 */
    {0xfffffffe00000000ull, 0x401d},   /* 2147483647: the largest int */
    {0x8ac7230489e80000ull, 0x403f},   /* 1e19 */
    {0x8000000000000000ull, 0x3ffe},   /* 0.5 */
};
static const char *const names[] = {"1", "qnan", "snan", "inf", "denormal", "unnormal", "2.5", "-2.5", "1e10",
                                    "40000", "2147483647", "1e19", "0.5"};
#define COUNT (sizeof operands / sizeof *operands)

static sigjmp_buf back;

static void on_fpe(int signo, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *regs = uc->uc_mcontext.gregs;
    unsigned flags = regs[REG_EFL];
    printf("  SIGFPE code=%d trapno=%lld at-fwait=%d fsw=%#x", info->si_code, regs[REG_TRAPNO],
           info->si_addr == (void *)regs[REG_RIP] && *(unsigned char *)regs[REG_RIP] == 0x9b, uc->uc_mcontext.fpregs->swd);
    /* an unmasked #D leaves the compare's result in EFLAGS; after an unmasked #IA the SDM
       says they are unchanged, where Intel's CPUs set them unordered: not compared */
    if (info->si_code == FPE_FLTUND)
        printf(" zf,pf,cf=%u%u%u", flags >> 6 & 1, flags >> 2 & 1, flags & 1);
    printf("\n");
    siglongjmp(back, 1);
}

/* ST0 = operands[a], ST1 = operands[b]; one compare; EFLAGS and the status word after it. */
static void compare(const char *insn, unsigned a, unsigned b, unsigned short cw) {
    unsigned long flags;
    unsigned short sw;
    if (sigsetjmp(back, 1)) return;
#define COMPARE(op) __asm__ volatile("fninit\n\tfldcw %4\n\tfldt %2\n\tfldt %3\n\t" op " %%st(1), %%st\n\t"     \
                                     "pushfq\n\tpopq %0\n\tfnstsw %1\n\tfninit"                             \
                                     : "=r"(flags), "=m"(sw) : "m"(operands[b]), "m"(operands[a]), "m"(cw))
    if (!strcmp(insn, "fcomi")) COMPARE("fcomi");
    if (!strcmp(insn, "fcomip")) COMPARE("fcomip");
    if (!strcmp(insn, "fucomi")) COMPARE("fucomi");
    if (!strcmp(insn, "fucomip")) COMPARE("fucomip");
    printf("%s %s,%s: zf,pf,cf=%lu%lu%lu fsw=%#x\n", insn, names[a], names[b], flags >> 6 & 1, flags >> 2 & 1,
           flags & 1, sw);
}

/* ST0 = operands[a] stored by FISTTP of each width: what is stored and the status word. */
static void store(unsigned a) {
    short s = 0x1111;
    int i = 0x11111111;
    long long l = 0x1111111111111111ll;
    unsigned short sw[3];
    __asm__ volatile("fninit\n\tfldt %1\n\tfisttps %0\n\tfnstsw %2" : "+m"(s) : "m"(operands[a]), "m"(sw[0]));
    __asm__ volatile("fninit\n\tfldt %1\n\tfisttpl %0\n\tfnstsw %2" : "+m"(i) : "m"(operands[a]), "m"(sw[1]));
    __asm__ volatile("fninit\n\tfldt %1\n\tfisttpll %0\n\tfnstsw %2" : "+m"(l) : "m"(operands[a]), "m"(sw[2]));
    printf("fisttp %s: %d %#x, %d %#x, %lld %#x\n", names[a], s, sw[0], i, sw[1], l, sw[2]);
}

int main(void) {
    static const char *const compares[] = {"fcomi", "fcomip", "fucomi", "fucomip"};
    struct sigaction fpe = {0};
    setvbuf(stdout, NULL, _IONBF, 0);
    fpe.sa_sigaction = on_fpe;
    fpe.sa_flags = SA_SIGINFO;
    sigaction(SIGFPE, &fpe, NULL);
    for (unsigned c = 0; c < 4; c++)
        for (unsigned a = 0; a < 6; a++)
            for (unsigned b = 0; b < 6; b += b ? 1 : 4)   /* against 1.0, the denormal and the unnormal */
                compare(compares[c], a, b, 0x37f);
    for (unsigned a = 0; a < COUNT; a++)
        store(a);
    {   /* an empty register: stack underflow (#IS: IE and SF) */
        unsigned long flags;
        unsigned short sw[2];
        int i = 0x11111111;
        __asm__ volatile("fninit\n\tfldt %2\n\tfucomi %%st(1), %%st\n\tpushfq\n\tpopq %0\n\tfnstsw %1\n\tfninit"
                         : "=r"(flags), "=m"(sw[0]) : "m"(operands[0]));
        __asm__ volatile("fninit\n\tfisttpl %0\n\tfnstsw %1\n\tfninit" : "+m"(i), "=m"(sw[1]));
        printf("fucomi 1,empty: zf,pf,cf=%lu%lu%lu fsw=%#x; fisttp empty: %d %#x\n", flags >> 6 & 1, flags >> 2 & 1,
               flags & 1, sw[0], i, sw[1]);
    }
    /* unmasked: #MF at the next waiting instruction (FWAIT at "waited") */
    static const unsigned short unmasked[] = {0x37e, 0x37d, 0x35f};   /* IE, DE, PE unmasked */
    for (unsigned m = 0; m < 3; m++)
        for (unsigned c = 0; c < 4; c++)
            for (unsigned a = 1; a < 5; a++) {
                unsigned long flags;
                unsigned short sw;
                printf("%s %s cw=%#x\n", compares[c], names[a], unmasked[m]);
                if (sigsetjmp(back, 1)) continue;
#define UNMASKED(op) __asm__ volatile("fninit\n\tfldcw %4\n\tfldt %2\n\tfldt %3\n\t" op " %%st(1), %%st\n\t"     \
                                      "pushfq\n\tpopq %0\n\tfnstsw %1\n\tfwait\n\tfninit"              \
                                      : "=r"(flags), "=m"(sw) : "m"(operands[0]), "m"(operands[a]), "m"(unmasked[m]))
                if (c == 0) UNMASKED("fcomi");
                if (c == 1) UNMASKED("fcomip");
                if (c == 2) UNMASKED("fucomi");
                if (c == 3) UNMASKED("fucomip");
                printf("  no exception: fsw=%#x\n", sw);
            }
    for (unsigned m = 0; m < 3; m += 2)
        for (unsigned a = 1; a < COUNT; a++) {
            int i = 0x11111111;
            unsigned short sw;
            printf("fisttp %s cw=%#x\n", names[a], unmasked[m]);
            if (sigsetjmp(back, 1)) {
                printf("  stored %#x\n", i);
                continue;
            }
            __asm__ volatile("fninit\n\tfldcw %3\n\tfldt %1\n\tfisttpl %0\n\tfnstsw %2\n\tfwait\n\tfninit"
                             : "+m"(i) : "m"(operands[a]), "m"(sw), "m"(unmasked[m]));
            printf("  no exception: %d fsw=%#x\n", i, sw);
        }
    return 0;
}
