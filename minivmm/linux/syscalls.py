"""The system-call table: number -> (name, handler), Linux x86-64 numbering
(arch/x86/entry/syscalls/syscall_64.tbl). A handler takes the process and the six
argument registers and returns the result, or raises SyscallError(errno); the result
goes back in RAX as Linux returns it (-errno on failure). What is not in the table
returns ENOSYS and is counted by number, never ending the run.
"""

from __future__ import annotations

import random
import struct

import unicorn.x86_const as x86

from .errno import EBADF, EINVAL, ENOENT, ENOMEM, ENOSYS, ENOTTY, ESPIPE, SyscallError
from .process import PAGE, SAMPLE, page_up
from .signals import SIG_DFL, SIG_IGN, Action, Signals, read_action, write_action

STDERR_KEPT = 16 << 20       # stderr bytes the report keeps (the rest is counted)
UNKNOWN_KEPT = 1000          # distinct unknown system-call numbers counted one by one
RETURNED = object()  # a handler that set every register itself (rt_sigreturn)
FATAL_BY_DEFAULT = frozenset(range(1, 32)) - {17, 18, 20, 21, 22, 23, 28}  # not SIGCHLD, SIGCONT, SIGTSTP ...

ARCH_SET_GS, ARCH_SET_FS, ARCH_GET_FS, ARCH_GET_GS = 0x1001, 0x1002, 0x1003, 0x1004
MAP_FIXED, MAP_ANONYMOUS = 0x10, 0x20
S_IFCHR, S_IFREG = 0o020000, 0o100000
EPOCH = 1_700_000_000             # the virtual clock starts here (seconds since 1970)
VIRTUAL_NS_PER_SYSCALL = 1000     # and advances 1 us per system call: runs are reproducible


class Kernel:
    """The kernel's state shared by the handlers: the process, files, clock, FS/GS."""

    def __init__(self, process, files: dict[str, bytes], seed: int):
        self.p = process
        self.files = files              # path -> contents (synthesized: /proc/cpuinfo ...)
        self.open: dict[int, list] = {}  # fd -> [path, contents, offset]
        self.random = random.Random(seed ^ 0x5EED)
        self.calls = 0
        self.signals = Signals(process)
        self.killed: int | None = None   # a signal the program sent itself and dies of

    def dispatch(self, uc, number: int, args: tuple[int, ...]):
        """One system call, its registers already read by the VMM (RAX the number, RDI
        RSI RDX R10 R8 R9 the arguments, RIP past the SYSCALL): the value for RAX, or
        RETURNED when the call set every register itself (rt_sigreturn, a signal)."""
        self.calls += 1
        name, handler = TABLE.get(number, (None, sys_enosys))
        if name is None and (number in self.p.unknown or len(self.p.unknown) < UNKNOWN_KEPT):
            self.p.unknown[number] += 1
        elif name is None:
            self.p.unknown_others += 1  # a program calling random numbers cannot grow the report
        else:
            self.p.counts[name] += 1
        if len(self.p.sample) < SAMPLE:
            self.p.sample.append(name or number)
        try:
            result = handler(self, uc, *args)
        except SyscallError as e:
            result = -e.errno
        return result if result is RETURNED else result & (1 << 64) - 1

    def now_ns(self) -> int:
        return EPOCH * 10**9 + self.calls * VIRTUAL_NS_PER_SYSCALL


# ---- files -------------------------------------------------------------------------------

def sys_read(k, uc, fd, buf, count, *_):
    if fd == 0:
        data = b""  # standard input is empty (end of file)
    elif fd in k.open:
        path, contents, offset = k.open[fd]
        data = contents[offset:offset + count]
        k.open[fd][2] += len(data)
    else:
        raise SyscallError(EBADF)  # stdout and stderr are not open for reading either
    k.p.write(buf, data)
    return len(data)


def _emit(k, fd, data: bytes) -> int:
    if fd == 1:
        k.p.stdout_sink(data)
    elif fd == 2:
        kept = max(STDERR_KEPT - len(k.p.stderr), 0)
        k.p.stderr += data[:kept]
        k.p.stderr_left_out += len(data) - len(data[:kept])
    else:
        raise SyscallError(EBADF)
    return len(data)


def sys_write(k, uc, fd, buf, count, *_):
    return _emit(k, fd, k.p.read(buf, count))


def sys_writev(k, uc, fd, iov, iovcnt, *_):
    if not 0 <= iovcnt <= 1024:
        raise SyscallError(EINVAL)
    parts = []
    for i in range(iovcnt):
        base, length = struct.unpack("<QQ", k.p.read(iov + 16 * i, 16))
        parts.append(k.p.read(base, length))
    return _emit(k, fd, b"".join(parts))


def sys_openat(k, uc, dirfd, path_at, flags, *_):
    path = k.p.read_string(path_at).decode("utf-8", "replace")
    if path not in k.files:
        raise SyscallError(ENOENT)
    fd = 3
    while fd in k.open:
        fd += 1
    k.open[fd] = [path, k.files[path], 0]
    return fd


def sys_open(k, uc, path_at, flags, *_):
    return sys_openat(k, uc, -100, path_at, flags)  # AT_FDCWD


def sys_pread64(k, uc, fd, buf, count, offset, *_):
    if fd not in k.open:
        raise SyscallError(ESPIPE if fd in (0, 1, 2) else EBADF)
    data = k.open[fd][1][offset:offset + count]
    k.p.write(buf, data)
    return len(data)


def sys_access(k, uc, path_at, *_):
    if k.p.read_string(path_at).decode("utf-8", "replace") in k.files:
        return 0
    raise SyscallError(ENOENT)


F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC = 0, 1, 2, 3, 4, 1030


def sys_fcntl(k, uc, fd, command, argument, *_):
    if fd not in (0, 1, 2) and fd not in k.open:
        raise SyscallError(EBADF)
    if command in (F_GETFD, F_SETFD, F_SETFL):
        return 0
    if command == F_GETFL:
        return 1 if fd in (1, 2) else 0  # O_WRONLY for stdout and stderr, O_RDONLY otherwise
    if command in (F_DUPFD, F_DUPFD_CLOEXEC):
        new = max(argument, 3)
        while new in k.open:
            new += 1
        if fd in k.open:
            k.open[new] = list(k.open[fd])
            return new
    raise SyscallError(EINVAL)


def sys_getcwd(k, uc, buf, size, *_):
    if size < 2:
        raise SyscallError(34)  # ERANGE
    k.p.write(buf, b"/\0")
    return 2


POLLNVAL = 0x20


def sys_poll(k, uc, fds, count, timeout, *_):
    """Nothing is ever pending (no other process writes to the program), so a poll
    only reports descriptors that are not open (Rust's runtime checks 0-2 this way)."""
    if count > 1024:
        raise SyscallError(EINVAL)
    ready = 0
    for i in range(count):
        fd, events, _ = struct.unpack("<ihh", k.p.read(fds + 8 * i, 8))
        revents = 0 if fd < 0 or fd in (0, 1, 2) or fd in k.open else POLLNVAL
        k.p.write(fds + 8 * i + 6, struct.pack("<h", revents))
        ready += bool(revents)
    return ready


def sys_close(k, uc, fd, *_):
    if fd in k.open:
        del k.open[fd]
        return 0
    if fd in (0, 1, 2):
        return 0
    raise SyscallError(EBADF)


def sys_lseek(k, uc, fd, offset, whence, *_):
    if fd not in k.open:
        raise SyscallError(ESPIPE if fd in (0, 1, 2) else EBADF)
    entry = k.open[fd]
    offset = offset - (1 << 64) if offset >> 63 else offset
    base = {0: 0, 1: entry[2], 2: len(entry[1])}.get(whence)
    if base is None or base + offset < 0:
        raise SyscallError(EINVAL)
    entry[2] = base + offset
    return entry[2]


def _stat(k, fd) -> bytes:
    """struct stat of x86-64 (arch/x86/include/uapi/asm/stat.h): 144 bytes."""
    if fd in (0, 1, 2):
        mode, size, rdev = S_IFCHR | 0o620, 0, 0x8800
    elif fd in k.open:
        mode, size, rdev = S_IFREG | 0o444, len(k.open[fd][1]), 0
    else:
        raise SyscallError(EBADF)
    seconds = k.now_ns() // 10**9
    return struct.pack("<QQQIIIIQqqq6q3q", 1, fd + 1, 1, mode, 0, 0, 0, rdev, size, 4096,
                       (size + 511) // 512, seconds, 0, seconds, 0, seconds, 0, 0, 0, 0)


def sys_fstat(k, uc, fd, buf, *_):
    k.p.write(buf, _stat(k, fd))
    return 0


AT_EMPTY_PATH = 0x1000


def sys_newfstatat(k, uc, dirfd, path_at, buf, flags, *_):
    if flags & AT_EMPTY_PATH and k.p.read_string(path_at) == b"":
        return sys_fstat(k, uc, dirfd, buf)
    raise SyscallError(ENOENT)


def sys_readlink(k, uc, path_at, buf, size, *_):
    path = k.p.read_string(path_at)
    if path != b"/proc/self/exe":
        raise SyscallError(ENOENT)
    target = k.p.argv0.encode()[:size]
    k.p.write(buf, target)
    return len(target)


def sys_readlinkat(k, uc, dirfd, path_at, buf, size, *_):
    return sys_readlink(k, uc, path_at, buf, size)


def sys_ioctl(k, uc, fd, request, *_):
    if fd not in (0, 1, 2) and fd not in k.open:
        raise SyscallError(EBADF)
    raise SyscallError(ENOTTY)  # no terminal is ever the program's (TCGETS, TIOCGWINSZ ...)


# ---- memory ------------------------------------------------------------------------------

def sys_brk(k, uc, address, *_):
    p = k.p
    if address and p.brk_start <= address < p.mmap_top:
        new = page_up(address)
        if new < page_up(p.brk):
            p.write(new, bytes(page_up(p.brk) - new))  # shrinking gives zeros back
        p.brk = address
    return p.brk


def sys_mmap(k, uc, address, length, prot, flags, fd, offset):
    p = k.p
    if not length:
        raise SyscallError(EINVAL)
    size = page_up(length)
    if flags & MAP_FIXED:
        start = address
        if start % PAGE or start + size > len(p.ram):
            raise SyscallError(EINVAL if start % PAGE else ENOMEM)
    else:
        start = p.mmap_top - size
        if start <= page_up(p.brk):
            raise SyscallError(ENOMEM)
        p.mmap_top = start
    if not flags & MAP_ANONYMOUS and fd not in k.open:
        raise SyscallError(EBADF)
    if flags & MAP_FIXED:  # fresh pages below the last mapping were never used: already zero
        p.write(start, bytes(size))
    if not flags & MAP_ANONYMOUS:
        p.write(start, k.open[fd][1][offset:offset + length])
    return start


def sys_munmap(k, uc, address, length, *_):
    if address % PAGE:
        raise SyscallError(EINVAL)
    return 0


def sys_mprotect(k, uc, address, length, prot, *_):
    if address % PAGE:
        raise SyscallError(EINVAL)
    return 0


# ---- the process and its environment ------------------------------------------------------

def sys_arch_prctl(k, uc, code, address, *_):
    if code == ARCH_SET_FS:
        uc.reg_write(x86.UC_X86_REG_FS_BASE, address)
        return 0
    if code == ARCH_SET_GS:
        uc.reg_write(x86.UC_X86_REG_GS_BASE, address)
        return 0
    if code in (ARCH_GET_FS, ARCH_GET_GS):
        value = uc.reg_read(x86.UC_X86_REG_FS_BASE if code == ARCH_GET_FS else x86.UC_X86_REG_GS_BASE)
        k.p.write(address, struct.pack("<Q", value))
        return 0
    raise SyscallError(EINVAL)


def sys_set_tid_address(k, uc, *_):
    return k.p.tid


def sys_getpid(k, uc, *_):
    return k.p.tid


def sys_getppid(k, uc, *_):
    return k.p.tid - 1


def sys_ids(k, uc, *_):
    return 1000


def sys_set_id(k, uc, wanted, *_):
    if wanted != 1000:
        raise SyscallError(1)  # EPERM: the process is not privileged
    return 0


def sys_uname(k, uc, buf, *_):
    fields = (b"Linux", b"minivmm", b"6.1.0-minivmm", b"#1 SMP", b"x86_64", b"(none)")
    k.p.write(buf, b"".join(f.ljust(65, b"\0") for f in fields))
    return 0


def sys_prlimit64(k, uc, pid, resource, new, old, *_):
    if old:
        limits = {3: (8 << 20, (1 << 64) - 1), 7: (1024, 4096)}  # RLIMIT_STACK, RLIMIT_NOFILE
        soft, hard = limits.get(resource, ((1 << 64) - 1, (1 << 64) - 1))
        k.p.write(old, struct.pack("<QQ", soft, hard))
    return 0


def sys_getrlimit(k, uc, resource, old, *_):
    return sys_prlimit64(k, uc, 0, resource, 0, old)


def sys_getrandom(k, uc, buf, count, flags, *_):
    count = min(count, 1 << 20)
    k.p.write(buf, k.random.randbytes(count))
    return count


def sys_clock_gettime(k, uc, clock, buf, *_):
    ns = k.now_ns()
    k.p.write(buf, struct.pack("<qq", ns // 10**9, ns % 10**9))
    return 0


def sys_gettimeofday(k, uc, buf, *_):
    ns = k.now_ns()
    if buf:
        k.p.write(buf, struct.pack("<qq", ns // 10**9, ns % 10**9 // 1000))
    return 0


def sys_time(k, uc, buf, *_):
    seconds = k.now_ns() // 10**9
    if buf:
        k.p.write(buf, struct.pack("<q", seconds))
    return seconds


def sys_nanosleep(k, uc, request, *_):
    seconds, nanos = struct.unpack("<qq", k.p.read(request, 16))
    k.calls += (seconds * 10**9 + nanos) // VIRTUAL_NS_PER_SYSCALL  # virtual time passes
    return 0


def sys_sched_getaffinity(k, uc, pid, size, mask, *_):
    if size < 8:
        raise SyscallError(EINVAL)
    k.p.write(mask, struct.pack("<Q", 1))  # one CPU
    return 8


def sys_zero(k, uc, *_):
    return 0


def sys_rt_sigaction(k, uc, signo, act, old, size, *_):
    if not 1 <= signo <= 64 or size != 8 or (act and signo in (9, 19)):  # SIGKILL, SIGSTOP
        raise SyscallError(EINVAL)
    if old:
        write_action(k.p, old, k.signals.actions.get(signo, Action()))
    if act:
        k.signals.actions[signo] = read_action(k.p, act)
    return 0


SIG_BLOCK, SIG_UNBLOCK, SIG_SETMASK = 0, 1, 2
UNBLOCKABLE = (1 << 8) | (1 << 18)  # SIGKILL, SIGSTOP


def sys_rt_sigprocmask(k, uc, how, new, old, size, *_):
    if size != 8:
        raise SyscallError(EINVAL)
    if old:
        k.p.write(old, struct.pack("<Q", k.signals.blocked))
    if new:
        mask = struct.unpack("<Q", k.p.read(new, 8))[0] & ~UNBLOCKABLE
        if how == SIG_BLOCK:
            k.signals.blocked |= mask
        elif how == SIG_UNBLOCK:
            k.signals.blocked &= ~mask
        elif how == SIG_SETMASK:
            k.signals.blocked = mask
        else:
            raise SyscallError(EINVAL)
    return 0


def sys_sigaltstack(k, uc, new, old, *_):
    if old:
        sp, flags, size = k.signals.altstack
        k.p.write(old, struct.pack("<QiiQ", sp, flags, 0, size))
    if new:
        sp, flags, _, size = struct.unpack("<QiiQ", k.p.read(new, 24))
        k.signals.altstack = (sp, flags, size)
    return 0


def sys_rt_sigreturn(k, uc, *_):
    k.signals.sigreturn(uc)
    return RETURNED


def sys_tgkill(k, uc, tgid, tid, signo, *_):
    return _raise(k, uc, signo)


def sys_kill(k, uc, pid, signo, *_):
    return _raise(k, uc, signo)


def _raise(k, uc, signo):
    if not 0 <= signo <= 64:
        raise SyscallError(EINVAL)
    if signo == 0:
        return 0
    action = k.signals.actions.get(signo)
    handler = action.handler if action else SIG_DFL
    if handler == SIG_IGN or (handler == SIG_DFL and signo not in FATAL_BY_DEFAULT):
        return 0
    uc.reg_write(x86.UC_X86_REG_RAX, 0)
    if handler != SIG_DFL and k.signals.deliver(uc, signo, -6, 0, 0):  # SI_TKILL
        return RETURNED
    k.killed = signo
    return 0


def sys_exit(k, uc, status, *_):
    k.p.exit_status = status & 0xFF
    return 0


def sys_enosys(k, uc, *_):
    raise SyscallError(ENOSYS)


TABLE = {
    0: ("read", sys_read), 1: ("write", sys_write), 2: ("open", sys_open), 3: ("close", sys_close),
    7: ("poll", sys_poll),
    5: ("fstat", sys_fstat), 17: ("pread64", sys_pread64), 21: ("access", sys_access),
    8: ("lseek", sys_lseek), 9: ("mmap", sys_mmap), 10: ("mprotect", sys_mprotect), 11: ("munmap", sys_munmap),
    12: ("brk", sys_brk), 13: ("rt_sigaction", sys_rt_sigaction), 14: ("rt_sigprocmask", sys_rt_sigprocmask),
    15: ("rt_sigreturn", sys_rt_sigreturn), 62: ("kill", sys_kill), 200: ("tkill", sys_kill), 234: ("tgkill", sys_tgkill),
    16: ("ioctl", sys_ioctl), 20: ("writev", sys_writev), 24: ("sched_yield", sys_zero),
    28: ("madvise", sys_zero), 35: ("nanosleep", sys_nanosleep), 39: ("getpid", sys_getpid),
    72: ("fcntl", sys_fcntl), 79: ("getcwd", sys_getcwd), 105: ("setuid", sys_set_id), 106: ("setgid", sys_set_id),
    56: ("clone", sys_enosys), 57: ("fork", sys_enosys), 59: ("execve", sys_enosys), 60: ("exit", sys_exit),
    63: ("uname", sys_uname), 89: ("readlink", sys_readlink), 96: ("gettimeofday", sys_gettimeofday),
    97: ("getrlimit", sys_getrlimit), 102: ("getuid", sys_ids), 104: ("getgid", sys_ids),
    107: ("geteuid", sys_ids), 108: ("getegid", sys_ids), 110: ("getppid", sys_getppid),
    131: ("sigaltstack", sys_sigaltstack), 158: ("arch_prctl", sys_arch_prctl), 186: ("gettid", sys_getpid),
    201: ("time", sys_time), 202: ("futex", sys_zero), 204: ("sched_getaffinity", sys_sched_getaffinity),
    218: ("set_tid_address", sys_set_tid_address), 228: ("clock_gettime", sys_clock_gettime),
    231: ("exit_group", sys_exit), 257: ("openat", sys_openat), 262: ("newfstatat", sys_newfstatat),
    267: ("readlinkat", sys_readlinkat), 273: ("set_robust_list", sys_zero), 302: ("prlimit64", sys_prlimit64),
    318: ("getrandom", sys_getrandom), 334: ("rseq", sys_enosys),
}
