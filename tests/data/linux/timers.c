/* timers.c: time that moves with the program's work, and timers delivering signals in
   it (build: gcc -static -O1 -o timers timers.c; run: timers MODE). Each mode prints
   what does not depend on the machine's speed, so that a native run and a run under
   minivmm print the same; "work" prints raw times and counts, for runs of minivmm to
   be compared with each other.
     elapsed   clock_gettime before and after a loop: the time it took
     alarm     alarm(1), a SIGALRM handler running while the program spins
     itimer    setitimer's ITIMER_REAL, ITIMER_VIRTUAL and ITIMER_PROF, periodic
     posix     timer_create, timer_settime, timer_gettime, timer_getoverrun, timer_delete
     blocking  a timer interrupting nanosleep, pause and sigsuspend
     blocked   a blocked timer signal pending until it is unblocked
     default   a timer's signal without a handler: the process dies of it
     read      a timer interrupting a read of a terminal (standard input), with and
               without SA_RESTART, and a 32-bit one (INT $0x80)
     work      raw times: the loop's elapsed ns, the spins an alarm took */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t fired;
static volatile int last_code, last_value, last_timer, last_overrun;

static void on_signal(int signo, siginfo_t *info, void *context) {
    fired++;
    last_code = info->si_code;
    last_value = info->si_value.sival_int;
    last_timer = info->si_timerid;
    last_overrun = info->si_overrun;
}

static void handle(int signo, int flags) {
    struct sigaction action = {.sa_sigaction = on_signal, .sa_flags = SA_SIGINFO | flags};
    sigaction(signo, &action, NULL);
}

static long long now(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return t.tv_sec * 1000000000ll + t.tv_nsec;
}

static unsigned long work(long rounds) {
    volatile unsigned long x = 1;
    for (long i = 0; i < rounds; i++) x = x * 6364136223846793005ul + 1;
    return x;
}

static long spin_until(int count) {
    long spins = 0;
    while (fired < count) spins++;
    return spins;
}

/* A call's result and what errno says, in that order (a printf's arguments are evaluated
   in no given order). */
static const char *outcome(long result) {
    static char text[64];
    snprintf(text, sizeof text, "%ld %s", result, result < 0 ? strerror(errno) : "");
    return text;
}

static void set_itimer(int which, long interval_us, long value_us) {
    struct itimerval it = {{interval_us / 1000000, interval_us % 1000000}, {value_us / 1000000, value_us % 1000000}};
    setitimer(which, &it, NULL);
}

static int elapsed(void) {
    long long before = now(CLOCK_MONOTONIC);
    work(2000000);
    long long took = now(CLOCK_MONOTONIC) - before;
    printf("elapsed plausible: %d\n", took > 1000000 && took < 10000000000ll);  /* 1 ms to 10 s */
    return 0;
}

static int alarm_mode(void) {
    handle(SIGALRM, 0);
    printf("alarm(1): %u\n", alarm(1));
    spin_until(1);
    printf("handled while spinning: %d, si_code SI_KERNEL: %d\n", fired, last_code == SI_KERNEL);
    printf("alarm(5): %u\n", alarm(5));
    printf("alarm(0) after it: %u\n", alarm(0));
    return 0;
}

static int itimer_mode(void) {
    static const int which[] = {ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF};
    static const int signals[] = {SIGALRM, SIGVTALRM, SIGPROF};
    static const char *const names[] = {"ITIMER_REAL", "ITIMER_VIRTUAL", "ITIMER_PROF"};
    for (int i = 0; i < 3; i++) {
        handle(signals[i], 0);
        fired = 0;
        set_itimer(which[i], 20000, 20000);
        spin_until(3);
        struct itimerval it, old;
        getitimer(which[i], &it);
        struct itimerval off = {{0, 0}, {0, 0}};
        setitimer(which[i], &off, &old);
        getitimer(which[i], &off);
        printf("%s: 3 signals while spinning; interval %ld us, value within it: %d; old interval %ld us; "
               "stopped: %d\n", names[i], (long)it.it_interval.tv_usec,
               it.it_value.tv_sec == 0 && it.it_value.tv_usec > 0 && it.it_value.tv_usec <= 20000,
               (long)old.it_interval.tv_usec, off.it_value.tv_usec == 0 && off.it_interval.tv_usec == 0);
    }
    struct itimerval bad = {{0, 1000000}, {0, 0}};
    printf("usec 1000000: %s\n", outcome(setitimer(ITIMER_REAL, &bad, NULL)));
    printf("which 3: %s\n", outcome(setitimer(3, &bad, NULL)));
    return 0;
}

static int posix_mode(void) {
    timer_t id, second;
    struct sigevent event = {.sigev_notify = SIGEV_SIGNAL, .sigev_signo = SIGUSR1, .sigev_value.sival_int = 42};
    handle(SIGUSR1, 0);
    printf("timer_create: %d\n", timer_create(CLOCK_MONOTONIC, &event, &id));
    struct itimerspec spec = {{0, 5000000}, {0, 5000000}}, got;
    timer_settime(id, 0, &spec, NULL);
    spin_until(3);
    printf("3 signals: si_code SI_TIMER %d, si_value %d, si_timerid is the id %d\n", last_code == SI_TIMER,
           last_value, last_timer == (int)(long)id);
    timer_gettime(id, &got);
    printf("timer_gettime: interval %ld ns, value within it %d\n", got.it_interval.tv_nsec,
           got.it_value.tv_sec == 0 && got.it_value.tv_nsec > 0 && got.it_value.tv_nsec <= 5000000);
    /* Blocked for a while: the expirations it missed are its overrun. */
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigprocmask(SIG_BLOCK, &usr1, NULL);
    long long until = now(CLOCK_MONOTONIC) + 40000000;
    while (now(CLOCK_MONOTONIC) < until) work(1000);
    int before = fired;
    sigprocmask(SIG_UNBLOCK, &usr1, NULL);
    printf("unblocked: one signal %d, si_overrun > 2: %d, timer_getoverrun the same: %d\n", fired == before + 1,
           last_overrun > 2, timer_getoverrun(id) == last_overrun);
    struct itimerspec zero = {{0, 0}, {0, 0}}, old;
    timer_settime(id, 0, &zero, &old);
    timer_gettime(id, &got);
    printf("stopped: old interval %ld ns, now %ld %ld\n", old.it_interval.tv_nsec, got.it_value.tv_nsec,
           got.it_interval.tv_nsec);
    /* An absolute time on CLOCK_REALTIME, one shot, with the kernel's default sigevent
       (glibc passes its own): SIGALRM, the timer's id as si_value. */
    handle(SIGALRM, 0);
    fired = 0;
    int second_id;
    syscall(SYS_timer_create, CLOCK_REALTIME, NULL, &second_id);
    second = (timer_t)(long)second_id;
    struct timespec wall;
    clock_gettime(CLOCK_REALTIME, &wall);
    wall.tv_nsec += 10000000;
    if (wall.tv_nsec >= 1000000000) { wall.tv_sec++; wall.tv_nsec -= 1000000000; }
    struct itimerspec at = {{0, 0}, wall};
    timer_settime(second, TIMER_ABSTIME, &at, NULL);
    spin_until(1);
    timer_gettime(second, &got);
    printf("absolute: SIGALRM, its id %d as si_value %d and si_timerid %d, then disarmed %d\n", second_id,
           last_value == second_id, last_timer == second_id, got.it_value.tv_sec == 0 && got.it_value.tv_nsec == 0);
    printf("timer_delete: %s\n", outcome(timer_delete(id)));
    printf("again: %s\n", outcome(timer_delete(id)));
    timer_delete(second);
    /* The kernel's answers to what it refuses (raw calls: glibc adds its own checks). */
    int raw;
    struct sigevent to_thread = {.sigev_notify = SIGEV_THREAD_ID, .sigev_signo = SIGUSR1};
    to_thread._sigev_un._tid = gettid();
    printf("SIGEV_THREAD_ID itself: %s\n", outcome(syscall(SYS_timer_create, CLOCK_MONOTONIC, &to_thread, &raw)));
    to_thread._sigev_un._tid = gettid() + 1000;
    printf("SIGEV_THREAD_ID another: %s\n", outcome(syscall(SYS_timer_create, CLOCK_MONOTONIC, &to_thread, &raw)));
    struct sigevent bad_signal = {.sigev_notify = SIGEV_SIGNAL, .sigev_signo = 65};
    printf("signal 65: %s\n", outcome(syscall(SYS_timer_create, CLOCK_MONOTONIC, &bad_signal, &raw)));
    printf("CLOCK_MONOTONIC_RAW: %s\n", outcome(syscall(SYS_timer_create, CLOCK_MONOTONIC_RAW, NULL, &raw)));
    printf("CLOCK_BOOTTIME_ALARM: %s\n", outcome(syscall(SYS_timer_create, CLOCK_BOOTTIME_ALARM, NULL, &raw)));
    printf("clock 99: %s\n", outcome(syscall(SYS_timer_create, 99, NULL, &raw)));
    return 0;
}

static int blocking_mode(void) {
    handle(SIGALRM, SA_RESTART);   /* none of these restarts */
    set_itimer(ITIMER_REAL, 0, 20000);
    struct timespec ten = {10, 0}, rem;
    long long before = now(CLOCK_MONOTONIC);
    const char *done = outcome(nanosleep(&ten, &rem));
    printf("nanosleep: %s, handled %d, rem within 10 s: %d, slept 20 ms or more: %d\n", done, fired,
           rem.tv_sec == 9, now(CLOCK_MONOTONIC) - before >= 20000000);
    set_itimer(ITIMER_REAL, 0, 20000);
    done = outcome(pause());
    printf("pause: %s, handled %d\n", done, fired);
    sigset_t alrm, empty, after;
    sigemptyset(&alrm);
    sigaddset(&alrm, SIGALRM);
    sigemptyset(&empty);
    sigprocmask(SIG_BLOCK, &alrm, NULL);
    set_itimer(ITIMER_REAL, 0, 20000);
    done = outcome(sigsuspend(&empty));
    sigprocmask(SIG_SETMASK, NULL, &after);
    printf("sigsuspend: %s, handled %d, SIGALRM blocked again: %d\n", done, fired, sigismember(&after, SIGALRM));
    sigprocmask(SIG_UNBLOCK, &alrm, NULL);
    struct timespec target;
    clock_gettime(CLOCK_MONOTONIC, &target);
    target.tv_nsec += 50000000;
    if (target.tv_nsec >= 1000000000) { target.tv_sec++; target.tv_nsec -= 1000000000; }
    int slept = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &target, NULL);
    printf("clock_nanosleep TIMER_ABSTIME: %d, woke at the time or after: %d\n", slept,
           now(CLOCK_MONOTONIC) >= target.tv_sec * 1000000000ll + target.tv_nsec);
    return 0;
}

static int blocked_mode(void) {
    handle(SIGALRM, 0);
    sigset_t alrm, pending;
    sigemptyset(&alrm);
    sigaddset(&alrm, SIGALRM);
    sigprocmask(SIG_BLOCK, &alrm, NULL);
    set_itimer(ITIMER_REAL, 0, 10000);
    long long until = now(CLOCK_MONOTONIC) + 30000000;
    while (now(CLOCK_MONOTONIC) < until) work(1000);
    sigpending(&pending);
    printf("blocked: handled %d, pending %d\n", fired, sigismember(&pending, SIGALRM));
    sigprocmask(SIG_UNBLOCK, &alrm, NULL);
    printf("unblocked: handled %d\n", fired);
    signal(SIGALRM, SIG_IGN);
    set_itimer(ITIMER_REAL, 0, 10000);
    until = now(CLOCK_MONOTONIC) + 30000000;
    while (now(CLOCK_MONOTONIC) < until) work(1000);
    sigpending(&pending);
    printf("ignored: handled %d, pending %d\n", fired, sigismember(&pending, SIGALRM));
    return 0;
}

static int default_mode(void) {
    printf("no handler\n");
    set_itimer(ITIMER_REAL, 0, 10000);
    for (;;) work(1000);
    return 0;
}

static int read_mode(void) {
    char buf[16];
    handle(SIGALRM, 0);
    set_itimer(ITIMER_REAL, 0, 50000);
    const char *got = outcome(read(0, buf, sizeof buf));
    printf("read without SA_RESTART: %s, handled %d\n", got, fired);
    handle(SIGALRM, SA_RESTART);
    set_itimer(ITIMER_REAL, 0, 50000);
    got = outcome(read(0, buf, sizeof buf));
    printf("read with SA_RESTART: %s, handled %d\n", got, fired);
    static char low[16];   /* (in the image: below 4 GiB, where a 32-bit call's pointer reaches) */
    long result;
    handle(SIGALRM, 0);
    set_itimer(ITIMER_REAL, 0, 50000);
    __asm__ volatile("int $0x80" : "=a"(result) : "a"(3), "b"(0), "c"(low), "d"(sizeof low) : "memory");
    printf("32-bit read (INT $0x80) without SA_RESTART: %ld, handled %d\n", result, fired);
    return 0;
}

static int work_mode(void) {
    long long before = now(CLOCK_MONOTONIC);
    work(2000000);
    printf("elapsed %lld ns\n", now(CLOCK_MONOTONIC) - before);
    handle(SIGALRM, 0);
    set_itimer(ITIMER_REAL, 0, 100000);
    printf("spins until a 100 ms alarm: %ld\n", spin_until(1));
    struct timespec wall;
    clock_gettime(CLOCK_REALTIME, &wall);
    printf("wall %lld.%09ld\n", (long long)wall.tv_sec, wall.tv_nsec);
    return 0;
}

int main(int argc, char **argv) {
    static const struct { const char *name; int (*run)(void); } modes[] = {
        {"elapsed", elapsed}, {"alarm", alarm_mode}, {"itimer", itimer_mode}, {"posix", posix_mode},
        {"blocking", blocking_mode}, {"blocked", blocked_mode}, {"default", default_mode}, {"read", read_mode},
        {"work", work_mode}};
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (unsigned i = 0; argc > 1 && i < sizeof modes / sizeof *modes; i++)
        if (strcmp(argv[1], modes[i].name) == 0) return modes[i].run();
    fprintf(stderr, "usage: timers elapsed|alarm|itimer|posix|blocking|blocked|default|read|work\n");
    return 2;
}
