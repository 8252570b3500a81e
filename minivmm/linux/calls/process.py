"""The process and its environment (kernel/sys.c, kernel/time/, arch/x86/kernel/
process_64.c): identity, limits, time, randomness, FS/GS bases, exit. One thread, no
children: clone, fork and vfork return ENOSYS (execve is calls/execve.py)."""

from __future__ import annotations

import struct

import unicorn.x86_const as x86

from ..clock import WALL, cpu_clock, resolution
from ..errno import EINTR, EINVAL, ENODATA, ENOSPC, EOPNOTSUPP, EPERM, SyscallError
from ..process import AT_MINSIGSTKSZ
from ..signals import ERESTART_RESTARTBLOCK, ERESTARTNOHAND
from ..threads import Wait
from ..timers import clock_kind
from .base import signed32, sys_enosys, sys_zero

ARCH_SET_GS, ARCH_SET_FS, ARCH_GET_FS, ARCH_GET_GS = 0x1001, 0x1002, 0x1003, 0x1004
ARCH_GET_XCOMP_SUPP, ARCH_GET_XCOMP_PERM, ARCH_REQ_XCOMP_PERM = 0x1021, 0x1022, 0x1023
ARCH_GET_XCOMP_GUEST_PERM, ARCH_REQ_XCOMP_GUEST_PERM = 0x1024, 0x1025
XFEATURE_MAX = 20                      # enum xfeature's count, APX's included (6.16)
XFEATURE_XTILE_DATA = 18
UID = 1000
INFINITY = (1 << 64) - 1               # RLIM_INFINITY
CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_PROCESS_CPUTIME_ID = 0, 1, 2
TIMER_ABSTIME = 1


def sys_arch_prctl(k, uc, code, address, *_):
    if code in (ARCH_SET_FS, ARCH_SET_GS):
        if address >> 47 not in (0, 0x1FFFF):
            raise SyscallError(EPERM)  # not canonical
        uc.reg_write(x86.UC_X86_REG_FS_BASE if code == ARCH_SET_FS else x86.UC_X86_REG_GS_BASE, address)
        return 0
    if code in (ARCH_GET_FS, ARCH_GET_GS):
        value = uc.reg_read(x86.UC_X86_REG_FS_BASE if code == ARCH_GET_FS else x86.UC_X86_REG_GS_BASE)
        k.p.write(address, struct.pack("<Q", value))
        return 0
    return _xstate_prctl(k, code, address)


def _xstate_prctl(k, code: int, argument: int) -> int:
    """fpu_xstate_prctl (arch/x86/kernel/fpu/xstate.c): the XSAVE features Linux supports,
    those the process (or a guest of a VMM in it) may use, and asking for a dynamic one:
    AMX's tile data is the only one, by its number, XFEATURE_XTILE_DATA
    (xstate_request_perm): EINVAL past the last feature, EOPNOTSUPP for any other or where
    the CPU lacks it, ENOSPC where the process's alternate stack would not hold a frame
    with it (validate_sigaltstack; not asked of a guest's)."""
    p = k.p
    values = {ARCH_GET_XCOMP_SUPP: p.xfeatures, ARCH_GET_XCOMP_PERM: p.xcomp_perm,
              ARCH_GET_XCOMP_GUEST_PERM: p.xcomp_guest_perm}
    if code in values:
        p.write(argument, struct.pack("<Q", values[code]))
        return 0
    if code not in (ARCH_REQ_XCOMP_PERM, ARCH_REQ_XCOMP_GUEST_PERM):
        raise SyscallError(EINVAL)
    if argument >= XFEATURE_MAX:
        raise SyscallError(EINVAL)
    wanted = 1 << XFEATURE_XTILE_DATA
    if argument != XFEATURE_XTILE_DATA or not p.xfeatures & wanted:
        raise SyscallError(EOPNOTSUPP)
    if code == ARCH_REQ_XCOMP_GUEST_PERM:
        p.xcomp_guest_perm |= wanted
        return 0
    size = k.signals.altstack[2]
    if not p.xcomp_perm & wanted and size and size < p.aux(AT_MINSIGSTKSZ):   # the frame with the tiles
        raise SyscallError(ENOSPC)
    p.xcomp_perm |= wanted
    return 0


def sys_getpid(k, uc, *_):
    return k.p.tid


def sys_ids(k, uc, *_):
    return UID


def sys_set_id(k, uc, wanted, *_):
    if wanted != UID:
        raise SyscallError(EPERM)  # the process is not privileged
    return 0


def sys_setresid(k, uc, real, effective, saved, *_):
    """setresuid and setresgid: each id left (-1) or the one the process has."""
    if any(signed32(wanted) not in (-1, UID) for wanted in (real, effective, saved)):
        raise SyscallError(EPERM)
    return 0


def sys_getresid(k, uc, real, effective, saved, *_):
    for address in (real, effective, saved):
        k.p.write(address, struct.pack("<I", UID))
    return 0


def sys_uname(k, uc, buf, *_):
    fields = (b"Linux", b"minivmm", b"6.1.0-minivmm", b"#1 SMP", b"x86_64", b"(none)")
    k.p.write(buf, b"".join(f.ljust(65, b"\0") for f in fields))
    return 0


def sys_sysinfo(k, uc, buf, *_):
    """struct sysinfo of the VM: its RAM, what no mapping holds free, one process, no
    swap, no load (kernel/sys.c do_sysinfo)."""
    memory = k.p.memory
    free = memory.pages.count(0) * 4096
    k.p.write(buf, struct.pack("<q3Q6QHH4xQQI", k.clock.since_boot() // 10**9, 0, 0, 0, memory.size, free,
                               0, 0, 0, 0, 1, 0, 0, 0, 1).ljust(112, b"\0"))
    return 0


def sys_capget(k, uc, header, data, *_):
    """No capabilities (a process of an unprivileged user): two zero sets of v3."""
    if data:
        k.p.write(data, bytes(24))
    return 0


PR_SET_PDEATHSIG, PR_GET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET_DUMPABLE = 1, 2, 3, 4
PR_SET_NAME, PR_GET_NAME, PR_SET_NO_NEW_PRIVS, PR_GET_NO_NEW_PRIVS = 15, 16, 38, 39


def sys_prctl(k, uc, option, arg2, *_):
    """The options programs ask of a process they run in (kernel/sys.c): its name (16
    bytes, comm), dumpable, no_new_privs, the parent-death signal; others EINVAL."""
    if option == PR_SET_NAME:
        k.p.comm = k.p.read(arg2, 16).split(b"\0", 1)[0][:15]
    elif option == PR_GET_NAME:
        k.p.write(arg2, k.p.name().ljust(16, b"\0"))
    elif option == PR_GET_PDEATHSIG:
        k.p.write(arg2, bytes(4))
    elif option == PR_GET_DUMPABLE:
        return 1
    elif option not in (PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_GET_NO_NEW_PRIVS):
        raise SyscallError(EINVAL)
    return 0


def sys_no_xattr(k, uc, *_):
    """getxattr and its kin: no attribute is there (minivmm's files have none)."""
    raise SyscallError(ENODATA)


LIMITS = {3: (8 << 20, INFINITY), 7: (1024, 4096)}  # RLIMIT_STACK, RLIMIT_NOFILE; the rest unlimited


def sys_prlimit64(k, uc, pid, resource, new, old, *_):
    if resource >= 16:
        raise SyscallError(EINVAL)
    if old:
        k.p.write(old, struct.pack("<QQ", *LIMITS.get(resource, (INFINITY, INFINITY))))
    return 0


def sys_getrlimit(k, uc, resource, old, *_):
    return sys_prlimit64(k, uc, 0, resource, 0, old)


def sys_getrandom(k, uc, buf, count, flags, *_):
    count = min(count, 1 << 25)  # random: reads of more than 32 MiB return less
    k.p.write(buf, k.random.randbytes(count))
    return count


def timespec(ns: int) -> bytes:
    return struct.pack("<qq", ns // 10**9, ns % 10**9)


def read_timespec(k, address: int) -> int:
    """A struct timespec in nanoseconds; EINVAL unless it is one (timespec64_valid)."""
    seconds, nanos = struct.unpack("<qq", k.p.read(address, 16))
    if seconds < 0 or not 0 <= nanos < 10**9:
        raise SyscallError(EINVAL)
    return seconds * 10**9 + nanos


def _clock_id(k, clock: int) -> int:
    """The clock id a call names, EINVAL for a CPU-time clock of no thread or process
    here (posix-cpu-timers.c, lookup_task: pid 0 is the caller)."""
    clock = signed32(clock)
    cpu = cpu_clock(clock)
    if cpu is not None:
        pid, _which, per_thread = cpu
        known = k.threads.all if per_thread else (k.p.tid, *k.machine.kernels)
        if pid and pid not in known:
            raise SyscallError(EINVAL)
    return clock


def sys_clock_gettime(k, uc, clock, buf, *_):
    k.p.write(buf, timespec(k.clock.read(_clock_id(k, clock))))
    return 0


def sys_clock_getres(k, uc, clock, buf, *_):
    clock = _clock_id(k, clock)
    k.clock.read(clock)  # EINVAL for no clock
    if buf:
        k.p.write(buf, timespec(resolution(clock)))
    return 0


def sys_gettimeofday(k, uc, buf, tz, *_):
    ns = k.clock.read(CLOCK_REALTIME)
    if buf:
        k.p.write(buf, struct.pack("<qq", ns // 10**9, ns % 10**9 // 1000))
    if tz:
        k.p.write(tz, bytes(8))   # sys_tz: no minutes west, no DST (the vDSO answers the same)
    return 0


def sys_getcpu(k, uc, cpu, node, *_):
    """The one CPU, node 0 (sched_getaffinity's mask; the vDSO answers the same)."""
    for address in (cpu, node):
        if address:
            k.p.write(address, bytes(4))
    return 0


def sys_time(k, uc, buf, *_):
    seconds = k.clock.read(CLOCK_REALTIME) // 10**9
    if buf:
        k.p.write(buf, struct.pack("<q", seconds))
    return seconds


def _sleep(k, clock: int, absolute: bool, request: int, remain: int) -> int:
    """hrtimer_nanosleep: until the time ``request`` says on ``clock``, or a signal:
    EINTR with a handler, the time left written to ``remain`` for a relative sleep."""
    ns = read_timespec(k, request)
    if clock_kind(clock):   # its own CPU time, which does not move while it sleeps
        if clock != CLOCK_PROCESS_CPUTIME_ID:
            raise SyscallError(EINVAL)  # posix_cpu_nsleep: not on the calling thread's clock
        until = None
    elif absolute:
        until = ns - (k.clock.wall_offset() if clock in WALL else 0)
    else:
        until = k.clock.since_boot() + ns
    if k.busy():   # the thread sleeps; the others run meanwhile
        if k.signals.interrupting():
            raise SyscallError(EINTR)
        k.threads.block(Wait(None, until=until, finish=lambda how: _slept(k, how, absolute, until, remain)))
        return 0
    if k.wait(until):
        return 0
    if absolute or until is None:
        raise SyscallError(ERESTARTNOHAND)
    if remain:
        k.p.write(remain, timespec(max(until - k.clock.since_boot(), 0)))
    raise SyscallError(ERESTART_RESTARTBLOCK)


def _slept(k, how: str, absolute: bool, until: int | None, remain: int) -> int:
    """A thread's sleep ended: 0 on time, EINTR for a signal with the time left written
    for a relative sleep (a handler runs: ERESTART_RESTARTBLOCK and ERESTARTNOHAND are EINTR)."""
    if how != "signal":
        return 0
    if remain and not absolute and until is not None:
        try:
            k.p.write(remain, timespec(max(until - k.clock.since_boot(), 0)))
        except SyscallError:
            pass
    return -EINTR


def sys_nanosleep(k, uc, request, remain, *_):
    return _sleep(k, CLOCK_MONOTONIC, False, request, remain)


def sys_clock_nanosleep(k, uc, clock, flags, request, remain, *_):
    return _sleep(k, signed32(clock), bool(flags & TIMER_ABSTIME), request, remain)


def sys_sched_getaffinity(k, uc, pid, size, mask, *_):
    if size < 8 or size % 8:
        raise SyscallError(EINVAL)
    k.p.write(mask, struct.pack("<Q", 1))  # one CPU
    return 8


def sys_exit_group(k, uc, status, *_):
    k.p.exit_status = status & 0xFF
    return 0


TABLE = {
    35: ("nanosleep", sys_nanosleep), 39: ("getpid", sys_getpid),
    63: ("uname", sys_uname), 96: ("gettimeofday", sys_gettimeofday),
    97: ("getrlimit", sys_getrlimit), 160: ("setrlimit", sys_zero), 102: ("getuid", sys_ids),
    104: ("getgid", sys_ids), 105: ("setuid", sys_set_id), 106: ("setgid", sys_set_id), 107: ("geteuid", sys_ids),
    108: ("getegid", sys_ids), 117: ("setresuid", sys_setresid), 118: ("getresuid", sys_getresid),
    119: ("setresgid", sys_setresid), 120: ("getresgid", sys_getresid),
    158: ("arch_prctl", sys_arch_prctl), 201: ("time", sys_time),
    204: ("sched_getaffinity", sys_sched_getaffinity), 228: ("clock_gettime", sys_clock_gettime),
    229: ("clock_getres", sys_clock_getres), 230: ("clock_nanosleep", sys_clock_nanosleep),
    231: ("exit_group", sys_exit_group), 302: ("prlimit64", sys_prlimit64),
    309: ("getcpu", sys_getcpu), 318: ("getrandom", sys_getrandom), 99: ("sysinfo", sys_sysinfo), 115: ("getgroups", sys_zero),
    125: ("capget", sys_capget), 157: ("prctl", sys_prctl), 221: ("fadvise64", sys_zero),
    191: ("getxattr", sys_no_xattr), 192: ("lgetxattr", sys_no_xattr), 193: ("fgetxattr", sys_no_xattr),
    194: ("listxattr", sys_zero), 195: ("llistxattr", sys_zero), 196: ("flistxattr", sys_zero), 334: ("rseq", sys_enosys),
}
