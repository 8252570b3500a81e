/* transactions.c: a Linux program (build: gcc -static -O1 -o transactions transactions.c)
   that runs each RTM instruction outside a transaction and one transaction, printing
   what happened. The architecture lets a transaction abort at any time, so "aborted"
   and "committed" are both correct; the rest is fixed by the SDM. */
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

static sigjmp_buf env;

static void on_signal(int signo) {
    siglongjmp(env, signo);
}

int main(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_signal;
    sigaction(SIGSEGV, &action, NULL);
    sigaction(SIGILL, &action, NULL);
    int signo;
    if ((signo = sigsetjmp(env, 1)) != 0) {
        printf("rtm: signal %d\n", signo);
        return 0;
    }
    unsigned long flags;
    __asm__ volatile("xtest; pushfq; pop %0" : "=r"(flags));
    printf("xtest: zf=%lu cf=%lu\n", flags >> 6 & 1, flags & 1);
    __asm__ volatile("xabort $7");
    printf("xabort: nothing\n");
    unsigned status;
    long inside = 0;
    __asm__ volatile("mov $-1, %%eax\n\t"
                     "xbegin 1f\n\t"
                     "mov $1, %1\n\t"
                     "xend\n\t"
                     "1:" : "=a"(status), "+r"(inside) : : "memory");
    if (status == ~0u)
        printf("xbegin: committed inside=%ld\n", inside);
    else
        printf("xbegin: aborted inside=%ld explicit=%u\n", inside, status & 1);
    if ((signo = sigsetjmp(env, 1)) == 0)
        __asm__ volatile("xend");
    printf("xend: signal %d\n", signo);
    return 0;
}
