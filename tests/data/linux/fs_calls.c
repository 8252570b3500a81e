/* statfs, fstatfs, close_range and socket, run natively and under minivmm (fs_calls DIR):
 * what each file system says of itself, descriptors closed or marked close-on-exec by
 * range, and sockets (which a machine with a network gives, minivmm never). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <unistd.h>

static void show(const char *what, int result, struct statfs *s) {
    if (result) {
        printf("%s: %s\n", what, strerrorname_np(errno));
        return;
    }
    printf("%s: type %lx bsize %ld namelen %ld frsize %ld blocks %lu files %lu\n", what, (long)s->f_type,
           (long)s->f_bsize, (long)s->f_namelen, (long)s->f_frsize, (unsigned long)s->f_blocks,
           (unsigned long)s->f_files);
    printf("%s: read-only %d\n", what, (s->f_flags & ST_RDONLY) != 0);
}

static void descriptors(const char *what) {
    printf("%s:", what);
    for (int fd = 3; fd <= 5; fd++) {
        int flags = fcntl(fd, F_GETFD);
        printf(" %d=%s", fd, flags < 0 ? strerrorname_np(errno) : flags & FD_CLOEXEC ? "cloexec" : "open");
    }
    printf("\n");
}

static void close_range_call(const char *what, unsigned first, unsigned last, unsigned flags) {
    errno = 0;
    long r = syscall(SYS_close_range, first, last, flags);
    printf("close_range %s: %ld %s\n", what, r, r ? strerrorname_np(errno) : "");
}

int main(int argc, char **argv) {
    struct statfs s;
    show("/proc", statfs("/proc", &s), &s);
    show("/proc/self/maps", statfs("/proc/self/maps", &s), &s);
    show("/sys", statfs("/sys/devices/system/cpu", &s), &s);
    show("/dev/null", statfs("/dev/null", &s), &s);
    show("missing", statfs("/proc/no-such-file", &s), &s);
    show("bad pointer", statfs("/proc", (struct statfs *)1), &s);
    show("DIR", statfs(argv[1], &s), &s);
    char path[4096];
    snprintf(path, sizeof path, "%s/fs_calls", argv[1]);
    int fd = open(path, O_RDONLY);
    show("fstatfs of a file in DIR", fstatfs(fd, &s), &s);
    int proc = open("/proc/self/cmdline", O_RDONLY);
    show("fstatfs of /proc/self/cmdline", fstatfs(proc, &s), &s);
    show("fstatfs of a closed descriptor", fstatfs(99, &s), &s);
    close(fd);
    close(proc);

    for (int i = 3; i <= 5; i++)
        if (open(path, O_RDONLY) != i)
            return 1;
    descriptors("opened");
    close_range_call("4.. cloexec", 4, ~0U, CLOSE_RANGE_CLOEXEC);
    descriptors("marked");
    close_range_call("4..4", 4, 4, 0);
    descriptors("closed 4");
    close_range_call("5..3", 5, 3, 0);
    close_range_call("unknown flag", 3, ~0U, 0x8);
    close_range_call("3.. unshare", 3, ~0U, CLOSE_RANGE_UNSHARE);
    descriptors("closed all");

    int inet = socket(AF_INET, SOCK_STREAM, 0);
    printf("socket inet: %d %s\n", inet, inet < 0 ? strerrorname_np(errno) : "");
    int unix_socket = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    printf("socket unix: %d %s\n", unix_socket, unix_socket < 0 ? strerrorname_np(errno) : "");
    int pair[2];
    int paired = socketpair(AF_UNIX, SOCK_STREAM, 0, pair);
    printf("socketpair unix: %d %s\n", paired, paired < 0 ? strerrorname_np(errno) : "");
    return 0;
}
