/* process_calls.c: fork, wait, signals between processes, pipes, poll, eventfd and
   epoll, with results Linux fixes, one per line, for comparison with the machine's
   kernel. Children report through pipes or exit statuses, so the output's order is
   the parent's alone. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile int chld_seen;
static void on_chld(int signo) { (void)signo; chld_seen++; }

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    int status;
    pid_t child = fork();
    if (child == 0) _exit(7);
    int reaped = waitpid(child, &status, 0) == child;
    printf("waitpid exited: %d status=%d\n", reaped, WEXITSTATUS(status));
    int none = (int)wait(&status);
    printf("wait with no child: %d errno=%s\n", none, errno == ECHILD ? "ECHILD" : "other");

    signal(SIGCHLD, on_chld);
    child = fork();
    if (child == 0) { pause(); _exit(0); }
    printf("WNOHANG while it runs: %d\n", (int)waitpid(child, &status, WNOHANG));
    kill(child, SIGTERM);
    waitpid(child, &status, 0);
    printf("killed by: %s, SIGCHLD handled: %s\n", WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM ? "SIGTERM" : "?",
           chld_seen ? "yes" : "no");

    int fds[2];
    pipe(fds);
    child = fork();
    if (child == 0) {
        close(fds[0]);
        for (int i = 0; i < 3; i++) { char line[16]; int n = sprintf(line, "line %d\n", i); write(fds[1], line, n); }
        _exit(0);
    }
    close(fds[1]);
    char buffer[128];
    ssize_t total = 0, n;
    while ((n = read(fds[0], buffer + total, sizeof buffer - total)) > 0) total += n;
    buffer[total] = 0;
    printf("through the pipe: %s", buffer);
    printf("read at end of file: %d\n", (int)read(fds[0], buffer, 1));
    waitpid(child, NULL, 0);
    close(fds[0]);

    pipe(fds);
    close(fds[0]);
    signal(SIGPIPE, SIG_IGN);
    int wrote = (int)write(fds[1], "x", 1);
    printf("write without a reader: %d errno=%s\n", wrote, errno == EPIPE ? "EPIPE" : "other");
    close(fds[1]);

    pipe(fds);
    struct pollfd watch = {fds[0], POLLIN, 0};
    int polled = poll(&watch, 1, 10);
    printf("poll an empty pipe for 10 ms: %d\n", polled);
    write(fds[1], "y", 1);
    polled = poll(&watch, 1, 10);
    printf("poll after a write: %d revents=%#x\n", polled, watch.revents);
    close(fds[1]);
    read(fds[0], buffer, 1);
    polled = poll(&watch, 1, 10);
    printf("poll with no writer left: %d revents=%#x\n", polled, watch.revents);
    close(fds[0]);

    int event = eventfd(0, EFD_NONBLOCK);
    uint64_t value = 0;
    int got_bytes = (int)read(event, &value, 8);
    printf("eventfd empty: %d errno=%s\n", got_bytes, errno == EAGAIN ? "EAGAIN" : "other");
    value = 5;
    write(event, &value, 8);
    int epoll = epoll_create1(0);
    struct epoll_event asked = {EPOLLIN, {.u64 = 42}}, got[4];
    epoll_ctl(epoll, EPOLL_CTL_ADD, event, &asked);
    int ready = epoll_wait(epoll, got, 4, 100);
    printf("epoll ready: %d data=%llu\n", ready, ready > 0 ? (unsigned long long)got[0].data.u64 : 0ULL);
    read(event, &value, 8);
    ready = epoll_wait(epoll, got, 4, 5);
    printf("eventfd read: %llu, then epoll after 5 ms: %d\n", (unsigned long long)value, ready);

    child = fork();
    if (child == 0) { setpgid(0, 0); _exit(getpgid(0) == getpid() ? 3 : 4); }
    waitpid(child, &status, 0);
    printf("a child leads its own group: %s; getppid in a child is the parent: ", WEXITSTATUS(status) == 3 ? "yes" : "no");
    pid_t me = getpid();
    child = fork();
    if (child == 0) _exit(getppid() == me ? 0 : 1);
    waitpid(child, &status, 0);
    printf("%s\n", WEXITSTATUS(status) == 0 ? "yes" : "no");
    return 0;
}
