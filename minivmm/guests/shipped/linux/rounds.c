/* rounds.c: a Linux program (build: gcc -static -O1 -o rounds rounds.c) that computes in
   rounds, reading 16 bytes of FILE (default /proc/cpuinfo) and printing a checksum line
   after each, and exits with a status from the final sum. A snapshot between two rounds
   holds an open file at an offset, signal dispositions and the program's heap. */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static void on_usr1(int signo) { (void)signo; }

int main(int argc, char **argv) {
    int fd = open(argc > 1 ? argv[1] : "/proc/cpuinfo", O_RDONLY);
    if (fd < 0) { perror("open"); return 2; }
    signal(SIGUSR1, on_usr1);
    unsigned long *heap = malloc(1 << 20), sum = 1;
    for (int round = 0; round < 8; round++) {
        char buf[17] = {0};
        for (long i = 0; i < 300000; i++) {
            sum = sum * 6364136223846793005ul + (unsigned long)i;
            heap[i & 0x1ffff] ^= sum;
        }
        if (read(fd, buf, 16) < 0) { perror("read"); return 2; }
        for (int j = 0; j < 16; j++) if (buf[j] < ' ') buf[j] = '.';
        printf("round %d: %016lx %s\n", round, sum ^ heap[round], buf);
        fflush(stdout);
    }
    raise(SIGUSR1);  /* the handler installed before the snapshot still runs */
    return (int)(sum & 0x7f);
}
