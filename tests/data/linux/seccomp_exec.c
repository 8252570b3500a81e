/* seccomp_exec.c: installs a seccomp filter of its own that makes arch_prctl(ARCH_SET_CPUID)
   return 0 without running (SECCOMP_RET_ERRNO 0, which wins over a tracer's SECCOMP_RET_TRACE),
   then executes argv[1]: an attempt to keep CPUID faulting off in the program it runs. */
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv) {
    (void)argc;
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_arch_prctl, 0, 3),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[0])),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0x1012 /* ARCH_SET_CPUID */, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog program = {sizeof filter / sizeof filter[0], filter};
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    if (argv[1][0] == '-')   /* "-" as the first argument: no filter (the control) */
        argv++;
    else if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &program))
        perror("seccomp");
    execv(argv[1], argv + 1);
    perror("execv");
    return 1;
}
