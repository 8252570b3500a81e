/* racy_threads.c: two threads append their letter to one shared log with no lock, a
   little work between appends; main prints where the log switches from one letter to
   the other. The interleaving is the scheduler's: on one vCPU it changes only where a
   time slice ends. */
#include <pthread.h>
#include <stdio.h>

#define APPENDS 200000
static volatile char log_[2 * APPENDS];
static volatile int at;

static void *append(void *letter) {
    volatile unsigned long x = 0;
    for (int i = 0; i < APPENDS; i++) {
        for (int k = 0; k < 20; k++) x += k;
        log_[at++] = *(char *)letter;
    }
    return NULL;
}

int main(void) {
    pthread_t a, b;
    pthread_create(&a, NULL, append, "a");
    pthread_create(&b, NULL, append, "b");
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    int switches = 0;
    printf("switches at:");
    for (int i = 1; i < at; i++)
        if (log_[i] != log_[i - 1] && switches++ < 12) printf(" %d", i);
    printf("\nswitches: %d\n", switches);
    return 0;
}
