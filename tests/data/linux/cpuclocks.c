/* The CPU-time clocks clock_getcpuclockid and pthread_getcpuclockid name, and the
   resolution clock_getres answers: the tick for the coarse clocks and for the CPU
   clocks but the scheduler's, 1 ns for the others (kernel/time/posix-cpu-timers.c). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <time.h>
int main(void) {
    struct timespec t, r;
    clockid_t c;
    int ids[] = {CLOCK_REALTIME_COARSE, CLOCK_MONOTONIC_COARSE, CLOCK_MONOTONIC, CLOCK_PROCESS_CPUTIME_ID};
    for (int i = 0; i < 4; i++) { clock_getres(ids[i], &r); printf("res %d %ld\n", ids[i], r.tv_nsec); }
    int got = clock_getcpuclockid(0, &c);
    printf("getcpuclockid %d id %d gettime %d res %d %ld\n", got, c, clock_gettime(c, &t), clock_getres(c, &r), r.tv_nsec);
    got = pthread_getcpuclockid(pthread_self(), &c);
    printf("pthread %d gettime %d\n", got, clock_gettime(c, &t));
    got = clock_gettime(((~999999) << 3) | 2, &t);
    printf("no such pid %d %d\n", got, errno);
    got = clock_gettime(((~0) << 3) | 3, &t);
    printf("which 3 %d %d\n", got, errno);
    got = clock_getres(((~0) << 3) | 0, &r);
    printf("prof res %d %ld\n", got, r.tv_nsec);
    return 0;
}
