/* carried.c: state a native process may hold when it moves into the emulator. It prints
   "ready", makes 20 getppid calls (the point falls among them), then says what it
   sees. Modes: cpuinfo (reads /proc/cpuinfo across the point), write PATH (a file open
   for writing), dup (stdout under fd 7 too), close (stdout closed before the point). */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    char line[64] = "";
    int fd = -1;
    printf("ready\n");
    fflush(stdout);
    if (!strcmp(mode, "cpuinfo")) {
        fd = open("/proc/cpuinfo", O_RDONLY);
        read(fd, line, 9);
    } else if (!strcmp(mode, "write")) {
        fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    } else if (!strcmp(mode, "dup")) {
        dup2(1, 7);
    } else if (!strcmp(mode, "close")) {
        close(1);
    }
    for (int i = 0; i < 20; i++) getppid();
    if (!strcmp(mode, "cpuinfo")) {
        int more = read(fd, line + 9, 14);
        line[9 + (more > 0 ? more : 0)] = 0;
        printf("cpuinfo: %s\n", strchr(line, '\t') ? "processor line" : line);
    } else if (!strcmp(mode, "write")) {
        printf("wrote: %zd\n", write(fd, "x", 1));
    } else if (!strcmp(mode, "dup")) {
        write(7, "through 7\n", 10);
    }
    fflush(stdout);
    write(2, "done\n", 5);
    return 0;
}
