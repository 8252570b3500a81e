/* fork_bomb.c: forks until fork fails, its children waiting; says how fork failed, then
   ends them all. Under minivmm the VM's bound is met (EAGAIN, as at RLIMIT_NPROC) and the
   VMM's memory stays bounded. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

int main(void) {
    int made = 0;
    pid_t child;
    while (made < 100000 && (child = fork()) >= 0) {
        if (child == 0) { pause(); _exit(0); }
        made++;
    }
    int error = errno;
    signal(SIGTERM, SIG_IGN);
    kill(0, SIGTERM);
    int reaped = 0;
    while (wait(NULL) > 0) reaped++;
    printf("forked %d, then %s; reaped %d\n", made, error == EAGAIN ? "EAGAIN" : "another error", reaped);
    return 0;
}
