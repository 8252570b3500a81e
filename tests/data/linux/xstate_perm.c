/* xstate_perm.c: the XSAVE features arch_prctl reports and permits (ARCH_GET_XCOMP_SUPP,
   ARCH_GET_XCOMP_PERM, ARCH_REQ_XCOMP_PERM and their guest forms), and sigaltstack's
   checks, which a permission for AMX's tiles tightens (build: gcc -static -O1; run:
   xstate_perm). Natively and under minivmm on the native host the output is the same. */
#define _GNU_SOURCE
#include <cpuid.h>
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_GET_XCOMP_SUPP 0x1021
#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define ARCH_GET_XCOMP_GUEST_PERM 0x1024
#define ARCH_REQ_XCOMP_GUEST_PERM 0x1025
#define XTILE_DATA 18

static long prctl(int code, unsigned long argument) {
    long r = syscall(SYS_arch_prctl, code, argument);
    return r < 0 ? -errno : r;
}

static unsigned long long get(int code) {
    unsigned long long value = 0xdead;
    long r = prctl(code, (unsigned long)&value);
    return r < 0 ? (unsigned long long)r : value;
}

static long altstack(void *sp, int flags, size_t size) {
    stack_t stack = {.ss_sp = sp, .ss_flags = flags, .ss_size = size};
    return sigaltstack(&stack, NULL) < 0 ? -errno : 0;
}

static sigjmp_buf back;

static void on_segv(int signo, siginfo_t *info, void *context) {
    printf("SIGSEGV code %d\n", info->si_code);
    siglongjmp(back, 1);
}

static void on_usr1(int signo) {
    stack_t old;
    sigaltstack(NULL, &old);
    printf("handler: old flags %d size %zu; a new one while on it: %ld\n", old.ss_flags, old.ss_size,
           altstack(malloc(1 << 16), 0, 1 << 16));
}

int main(void) {
    char *memory = malloc(1 << 20);
    unsigned long long supported = get(ARCH_GET_XCOMP_SUPP);
    stack_t old;
    setvbuf(stdout, NULL, _IONBF, 0);
    if (supported == (unsigned long long)-EINVAL) {
        printf("this kernel predates ARCH_GET_XCOMP_SUPP\n");
        return 0;
    }
    printf("supported %#llx permitted %#llx guest %#llx\n", supported, get(ARCH_GET_XCOMP_PERM),
           get(ARCH_GET_XCOMP_GUEST_PERM));
    printf("bad pointer %ld, unknown code %ld\n", prctl(ARCH_GET_XCOMP_SUPP, 8), prctl(0x1026, 0));
    const unsigned long indices[] = {0, 1, 2, 17, 20, 64, -1ul};
    for (unsigned i = 0; i < sizeof indices / sizeof *indices; i++)
        printf("request %ld: %ld, guest %ld\n", (long)indices[i], prctl(ARCH_REQ_XCOMP_PERM, indices[i]),
               prctl(ARCH_REQ_XCOMP_GUEST_PERM, indices[i]));

    /* sigaltstack: too small, an unknown mode, disabled, and while running on it */
    printf("sigaltstack 1024: %ld\n", altstack(memory, 0, 1024));
    printf("sigaltstack 2048: %ld\n", altstack(memory, 0, 2048));
    printf("mode 3: %ld\n", altstack(memory, 3, 1 << 16));
    sigaltstack(NULL, &old);
    printf("now: ours %d flags %d size %zu\n", old.ss_sp == memory, old.ss_flags, old.ss_size);
    printf("disabled: %ld\n", altstack(memory, SS_DISABLE, 4096));
    sigaltstack(NULL, &old);
    printf("now: sp %p flags %d size %zu\n", old.ss_sp, old.ss_flags, old.ss_size);
    struct sigaction usr1 = {.sa_handler = on_usr1, .sa_flags = SA_ONSTACK};
    sigaction(SIGUSR1, &usr1, NULL);
    altstack(memory, 0, 1 << 16);
    raise(SIGUSR1);
    /* the smallest stack sigaltstack takes, which a frame with AVX-512's state (2.7 KiB
       of XSAVE area) overflows: the signal is SIGSEGV (get_sigframe, force_sigsegv) */
    unsigned eax, ebx, ecx, edx, xcr0 = 0;
    if (__get_cpuid(1, &eax, &ebx, &ecx, &edx) && ecx >> 27 & 1)
        __asm__ volatile("xgetbv" : "=a"(xcr0) : "c"(0) : "edx");
    if ((xcr0 & 0xe0) == 0xe0) {
        struct sigaction segv = {.sa_sigaction = on_segv, .sa_flags = SA_SIGINFO};
        sigaction(SIGSEGV, &segv, NULL);
        altstack(memory, 0, 2048);
        if (!sigsetjmp(back, 1))
            raise(SIGUSR1);
        altstack(memory, 0, 1 << 16);
    }

    /* AMX's tile data: refused while the alternate stack would not hold its frame */
    if (supported >> XTILE_DATA & 1) {
        altstack(memory, 0, 8192);
        printf("request with an 8 KiB alternate stack: %ld\n", prctl(ARCH_REQ_XCOMP_PERM, XTILE_DATA));
        printf("guest: %ld\n", prctl(ARCH_REQ_XCOMP_GUEST_PERM, XTILE_DATA));
        printf("permitted %#llx guest %#llx\n", get(ARCH_GET_XCOMP_PERM), get(ARCH_GET_XCOMP_GUEST_PERM));
        altstack(memory, 0, 1 << 16);
        printf("with a 64 KiB one: %ld\n", prctl(ARCH_REQ_XCOMP_PERM, XTILE_DATA));
        printf("again: %ld\n", prctl(ARCH_REQ_XCOMP_PERM, XTILE_DATA));
        printf("permitted %#llx guest %#llx\n", get(ARCH_GET_XCOMP_PERM), get(ARCH_GET_XCOMP_GUEST_PERM));
        printf("sigaltstack 8 KiB now: %ld\n", altstack(memory, 0, 8192));
        printf("64 KiB: %ld\n", altstack(memory, 0, 1 << 16));
        printf("the same again: %ld\n", altstack(memory, 0, 1 << 16));
    } else {
        printf("no AMX: request %ld, guest %ld\n", prctl(ARCH_REQ_XCOMP_PERM, XTILE_DATA),
               prctl(ARCH_REQ_XCOMP_GUEST_PERM, XTILE_DATA));
    }
    return 0;
}
