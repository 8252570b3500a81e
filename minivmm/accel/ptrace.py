"""The kernel interfaces a supervisor of native processes needs, through ctypes:
ptrace(2), seccomp(2) and arch_prctl(2) on x86-64 Linux.

Constants are those of linux/ptrace.h, linux/seccomp.h, linux/filter.h, linux/audit.h
and asm/prctl.h; structures those of sys/user.h (user_regs_struct) and siginfo_t.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)
_libc.syscall.restype = ctypes.c_long

# requests
PTRACE_CONT, PTRACE_GETREGS, PTRACE_SETREGS = 7, 12, 13
PTRACE_SYSCALL, PTRACE_GETEVENTMSG, PTRACE_GETSIGINFO = 24, 0x4201, 0x4202
PTRACE_SEIZE, PTRACE_LISTEN = 0x4206, 0x4208
PTRACE_GETREGSET, NT_X86_XSTATE = 0x4204, 0x202
# options
PTRACE_O_TRACESYSGOOD, PTRACE_O_TRACEFORK, PTRACE_O_TRACEVFORK, PTRACE_O_TRACECLONE = 0x1, 0x2, 0x4, 0x8
PTRACE_O_TRACEEXEC, PTRACE_O_TRACESECCOMP, PTRACE_O_EXITKILL = 0x10, 0x80, 0x100000
# events (status >> 16)
EVENT_FORK, EVENT_VFORK, EVENT_CLONE, EVENT_EXEC, EVENT_SECCOMP, EVENT_STOP = 1, 2, 3, 4, 7, 128
WALL = 0x40000000                     # __WALL: threads and clone children too
SYSCALL_STOP = 0x80 | 5               # SIGTRAP | 0x80 under PTRACE_O_TRACESYSGOOD

# arch_prctl(2), and the calls a supervisor makes in a tracee
SYS_ARCH_PRCTL, SYS_TGKILL = 158, 234
SYS_MMAP, SYS_MUNMAP, SYS_BRK, SYS_RT_SIGACTION, SYS_GETITIMER, SYS_SIGALTSTACK, SYS_RSEQ = 9, 11, 12, 13, 36, 131, 334
ADDR_NO_RANDOMIZE = 0x0040000         # personality(2)
ARCH_GET_CPUID, ARCH_SET_CPUID = 0x1011, 0x1012

# seccomp(2) and classic BPF
PR_SET_NO_NEW_PRIVS = 38
SYS_SECCOMP, SECCOMP_SET_MODE_FILTER = 317, 1
SECCOMP_RET_ALLOW, SECCOMP_RET_TRACE = 0x7FFF0000, 0x7FF00000
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
BPF_LD_W_ABS, BPF_JEQ_K, BPF_AND_K, BPF_RET_K = 0x20, 0x15, 0x54, 0x06


class Regs(ctypes.Structure):
    """struct user_regs_struct (sys/user.h), in its order."""
    _fields_ = [(name, ctypes.c_ulonglong) for name in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi",
        "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")]

    def copy(self) -> Regs:
        return Regs.from_buffer_copy(self)


class SigInfo(ctypes.Structure):
    """The head of siginfo_t: number, errno, code, then the union (si_addr first for faults)."""
    _fields_ = [("signo", ctypes.c_int), ("errno", ctypes.c_int), ("code", ctypes.c_int), ("pad", ctypes.c_int),
                ("addr", ctypes.c_ulonglong), ("rest", ctypes.c_byte * 112)]


def _check(result: int, what: str) -> int:
    if result == -1:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")
    return result


def ptrace(request: int, tid: int, addr: int = 0, data=0) -> int:
    return _check(_libc.ptrace(request, tid, addr, data), f"ptrace({request:#x}, {tid})")


def seize(tid: int, options: int) -> None:
    ptrace(PTRACE_SEIZE, tid, 0, options)


def resume(tid: int, signo: int = 0, request: int = PTRACE_CONT) -> bool:
    """Restart a stopped tracee; False when it is gone (killed meanwhile: ESRCH)."""
    if _libc.ptrace(request, tid, 0, signo) == -1:
        error = ctypes.get_errno()
        if error == errno.ESRCH:
            return False
        raise OSError(error, f"ptrace resume {tid}: {os.strerror(error)}")
    return True


def get_regs(tid: int) -> Regs:
    regs = Regs()
    ptrace(PTRACE_GETREGS, tid, 0, ctypes.addressof(regs))
    return regs


def set_regs(tid: int, regs: Regs) -> None:
    ptrace(PTRACE_SETREGS, tid, 0, ctypes.addressof(regs))


def siginfo(tid: int) -> SigInfo:
    info = SigInfo()
    ptrace(PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(info))
    return info


def event_message(tid: int) -> int:
    value = ctypes.c_ulong()
    ptrace(PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(value))
    return value.value


def xstate(tid: int, size: int = 1 << 16) -> bytes:
    """The task's extended state (PTRACE_GETREGSET NT_X86_XSTATE): the standard-format
    XSAVE image the kernel keeps, XSTATE_BV saying which components are not initial."""
    buffer = ctypes.create_string_buffer(size)
    vector = (ctypes.c_void_p * 2)(ctypes.addressof(buffer), size)   # struct iovec
    ptrace(PTRACE_GETREGSET, tid, NT_X86_XSTATE, ctypes.addressof(vector))
    return buffer.raw[:vector[1]]


def no_randomize() -> None:
    """personality(ADDR_NO_RANDOMIZE) for the calling process (a child before execve):
    its stack, brk and mmap base are where the layout puts them, as rr runs programs."""
    current = _libc.personality(0xFFFFFFFF)
    _check(_libc.personality(current | ADDR_NO_RANDOMIZE), "personality(ADDR_NO_RANDOMIZE)")


def tgkill(tgid: int, tid: int, signo: int) -> None:
    _libc.syscall(ctypes.c_long(SYS_TGKILL), ctypes.c_long(tgid), ctypes.c_long(tid), ctypes.c_long(signo))


def set_cpuid_faulting(enabled: bool) -> int:
    """arch_prctl(ARCH_SET_CPUID, not enabled) for the calling thread: 0, or -errno
    (ENODEV where the CPU or kernel has no CPUID faulting)."""
    result = _libc.syscall(ctypes.c_long(SYS_ARCH_PRCTL), ctypes.c_long(ARCH_SET_CPUID),
                           ctypes.c_long(0 if enabled else 1))
    return -ctypes.get_errno() if result == -1 else result


def cpuid_faulting_available() -> bool:
    """Whether CPUID can be made to fault here: ARCH_SET_CPUID asked to leave CPUID
    enabled, which changes nothing but fails with ENODEV on a machine without CPUID
    faulting (arch/x86/kernel/process.c, set_cpuid_mode)."""
    return set_cpuid_faulting(False) == 0


OPEN_CALLS = (2, 257, 437)            # open, openat, openat2
TRACE_OPEN, TRACE_CPUID_PRCTL, TRACE_CALL = 1, 2, 3   # SECCOMP_RET_DATA: what the supervisor is asked


def _assemble(program: list[tuple]) -> bytes:
    """Classic BPF from (code, k, true label, false label) and ("label",) lines: a jump
    goes to its label, 0 is the next instruction."""
    lines = [line for line in program if len(line) > 1]
    at, pc = {}, 0
    for line in program:
        if len(line) == 1:
            at[line[0]] = pc
        else:
            pc += 1
    out = b""
    for pc, (code, k, *targets) in enumerate(lines):
        jt, jf = (at[t] - pc - 1 if t else 0 for t in (targets + [0, 0])[:2])
        out += struct.pack("<HBBI", code, jt, jf, k)
    return out


def supervisor_filter(every_call: bool = False) -> bytes:
    """A seccomp filter sending the supervisor (SECCOMP_RET_TRACE, seccomp(2)) the x86-64
    calls that open a file (x32's too: their numbers with X32_SYSCALL_BIT) and
    arch_prctl's ARCH_GET_CPUID and ARCH_SET_CPUID; everything else is allowed, or with
    ``every_call`` sent too (TRACE_CALL: the supervisor counts them). The layout of
    struct seccomp_data: nr at 0, arch at 4, args[0] at 16 (its low half)."""
    rest = SECCOMP_RET_TRACE | TRACE_CALL if every_call else SECCOMP_RET_ALLOW
    return _assemble([
        (BPF_LD_W_ABS, 4),
        (BPF_JEQ_K, AUDIT_ARCH_X86_64, 0, "allow"),
        (BPF_LD_W_ABS, 0),
        (BPF_AND_K, ~X32_SYSCALL_BIT & 0xFFFFFFFF),
        *((BPF_JEQ_K, nr, "open") for nr in OPEN_CALLS),
        (BPF_JEQ_K, SYS_ARCH_PRCTL, 0, "rest"),
        (BPF_LD_W_ABS, 16),
        (BPF_JEQ_K, ARCH_GET_CPUID, "prctl"),
        (BPF_JEQ_K, ARCH_SET_CPUID, "prctl"),
        ("rest",), (BPF_RET_K, rest),
        ("allow",), (BPF_RET_K, SECCOMP_RET_ALLOW),
        ("open",), (BPF_RET_K, SECCOMP_RET_TRACE | TRACE_OPEN),
        ("prctl",), (BPF_RET_K, SECCOMP_RET_TRACE | TRACE_CPUID_PRCTL),
    ])


def install_filter(program: bytes) -> None:
    """In the calling process (a child before execve): no_new_privs, which an unprivileged
    filter needs, then the filter. Both survive execve and are inherited by children."""
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    code = ctypes.create_string_buffer(program, len(program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    fprog = SockFprog(len(program) // 8, ctypes.addressof(code))
    _check(_libc.syscall(ctypes.c_long(SYS_SECCOMP), ctypes.c_long(SECCOMP_SET_MODE_FILTER), ctypes.c_long(0),
                         ctypes.c_void_p(ctypes.addressof(fprog))), "seccomp(SECCOMP_SET_MODE_FILTER)")
