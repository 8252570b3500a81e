"""Threads: clone and clone3 of a thread, futex, the thread's id and robust list,
sched_yield, and exit of one thread (kernel/fork.c, kernel/futex/, kernel/exit.c).
The scheduler that runs them is :mod:`minivmm.linux.threads`."""

from __future__ import annotations

import struct

from ..errno import EAGAIN, EINTR, EINVAL, ENOSYS, ESRCH, ETIMEDOUT, SyscallError
from ..scheduler import MAX_TASKS
from ..threads import MAX_THREADS, Wait
from .base import signed32
from .process import read_timespec

CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND, CLONE_VFORK = 0x100, 0x200, 0x400, 0x800, 0x4000
CLONE_THREAD, CLONE_SETTLS, CLONE_PARENT_SETTID, CLONE_CHILD_CLEARTID = 0x10000, 0x80000, 0x100000, 0x200000
CLONE_CHILD_SETTID = 0x1000000
FUTEX_WAIT, FUTEX_WAKE, FUTEX_REQUEUE, FUTEX_CMP_REQUEUE, FUTEX_WAKE_OP = 0, 1, 3, 4, 5
FUTEX_WAIT_BITSET, FUTEX_WAKE_BITSET = 9, 10
FUTEX_PRIVATE_FLAG, FUTEX_CLOCK_REALTIME, FUTEX_CMD_MASK = 128, 256, ~(128 | 256)
CLOCK_REALTIME = 0


def _thread(k, flags: int, stack: int, parent_tid: int, child_tid: int, tls: int) -> int:
    """A new thread of the process (copy_process with CLONE_THREAD): it starts where the
    caller returns, with RAX 0, its own stack and TLS; the caller gets its id."""
    if flags & (CLONE_VM | CLONE_SIGHAND) != CLONE_VM | CLONE_SIGHAND:
        raise SyscallError(EINVAL)   # a thread shares the address space and the handlers
    if len(k.threads.all) >= MAX_THREADS or k.machine.tasks() >= MAX_TASKS:
        raise SyscallError(EAGAIN)
    thread = k.threads.spawn()
    thread.blocked = k.signals.blocked          # the mask is inherited; the alternate stack is not
    thread.start = (stack, tls if flags & CLONE_SETTLS else None)
    thread.result = 0
    if flags & CLONE_PARENT_SETTID:
        k.p.write(parent_tid, struct.pack("<i", thread.tid))
    if flags & CLONE_CHILD_SETTID:
        k.p.write(child_tid, struct.pack("<i", thread.tid))
    if flags & CLONE_CHILD_CLEARTID:
        thread.clear_child_tid = child_tid
    k.on_clone(thread)
    return thread.tid


def sys_clone(k, uc, flags, stack, parent_tid, child_tid, tls, *_):
    return _thread(k, flags, stack, parent_tid, child_tid, tls)


def sys_clone3(k, uc, args, size, *_):
    """struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal, stack,
    stack_size, tls (then set_tid, set_tid_size, cgroup, which a thread leaves 0)."""
    if size < 64 or size > 4096:
        raise SyscallError(EINVAL)
    flags, _, child_tid, parent_tid, exit_signal, stack, stack_size, tls = struct.unpack("<8Q", k.p.read(args, 64))
    if flags & CLONE_THREAD and exit_signal:
        raise SyscallError(EINVAL)
    return _thread(k, flags, stack + stack_size if stack else 0, parent_tid, child_tid, tls)


def sys_gettid(k, uc, *_):
    return k.threads.current


def sys_set_tid_address(k, uc, address, *_):
    k.threads.running.clear_child_tid = address
    return k.threads.current


def sys_set_robust_list(k, uc, head, size, *_):
    if size != 24:   # sizeof(struct robust_list_head)
        raise SyscallError(EINVAL)
    k.threads.running.robust_list = (head, size)
    return 0


def sys_get_robust_list(k, uc, tid, head, size, *_):
    thread = k.threads.all.get(signed32(tid) or k.threads.current)
    if thread is None:
        raise SyscallError(ESRCH)
    k.p.write(head, struct.pack("<Q", thread.robust_list[0]))
    k.p.write(size, struct.pack("<Q", 24))
    return 0


def sys_sched_yield(k, uc, *_):
    if k.busy():
        k.threads.switch_wanted = True
    return 0


def sys_exit(k, uc, status, *_):
    """One thread ends (do_exit): its clear_child_tid is zeroed and woken (mm_release);
    the process ends with the last."""
    threads = k.threads
    if not threads.many:
        k.p.exit_status = status & 0xFF
        return 0
    thread = threads.running
    if thread.clear_child_tid:
        try:
            k.p.write(thread.clear_child_tid, b"\0\0\0\0")
            threads.wake(thread.clear_child_tid, 1)
        except SyscallError:
            pass   # an address it cannot write: nothing is woken (put_user fails silently)
    del threads.all[thread.tid]       # the scheduler finds it gone and saves nothing of it
    threads.switch_wanted = True
    return 0


def sys_futex(k, uc, address, op, value, timeout, address2, value3, *_):
    command = op & FUTEX_CMD_MASK
    value = signed32(value) & 0xFFFFFFFF
    if command in (FUTEX_WAIT, FUTEX_WAIT_BITSET):
        bitset = 0xFFFFFFFF if command == FUTEX_WAIT else value3 & 0xFFFFFFFF
        if not bitset or (op & FUTEX_CLOCK_REALTIME and command == FUTEX_WAIT):
            raise SyscallError(EINVAL if not bitset else ENOSYS)
        if address % 4:
            raise SyscallError(EINVAL)
        until = None
        if timeout:
            ns = read_timespec(k, timeout)
            if command == FUTEX_WAIT:       # relative, on CLOCK_MONOTONIC
                until = k.clock.since_boot() + ns
            else:                           # absolute, on the clock the flag names
                until = ns - (k.clock.wall_offset() if op & FUTEX_CLOCK_REALTIME else 0)
        current = struct.unpack("<I", k.p.read(address, 4))[0]
        if current != value:
            raise SyscallError(EAGAIN)
        if until is not None and k.clock.since_boot() >= until:
            raise SyscallError(ETIMEDOUT)
        if k.signals.interrupting():   # a signal it takes is pending: it does not sleep
            raise SyscallError(EINTR)
        k.threads.block(Wait(address, bitset, until, finish=_woken))
        return 0
    if command in (FUTEX_WAKE, FUTEX_WAKE_BITSET):
        bitset = 0xFFFFFFFF if command == FUTEX_WAKE else value3 & 0xFFFFFFFF
        if not bitset:
            raise SyscallError(EINVAL)
        return _woke(k, k.threads.wake(address, value, bitset))
    if command in (FUTEX_REQUEUE, FUTEX_CMP_REQUEUE):
        if command == FUTEX_CMP_REQUEUE and struct.unpack("<I", k.p.read(address, 4))[0] != value3 & 0xFFFFFFFF:
            raise SyscallError(EAGAIN)
        return _woke(k, k.threads.requeue(address, value, address2, timeout & 0x7FFFFFFF))
    if command == FUTEX_WAKE_OP:
        return _woke(k, _wake_op(k, address, value, timeout & 0x7FFFFFFF, address2, value3))
    raise SyscallError(ENOSYS)   # priority inheritance and the rest


def _woke(k, count: int) -> int:
    """A wake-up lets the woken run soon: the waker's slice ends (as a wake-up
    preempts on Linux when the woken has slept long)."""
    if count and k.busy():
        k.threads.switch_wanted = True
    return count


def _woken(how: str) -> int:
    return {"woken": 0, "timeout": -ETIMEDOUT, "signal": -EINTR}[how]


OPERATIONS = {0: lambda old, arg: arg, 1: lambda old, arg: old + arg, 2: lambda old, arg: old | arg,
              3: lambda old, arg: old & ~arg, 4: lambda old, arg: old ^ arg}
COMPARISONS = {0: lambda a, b: a == b, 1: lambda a, b: a != b, 2: lambda a, b: a < b, 3: lambda a, b: a <= b,
               4: lambda a, b: a > b, 5: lambda a, b: a >= b}


def _wake_op(k, address: int, count: int, count2: int, address2: int, encoded: int) -> int:
    """FUTEX_WAKE_OP: *address2 = op(*address2, oparg); wake ``count`` on ``address`` and,
    if the old value compares true with cmparg, ``count2`` on ``address2``."""
    op, cmp = encoded >> 28 & 7, encoded >> 24 & 15
    oparg, cmparg = encoded >> 12 & 0xFFF, encoded & 0xFFF
    if encoded >> 31 & 1:
        oparg = 1 << (oparg & 31)
    if op not in OPERATIONS or cmp not in COMPARISONS:
        raise SyscallError(ENOSYS)
    old = struct.unpack("<i", k.p.read(address2, 4))[0]
    k.p.write(address2, struct.pack("<I", OPERATIONS[op](old, oparg) & 0xFFFFFFFF))
    woken = k.threads.wake(address, count)
    if COMPARISONS[cmp](old, cmparg):
        woken += k.threads.wake(address2, count2)
    return woken


TABLE = {
    24: ("sched_yield", sys_sched_yield), 60: ("exit", sys_exit),
    186: ("gettid", sys_gettid), 202: ("futex", sys_futex), 218: ("set_tid_address", sys_set_tid_address),
    273: ("set_robust_list", sys_set_robust_list), 274: ("get_robust_list", sys_get_robust_list),
}   # clone and clone3 are calls/processes.py's: a thread, or a process
