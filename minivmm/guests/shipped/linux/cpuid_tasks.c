/* cpuid_tasks.c: a Linux program (build: gcc -static -O1 -pthread -o cpuid_tasks
   cpuid_tasks.c) whose every task reads CPUID: four threads, a child made by fork(),
   and a child started by posix_spawn() (vfork and execve of this program again). Each
   prints one line, "TASK: avx2=0|1 popcnt=0|1", from its own CPUID. */
#include <cpuid.h>
#include <pthread.h>
#include <spawn.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

static void report(const char *task) {
    unsigned a, b, c, d, b7 = 0;
    __get_cpuid(1, &a, &b, &c, &d);
    if (__get_cpuid_max(0, NULL) >= 7) __cpuid_count(7, 0, a, b7, a, a);
    printf("%s: avx2=%u popcnt=%u\n", task, (b7 >> 5) & 1, (c >> 23) & 1);
    fflush(stdout);
}

static void *thread(void *name) {
    report(name);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc > 1) {               /* started again by posix_spawn */
        report(argv[1]);
        return 0;
    }
    report("main");
    static char names[4][16];
    pthread_t threads[4];
    for (int i = 0; i < 4; i++) {
        snprintf(names[i], sizeof names[i], "thread%d", i);
        pthread_create(&threads[i], NULL, thread, names[i]);
        pthread_join(threads[i], NULL);
    }
    pid_t child = fork();
    if (child == 0) {
        report("fork");
        _exit(0);
    }
    waitpid(child, NULL, 0);
    char *spawned[] = {argv[0], "spawn", NULL};
    if (posix_spawn(&child, "/proc/self/exe", NULL, NULL, spawned, environ) == 0)
        waitpid(child, NULL, 0);
    return 0;
}
