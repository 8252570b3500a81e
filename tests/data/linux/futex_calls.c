/* futex_calls.c: futex and thread calls whose results Linux fixes, printed one per
   line, so that a run under minivmm can be compared with the machine's kernel. */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static uint32_t word, gate;
static volatile int handled_in, waiter_tid;
static long waiter_woke, waiter_word;

static long futex(uint32_t *address, int op, uint32_t value, const struct timespec *timeout, uint32_t *other,
                  uint32_t value3) {
    return syscall(SYS_futex, address, op, value, timeout, other, value3);
}

static void show(const char *what, long result) {
    printf("%s: %ld%s%s\n", what, result, result < 0 ? " errno=" : "", result < 0 ? (errno == EAGAIN ? "EAGAIN"
           : errno == ETIMEDOUT ? "ETIMEDOUT" : errno == EINVAL ? "EINVAL" : errno == EINTR ? "EINTR" : "other") : "");
}

static void on_usr1(int signo) { (void)signo; handled_in = (int)syscall(SYS_gettid); }

static void *waiter(void *arg) {
    (void)arg;
    waiter_tid = (int)syscall(SYS_gettid);
    __atomic_store_n(&gate, 1, __ATOMIC_SEQ_CST);
    futex(&gate, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    waiter_woke = futex(&word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
    waiter_word = word;
    while (!handled_in) {
        struct timespec pause = {0, 100000};
        nanosleep(&pause, NULL);
    }
    return NULL;
}

int main(void) {
    struct timespec ms = {0, 1000000}, past = {0, 0};
    show("wait on a changed value", futex(&word, FUTEX_WAIT_PRIVATE, 1, NULL, NULL, 0));
    show("wait 1 ms", futex(&word, FUTEX_WAIT_PRIVATE, 0, &ms, NULL, 0));
    show("wait_bitset until boot", futex(&word, FUTEX_WAIT_BITSET_PRIVATE, 0, &past, NULL, FUTEX_BITSET_MATCH_ANY));
    show("wait_bitset with bitset 0", futex(&word, FUTEX_WAIT_BITSET_PRIVATE, 0, NULL, NULL, 0));
    show("wake nobody", futex(&word, FUTEX_WAKE_PRIVATE, 5, NULL, NULL, 0));
    show("misaligned wait", futex((uint32_t *)((char *)&word + 1), FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0));
    signal(SIGUSR1, on_usr1);
    pthread_t thread;
    pthread_create(&thread, NULL, waiter, NULL);
    while (!__atomic_load_n(&gate, __ATOMIC_SEQ_CST))
        futex(&gate, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
    long woken = 0;
    while (!woken) {   /* until the waiter is asleep on word */
        struct timespec pause = {0, 100000};
        nanosleep(&pause, NULL);
        word = 7;
        woken = futex(&word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    }
    show("wake the waiter", woken);
    show("tgkill the waiter", syscall(SYS_tgkill, getpid(), waiter_tid, SIGUSR1));
    pthread_join(thread, NULL);
    printf("waiter woke: %ld, word=%ld\n", waiter_woke, waiter_word);
    printf("handled by the waiter: %s\n", handled_in == waiter_tid ? "yes" : "no");
    printf("a thread's id is not the process's: %s\n", waiter_tid != getpid() ? "yes" : "no");
    show("tgkill a thread that ended", syscall(SYS_tgkill, getpid(), waiter_tid, 0) == -1 ? -errno : 0);
    return 0;
}
