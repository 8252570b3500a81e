"""Processes: fork, vfork and clone of a process, wait4 and waitid, kill to other
processes and groups, process groups and sessions (kernel/fork.c, kernel/exit.c,
kernel/signal.c, kernel/sys.c). The process table and the scheduler are
:mod:`minivmm.linux.scheduler`; the VMM gives each new process its CPU and memory."""

from __future__ import annotations

import struct

from ..errno import EAGAIN, ECHILD, EINVAL, EPERM, ESRCH, SyscallError
from ..threads import Block, Wait
from .base import signed32
from .threads import CLONE_CHILD_CLEARTID, CLONE_CHILD_SETTID, CLONE_PARENT_SETTID, CLONE_SETTLS, CLONE_THREAD
from .threads import CLONE_VFORK, CLONE_VM, sys_clone, sys_clone3

SIGCHLD = 17
WNOHANG, WUNTRACED, WEXITED, WCONTINUED, WNOWAIT = 1, 2, 4, 8, 0x01000000
WALL_FLAGS = 0x40000000 | 0x80000000 | 0x20000000   # __WALL, __WCLONE, __WNOTHREAD
P_ALL, P_PID, P_PGID = 0, 1, 2
CLD_EXITED, CLD_KILLED = 1, 2


def _fork(k, flags: int, stack: int, parent_tid: int, child_tid: int, tls: int) -> int:
    """A new process (copy_process): a copy of this one, running from where the call
    returns, with RAX 0. CLONE_VM without CLONE_THREAD is vfork's sharing, made a copy
    here: the parent waits until the child execs or ends, as after vfork."""
    machine = k.machine
    if not machine.may_fork():
        raise SyscallError(EAGAIN)
    pid = machine.new_pid()
    child = k.fork(pid)
    child.threads.running.start = (stack, tls if flags & CLONE_SETTLS else None)
    child.threads.running.result = 0
    if flags & CLONE_CHILD_CLEARTID:
        child.threads.running.clear_child_tid = child_tid
    machine.kernels[pid] = child
    machine.forked.append((k, child))
    if flags & CLONE_PARENT_SETTID:
        k.p.write(parent_tid, struct.pack("<i", pid))
    if flags & CLONE_CHILD_SETTID:
        child.threads.running.settid = child_tid   # in its own memory, once the VMM made it
    if flags & CLONE_VFORK:
        k.threads.block(vfork_wait(pid, child))
    return pid


def vfork_wait(pid: int, child) -> Wait:
    """vfork's parent waits until its child ``pid`` execs or ends (None: it has ended
    and been reaped); the call then returns the child's id."""
    return Wait(None, ready=lambda: child is None or bool(child.p.execs) or child.p.exit_status is not None,
                finish=lambda how: pid, vfork=pid)


def sys_fork(k, uc, *_):
    return _fork(k, SIGCHLD, 0, 0, 0, 0)


def sys_vfork(k, uc, *_):
    return _fork(k, CLONE_VM | CLONE_VFORK | SIGCHLD, 0, 0, 0, 0)


def sys_clone_any(k, uc, flags, stack, parent_tid, child_tid, tls, *_):
    if flags & CLONE_THREAD:
        return sys_clone(k, uc, flags, stack, parent_tid, child_tid, tls)
    return _fork(k, flags, stack, parent_tid, child_tid, tls)


def sys_clone3_any(k, uc, args, size, *_):
    if size < 64 or size > 4096:
        raise SyscallError(EINVAL)
    flags, _, child_tid, parent_tid, _, stack, stack_size, tls = struct.unpack("<8Q", k.p.read(args, 64))
    if flags & CLONE_THREAD:
        return sys_clone3(k, uc, args, size)
    return _fork(k, flags, stack + stack_size if stack else 0, parent_tid, child_tid, tls)


def _candidates(k, which: int, ident: int) -> list:
    """The children a wait is for: any (P_ALL), one (P_PID), a group's (P_PGID)."""
    children = k.machine.children(k.p.tid)
    if which == P_PID:
        return [c for c in children if c.p.tid == ident]
    if which == P_PGID:
        return [c for c in children if c.p.group == ident]
    return children


def _wait(k, which: int, ident: int, options: int):
    """The child that ended (a zombie), or None with WNOHANG; waits otherwise."""
    candidates = _candidates(k, which, ident)
    if not candidates:
        raise SyscallError(ECHILD)
    ended = [c for c in candidates if c.p.status is not None]
    if ended:
        return ended[0]
    if options & WNOHANG:
        return None
    raise Block(lambda: not _candidates(k, which, ident) or any(c.p.status is not None
                                                                 for c in _candidates(k, which, ident)))


def _reap(k, child) -> None:
    del k.machine.kernels[child.p.tid]


def sys_wait4(k, uc, pid, status, options, rusage, *_):
    pid = signed32(pid)
    if options & ~(WNOHANG | WUNTRACED | WCONTINUED | WALL_FLAGS):
        raise SyscallError(EINVAL)
    which, ident = (P_ALL, 0) if pid == -1 else (P_PGID, k.p.group) if pid == 0 else \
        (P_PGID, -pid) if pid < 0 else (P_PID, pid)
    child = _wait(k, which, ident, options)
    if child is None:
        return 0
    if status:
        k.p.write(status, struct.pack("<i", child.p.status))
    if rusage:
        k.p.write(rusage, bytes(144))
    _reap(k, child)
    return child.p.tid


def sys_waitid(k, uc, which, ident, info, options, rusage, *_):
    if which not in (P_ALL, P_PID, P_PGID) or not options & WEXITED:
        raise SyscallError(EINVAL)
    child = _wait(k, which, signed32(ident), options)
    if info:
        if child is None:
            k.p.write(info, bytes(128))
        else:
            code, value = (CLD_EXITED, child.p.status >> 8) if child.p.status & 0x7F == 0 else \
                (CLD_KILLED, child.p.status & 0x7F)
            k.p.write(info, struct.pack("<iii4xiIi", SIGCHLD, 0, code, child.p.tid, 0, value).ljust(128, b"\0"))
    if child is not None and not options & WNOWAIT:
        _reap(k, child)
    return 0


def sys_kill(k, uc, pid, signo, *_):
    """kill_something_info: a process, the caller's group (0), every process (-1), a group."""
    pid, signo = signed32(pid), signed32(signo)
    if not 0 <= signo <= 64:
        raise SyscallError(EINVAL)
    machine = k.machine
    targets = machine.group(k.p.group) if pid == 0 else machine.live() if pid == -1 else \
        machine.group(-pid) if pid < 0 else [t for t in machine.live() if t.p.tid == pid]
    if not targets:
        raise SyscallError(ESRCH)
    if signo:
        for target in targets:
            target.signals.send(signo, 0, struct.pack("<iI", k.p.tid, 1000))   # SI_USER from this process
    return 0


def sys_getppid(k, uc, *_):
    return k.p.ppid


def sys_setpgid(k, uc, pid, pgid, *_):
    if signed32(pgid) < 0:
        raise SyscallError(EINVAL)
    target = _process(k, pid)
    if target is not k and target.p.ppid != k.p.tid:
        raise SyscallError(ESRCH)   # only itself or a child of its
    pid, pgid = target.p.tid, signed32(pgid)
    if target.p.session == target.p.tid:
        raise SyscallError(EPERM)   # a session leader keeps its group
    target.p.pgid = pgid or pid
    return 0


def _process(k, pid: int):
    """The live process ``pid`` (0: the caller's), or ESRCH."""
    pid = signed32(pid) or k.p.tid
    target = next((t for t in k.machine.live() if t.p.tid == pid), None)
    if target is None:
        raise SyscallError(ESRCH)
    return target


def sys_getpgid(k, uc, pid, *_):
    return _process(k, pid).p.group


def sys_getpgrp(k, uc, *_):
    return k.p.group


def sys_setsid(k, uc, *_):
    if any(t.p.group == k.p.tid for t in k.machine.live()):
        raise SyscallError(EPERM)   # already a group leader
    k.p.pgid = k.p.sid = k.p.tid
    return k.p.tid


def sys_getsid(k, uc, pid, *_):
    return _process(k, pid).p.session


TABLE = {
    56: ("clone", sys_clone_any), 57: ("fork", sys_fork), 58: ("vfork", sys_vfork), 61: ("wait4", sys_wait4),
    62: ("kill", sys_kill), 109: ("setpgid", sys_setpgid), 110: ("getppid", sys_getppid),
    111: ("getpgrp", sys_getpgrp), 112: ("setsid", sys_setsid), 121: ("getpgid", sys_getpgid),
    124: ("getsid", sys_getsid), 247: ("waitid", sys_waitid), 435: ("clone3", sys_clone3_any),
}
