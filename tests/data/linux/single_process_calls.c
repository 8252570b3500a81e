#include <stdio.h>
#include <unistd.h>
#include <fcntl.h>
#include <errno.h>
#include <sys/prctl.h>
#include <sys/sysinfo.h>
#include <sys/xattr.h>
int main(void) {
    struct sysinfo si;
    char name[16] = {0};
    prctl(PR_GET_NAME, name);
    printf("name %s\n", name);
    int r = sysinfo(&si);
    printf("sysinfo %d procs %d unit %u ram>0 %d free<=ram %d\n", r, si.procs, si.mem_unit, si.totalram > 0, si.freeram <= si.totalram);
    printf("phys_pages>0 %d avphys>0 %d\n", sysconf(_SC_PHYS_PAGES) > 0, sysconf(_SC_AVPHYS_PAGES) > 0);
    printf("getgroups %d\n", getgroups(0, NULL));
    printf("set_name %d ", prctl(PR_SET_NAME, "probe-name"));
    printf("get_name %d %s\n", prctl(PR_GET_NAME, name), name);
    printf("dumpable %d\n", prctl(PR_GET_DUMPABLE));
    int fd = open("/proc/self/cmdline", O_RDONLY);
    printf("fadvise %d\n", posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL));
    errno = 0;
    ssize_t got = lgetxattr("/proc/self/cmdline", "user.x", name, sizeof name);
    printf("lgetxattr %zd none %d\n", got, errno == ENODATA || errno == EOPNOTSUPP);
    return 0;
}
