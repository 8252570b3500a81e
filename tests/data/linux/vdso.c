/* Reads every clock the vDSO answers, through the C library (the vDSO) and as system
   calls, and says where [vvar] and [vdso] are. "unmap": [vvar] unmapped and a page of
   the program's own mapped there; its bytes must stay as written while the program runs.
   "special": what Linux refuses of [vvar]. */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static long ns(struct timespec t) { return t.tv_sec * 1000000000L + t.tv_nsec; }

int main(int argc, char **argv) {
    unsigned long ehdr = getauxval(AT_SYSINFO_EHDR);
    if (argc > 1 && !strcmp(argv[1], "unmap")) {
        char *vvar = (char *)(ehdr - 4096);
        if (munmap(vvar, 4096)) return 1;
        char *mine = mmap(vvar, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        if (mine != vvar) return 2;
        memset(mine, 0x5a, 4096);
        volatile unsigned long sum = 0;
        for (int i = 0; i < 100000; i++) sum += i;   /* many blocks */
        for (int i = 0; i < 4096; i++)
            if (mine[i] != 0x5a) { printf("overwritten at %d\n", i); return 3; }
        puts("intact");
        return 0;
    }
    if (argc > 1 && !strcmp(argv[1], "special")) {   /* what Linux refuses of [vvar] */
        char *vvar = (char *)(ehdr - 4096);
        int got = mprotect(vvar, 4096, PROT_READ | PROT_WRITE);
        printf("mprotect %d %d\n", got, errno);
        got = madvise(vvar, 4096, MADV_DONTNEED);
        printf("madvise %d %d\n", got, errno);
        got = mremap(vvar, 4096, 8192, MREMAP_MAYMOVE) == MAP_FAILED;
        printf("mremap %d %d\n", got, errno);
        return 0;
    }
    struct timespec library, kernel, res;
    struct timeval tv;
    struct timezone tz = {5, 5};
    printf("vdso %s\n", ehdr && !memcmp((void *)ehdr, "\177ELF", 4) ? "mapped" : "absent");
    clock_gettime(CLOCK_MONOTONIC, &library);
    syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &kernel);
    printf("monotonic in order %d\n", ns(library) <= ns(kernel));
    clock_gettime(CLOCK_REALTIME, &library);
    gettimeofday(&tv, &tz);
    time_t seconds = time(NULL);
    printf("realtime %ld %ld %ld tz %d %d\n", (long)library.tv_sec, (long)tv.tv_sec, (long)seconds,
           tz.tz_minuteswest, tz.tz_dsttime);
    clock_getres(CLOCK_MONOTONIC, &res);
    printf("resolution %ld\n", ns(res));
#ifdef __GLIBC__
    unsigned cpu = 7, node = 7;
    int got = getcpu(&cpu, &node);
    printf("getcpu %d %u %u\n", got, cpu, node);
#endif
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &library);
    printf("cpu time positive %d\n", ns(library) > 0);
    printf("times %ld.%09ld\n", (long)kernel.tv_sec, (long)kernel.tv_nsec);
    return 0;
}
