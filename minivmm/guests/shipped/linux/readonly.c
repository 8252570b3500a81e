/* mprotect enforced: a write to a page made read-only is SIGSEGV (SEGV_ACCERR, si_addr
 * the byte), a read of an unmapped page SIGSEGV (SEGV_MAPERR). With an argument, no
 * handler: the first write kills the program (exit 139). */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
static sigjmp_buf back;
static void *volatile fault_addr;
static volatile int fault_code;
static void on_segv(int signo, siginfo_t *info, void *ctx) { fault_addr = info->si_addr; fault_code = info->si_code; siglongjmp(back, 1); }
int main(int argc, char **argv) {
    char *page = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    strcpy(page, "before");
    mprotect(page, 4096, PROT_READ);
    if (argc < 2) {
        struct sigaction sa = {0};
        sa.sa_sigaction = on_segv; sa.sa_flags = SA_SIGINFO;
        sigaction(SIGSEGV, &sa, NULL);
    }
    page[4096 + 5] = 'x';                      /* the second page stays writable */
    if (!sigsetjmp(back, 1)) { page[100] = 'y'; printf("wrote a read-only page\n"); }
    else printf("SIGSEGV code %d at offset %ld; still reads \"%s\"\n", fault_code, (char *)fault_addr - page, page);
    munmap(page, 8192);
    if (!sigsetjmp(back, 1)) { volatile char c = page[0]; (void)c; printf("read an unmapped page\n"); }
    else printf("SIGSEGV code %d at offset %ld\n", fault_code, (char *)fault_addr - page);
    return 0;
}
