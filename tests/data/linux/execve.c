/* execve as a process sees it, run natively and under minivmm with the same arguments:
 *   execve DIR          failing execve calls (each returns its errno and the program goes
 *                       on), then an execve of DIR/s1, a #! script whose interpreter is a
 *                       script ... five deep, the last naming this program; an O_CLOEXEC
 *                       descriptor and a plain one open, a handler, an ignored signal, a
 *                       blocked one and an alternate stack set;
 *   (ONLY=... in env)   the new image: what it finds of all that, its argv as the scripts
 *                       rewrote it, envp, AT_EXECFN, comm, /proc/self/exe and cmdline;
 *                       exits with 42;
 *   execve dirty PROG   every register changed (general, x87, MXCSR, XMM and YMM), then
 *                       execve PROG: what PROG starts with is Linux's, not this state.
 * DIR holds (tests/test_linux_exec.py makes them): notes.txt (executable text, no #!),
 * not-executable, s1-s5, l1-l6 (six scripts in a row), no-interpreter, empty-line. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

extern char **environ;
static char *dir;

static void handler(int sig) { (void)sig; }

/* long dirty_execve(path, argv, envp): execve with the registers full of values */
long dirty_execve(const char *path, char **argv, char **envp);
asm(".globl dirty_execve\n"
    "dirty_execve:\n"
    "  push %rbx\n  push %rbp\n  push %r12\n  push %r13\n  push %r14\n  push %r15\n"
    "  sub $8, %rsp\n"
    "  movl $0x3f80, (%rsp)\n  ldmxcsr (%rsp)\n"
    "  movw $0x27f, (%rsp)\n  fldcw (%rsp)\n  fldpi\n  fldl2e\n"
    "  vpcmpeqd %ymm0, %ymm0, %ymm0\n"
    "  .irp n,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15\n  vmovdqa %ymm0, %ymm\\n\n  .endr\n"
    "  mov $0x1111, %rbx\n  mov $0x2222, %rbp\n  mov $0x3333, %r8\n  mov $0x4444, %r9\n"
    "  mov $0x5555, %r10\n  mov $0x6666, %r12\n  mov $0x7777, %r13\n  mov $0x8888, %r14\n"
    "  mov $0x9999, %r15\n  mov $0xaaaa, %r11\n"
    "  mov $59, %eax\n  syscall\n"
    "  fstp %st(0)\n  fstp %st(0)\n  vzeroupper\n"
    "  movl $0x1f80, (%rsp)\n  ldmxcsr (%rsp)\n  movw $0x37f, (%rsp)\n  fldcw (%rsp)\n"
    "  add $8, %rsp\n"
    "  pop %r15\n  pop %r14\n  pop %r13\n  pop %r12\n  pop %rbp\n  pop %rbx\n  ret\n");

static const char *in_dir(const char *name) {
    static char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return path;
}

static void try_exec(const char *what, const char *path, char **argv) {
    char *plain[] = {(char *)path, NULL};
    errno = 0;
    long r = syscall(SYS_execve, path, argv ? argv : plain, environ);
    printf("%s: %ld %s\n", what, r, strerrorname_np(errno));
}

static int child(int argc, char **argv) {
    for (int i = 0; i < argc; i++)
        printf("argv[%d] %s\n", i, argv[i]);
    for (char **e = environ; *e; e++)
        printf("env %s\n", *e);
    printf("AT_EXECFN %s\n", (char *)getauxval(AT_EXECFN));
    char buf[4096] = {0};
    printf("exe %.*s\n", (int)readlink("/proc/self/exe", buf, sizeof buf), buf);
    printf("cloexec fd 3: %s\n", fcntl(3, F_GETFD) < 0 ? strerrorname_np(errno) : "open");
    printf("plain fd 4: %s\n", fcntl(4, F_GETFD) < 0 ? strerrorname_np(errno) : "open");
    printf("fd 4 reads: %zd\n", read(4, buf, 5));
    struct sigaction sa;
    sigaction(SIGUSR1, NULL, &sa);
    printf("SIGUSR1 handler reset: %d\n", sa.sa_handler == SIG_DFL);
    sigaction(SIGUSR2, NULL, &sa);
    printf("SIGUSR2 still ignored: %d\n", sa.sa_handler == SIG_IGN);
    sigset_t mask;
    sigprocmask(SIG_BLOCK, NULL, &mask);
    printf("SIGTERM still blocked: %d\n", sigismember(&mask, SIGTERM));
    stack_t ss;
    sigaltstack(NULL, &ss);
    printf("alternate stack disabled: %d\n", (ss.ss_flags & SS_DISABLE) != 0);
    char comm[16] = {0};
    prctl(PR_GET_NAME, comm);
    printf("comm %s\n", comm);
    int fd = open("/proc/self/cmdline", O_RDONLY);
    ssize_t n = read(fd, buf, sizeof buf - 1);
    for (ssize_t i = 0; i < n; i++)
        if (!buf[i]) buf[i] = '|';
    printf("cmdline %.*s\n", (int)n, buf);
    return 42;
}

int main(int argc, char **argv) {
    if (getenv("ONLY"))
        return child(argc, argv);
    if (argc > 2 && !strcmp(argv[1], "dirty")) {
        long r = dirty_execve(argv[2], argv + 2, environ);
        printf("dirty execve failed: %ld\n", r);
        return 1;
    }
    dir = argv[1];
    try_exec("missing", in_dir("no-such-program"), NULL);
    try_exec("text without #!", in_dir("notes.txt"), NULL);
    try_exec("directory", dir, NULL);
    try_exec("no execute bit", in_dir("not-executable"), NULL);
    try_exec("interpreter missing", in_dir("no-interpreter"), NULL);
    try_exec("no interpreter named", in_dir("empty-line"), NULL);
    try_exec("six scripts in a row", in_dir("l1"), NULL);
    errno = 0;
    long r = syscall(SYS_execve, argv[0], (char *)1, environ);
    printf("bad argv pointer: %ld %s\n", r, strerrorname_np(errno));
    errno = 0;
    r = syscall(SYS_execve, (char *)1, argv, environ);
    printf("bad path pointer: %ld %s\n", r, strerrorname_np(errno));
    static char huge[140000];
    memset(huge, 'x', sizeof huge - 1);
    char *one_too_long[] = {argv[0], huge, NULL};
    try_exec("an argument of 140000 bytes", argv[0], one_too_long);
    struct rlimit stack = {8 << 20, 8 << 20};   /* a quarter of it for arguments: 2 MiB */
    setrlimit(RLIMIT_STACK, &stack);
    static char *many[40];
    many[0] = argv[0];
    huge[100000] = 0;
    for (int i = 1; i < 39; i++)
        many[i] = huge;
    try_exec("38 arguments of 100000 bytes", argv[0], many);
    printf("still running\n");

    if (open(in_dir("notes.txt"), O_RDONLY | O_CLOEXEC) != 3 || open(in_dir("notes.txt"), O_RDONLY) != 4)
        return 1;
    signal(SIGUSR1, handler);
    signal(SIGUSR2, SIG_IGN);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    static char altstack[1 << 16];
    stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack};
    sigaltstack(&ss, NULL);
    fflush(stdout);
    char *new_argv[] = {"renamed", "two words", "", "last", NULL};
    char *new_env[] = {"ONLY=this", "EMPTY=", NULL};
    execve(in_dir("s1"), new_argv, new_env);
    printf("execve failed: %s\n", strerrorname_np(errno));
    return 1;
}
