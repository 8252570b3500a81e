"""Timer system calls (kernel/time/itimer.c, posix-timers.c): alarm, setitimer and
getitimer, timer_create, timer_settime, timer_gettime, timer_getoverrun and
timer_delete. The timers themselves are :mod:`minivmm.linux.timers`."""

from __future__ import annotations

import struct

from ..clock import WALL
from ..errno import EAGAIN, EFAULT, EINVAL, SyscallError
from ..timers import INT_MAX, SIGALRM, clock_kind
from .base import signed32
from .process import read_timespec, timespec

SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD, SIGEV_THREAD_ID = 0, 1, 2, 4
TIMER_ABSTIME = 1


def _timeval(ns: int) -> bytes:
    return struct.pack("<qq", ns // 10**9, ns % 10**9 // 1000)


def _itimer(k, which: int):
    if not 0 <= which <= 2:
        raise SyscallError(EINVAL)
    return k.timers.itimers[which]


def sys_alarm(k, uc, seconds, *_):
    """alarm_setitimer: ITIMER_REAL in ``seconds``; what was left of the last one, in
    whole seconds, rounded to the nearest (never 0 for one still to come)."""
    timer = k.timers.itimers[0]
    left = k.timers.remaining(timer)
    k.timers.set(timer, (seconds & 0xFFFFFFFF) * 10**9, 0)
    whole, micros = left // 10**9, left % 10**9 // 1000
    return whole + (1 if (not whole and micros) or micros >= 500_000 else 0)


def sys_getitimer(k, uc, which, value, *_):
    timer = _itimer(k, signed32(which))
    if not value:
        raise SyscallError(EFAULT)
    k.p.write(value, _timeval(timer.interval) + _timeval(k.timers.remaining(timer)))
    return 0


def sys_setitimer(k, uc, which, new, old, *_):
    """A missing new value stops the timer (the kernel's "misfeature support")."""
    interval = value = 0
    if new:
        fields = struct.unpack("<qqqq", k.p.read(new, 32))
        if any(seconds < 0 or not 0 <= micros < 10**6 for seconds, micros in (fields[:2], fields[2:])):
            raise SyscallError(EINVAL)  # timeval_valid
        interval, value = (seconds * 10**9 + micros * 1000 for seconds, micros in (fields[:2], fields[2:]))
    timer = _itimer(k, signed32(which))
    previous = _timeval(timer.interval) + _timeval(k.timers.remaining(timer))
    k.timers.set(timer, value, interval)
    if old:
        k.p.write(old, previous)
    return 0


def sys_timer_create(k, uc, clock, event, created, *_):
    """A POSIX timer on ``clock`` notifying as struct sigevent says (good_sigevent):
    SIGEV_SIGNAL (SIGEV_THREAD, glibc's own business, is one to the kernel), SIGEV_NONE,
    or SIGEV_THREAD_ID naming a thread of the process: there is one."""
    cpu = clock_kind(signed32(clock))
    signo, value, notify = SIGALRM, None, SIGEV_SIGNAL
    if event:
        value, signo, notify, thread = struct.unpack("<Qiii", k.p.read(event, 20))
        known = notify in (SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD, SIGEV_THREAD_ID)
        if not known or notify == SIGEV_THREAD_ID and thread != k.p.tid or notify != SIGEV_NONE and not 0 < signo <= 64:
            raise SyscallError(EINVAL)
    timer = k.timers.create(signo, cpu, signed32(clock) in WALL, value, notify != SIGEV_NONE)
    if timer is None:
        raise SyscallError(EAGAIN)
    try:
        k.p.write(created, struct.pack("<i", timer.id))
    except SyscallError:
        k.timers.delete(timer.id)
        raise
    return 0


def _posix(k, timer_id: int):
    timer = k.timers.posix.get(signed32(timer_id))
    if timer is None:
        raise SyscallError(EINVAL)
    return timer


def _itimerspec(k, timer) -> bytes:
    return timespec(timer.interval) + timespec(k.timers.remaining(timer))


def sys_timer_settime(k, uc, timer_id, flags, new, old, *_):
    if not new:
        raise SyscallError(EINVAL)
    interval, value = read_timespec(k, new), read_timespec(k, new + 16)
    timer = _posix(k, timer_id)
    previous = _itimerspec(k, timer)
    absolute = bool(flags & TIMER_ABSTIME)
    if absolute and value and timer.wall:
        value = max(value - k.clock.wall_offset(), 1)   # a time already past expires at once
    k.timers.set(timer, value, interval, absolute)
    if old:
        k.p.write(old, previous)
    return 0


def sys_timer_gettime(k, uc, timer_id, current, *_):
    k.p.write(current, _itimerspec(k, _posix(k, timer_id)))
    return 0


def sys_timer_getoverrun(k, uc, timer_id, *_):
    return min(_posix(k, timer_id).overrun_last, INT_MAX)


def sys_timer_delete(k, uc, timer_id, *_):
    k.timers.delete(_posix(k, timer_id).id)
    return 0


TABLE = {
    36: ("getitimer", sys_getitimer), 37: ("alarm", sys_alarm), 38: ("setitimer", sys_setitimer),
    222: ("timer_create", sys_timer_create), 223: ("timer_settime", sys_timer_settime),
    224: ("timer_gettime", sys_timer_gettime), 225: ("timer_getoverrun", sys_timer_getoverrun),
    226: ("timer_delete", sys_timer_delete),
}
