"""Timers that send signals (kernel/time/itimer.c, posix-timers.c, posix-cpu-timers.c):
the three interval timers of setitimer and alarm, and POSIX timers (timer_create), on
the kernel's :class:`~minivmm.linux.clock.Clock`.

ITIMER_REAL and POSIX timers on the wall clock or the time since boot count what
passes; ITIMER_VIRTUAL, ITIMER_PROF and POSIX timers on a CPU-time clock count what the
process runs (one clock: its user and system time are not told apart). The VMM stops
the engine when the soonest expiry comes (:meth:`Timers.arm`), wherever the program is,
and the expired timers send their signals, which the return to user mode delivers.

As Linux does, a periodic ITIMER_REAL or POSIX timer starts its next period when its
signal is delivered (dequeue_signal's rearm: a program that blocks the signal is not
flooded), forwarded past the present; a POSIX timer's si_overrun and timer_getoverrun
count the periods it missed. A periodic timer whose signal is ignored starts its next
period at once (posix_timer_fn). ITIMER_VIRTUAL and ITIMER_PROF move on by one interval
when they expire (check_cpu_itimer). Changing or deleting a POSIX timer drops the
signal it had pending (Linux 6.14's posix-timers rework)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errno import EINVAL, EOPNOTSUPP, SyscallError
from .signals import SI_KERNEL, SI_TIMER

SIGALRM, SIGVTALRM, SIGPROF = 14, 26, 27
ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF = 0, 1, 2
MAX_TIMERS = 4096                 # POSIX timers a process may have (then EAGAIN, as without sigqueues)
INT_MAX = (1 << 31) - 1


def clock_kind(clock_id: int) -> bool:
    """Whether timers and sleeps on ``clock_id`` count the process's CPU time (True) or
    the time since boot (False: the wall clock moves with it, no one setting it). The
    raw and coarse clocks have no timers, the alarm clocks none without a real-time
    clock device, which the VM lacks (EOPNOTSUPP); other numbers are no clock (EINVAL)
    (kernel/time/posix-timers.c, alarmtimer.c)."""
    if clock_id in (0, 1, 7, 11):   # REALTIME, MONOTONIC, BOOTTIME, TAI
        return False
    if clock_id in (2, 3):          # PROCESS_CPUTIME_ID, THREAD_CPUTIME_ID
        return True
    raise SyscallError(EOPNOTSUPP if clock_id in (4, 5, 6, 8, 9) else EINVAL)


@dataclass
class Timer:
    """One timer: an interval timer (``id`` -1) or a POSIX timer."""
    signo: int
    cpu: bool = False        # on the process's CPU time, else on the time since boot
    wall: bool = False       # a POSIX timer on the wall clock (an absolute time is a wall time)
    id: int = -1             # a POSIX timer's (its si_tid)
    value: int = 0           # sigev_value (si_value)
    notify: bool = True      # False: SIGEV_NONE, it expires without a signal
    expiry: int = 0          # when it expires (or expired last), on its clock
    interval: int = 0
    running: bool = False    # counting towards ``expiry``
    requeue: int = 0         # odd: it expired periodic and starts its next period when its signal is delivered
    overrun: int = -1        # periods past the one it signalled, counted towards its next signal (it_overrun)
    overrun_last: int = 0    # those of its last signal: timer_getoverrun
    queued_overrun: int = 0  # it expired again while its signal was pending (si_overrun)
    queued_requeue: int = 0  # ``requeue`` when its signal was sent (si_sys_private)

    def forward(self, now: int) -> int:
        """hrtimer_forward: the expiry moves on by whole intervals until it is past ``now``;
        how many."""
        if now < self.expiry:
            return 0
        periods = (now - self.expiry) // self.interval + 1
        self.expiry += periods * self.interval
        return periods

    def fields(self, overrun: int) -> bytes:
        """siginfo's _timer: si_tid, si_overrun, si_value."""
        return struct.pack("<iiQ", self.id, overrun, self.value)


class Timers:
    """The process's timers, sending their signals through ``signals`` on ``clock``."""

    def __init__(self, clock, signals):
        self.clock, self.signals = clock, signals
        self.itimers = [Timer(SIGALRM), Timer(SIGVTALRM, cpu=True), Timer(SIGPROF, cpu=True)]
        self.posix: dict[int, Timer] = {}
        self.next_id = 0
        signals.on_dequeue = self._delivered

    def now(self, timer: Timer) -> int:
        return self.clock.cpu() if timer.cpu else self.clock.since_boot()

    def _deadline(self, timer: Timer) -> int:
        """When, since boot, ``timer`` may expire: its expiry; for a CPU-time timer the
        earliest the CPU time can get there (all of the time from now on running)."""
        if not timer.cpu:
            return timer.expiry
        return self.clock.since_boot() + max(timer.expiry - self.clock.cpu(), 0)

    def running(self) -> list[Timer]:
        return [t for t in (*self.itimers, *self.posix.values()) if t.running and t.notify]

    def arm(self) -> None:
        """The engine stops when the soonest timer expires (after every change of a timer,
        and of what the CPU-time clock counts: a sleep)."""
        self.clock.stop_engine_at(min((self._deadline(t) for t in self.running()), default=None))

    def next_wakeup(self) -> int | None:
        """The time since boot at which a timer counting time since boot (which a sleep
        lets pass) expires next, or None."""
        return min((t.expiry for t in self.running() if not t.cpu), default=None)

    def expire(self) -> None:
        """Every timer whose time has come expires, the soonest first; then :meth:`arm`."""
        for timer in sorted(self.running(), key=self._deadline):
            if self.now(timer) >= timer.expiry:
                self._fire(timer)
        self.arm()

    def _fire(self, timer: Timer) -> None:
        now = self.now(timer)
        if timer.id < 0 and timer.cpu:  # check_cpu_itimer
            timer.expiry += timer.interval
            timer.running = bool(timer.interval)
            self.signals.send(timer.signo, SI_KERNEL)
            return
        timer.running = False
        if timer.id < 0:  # it_real_fn; the next period starts when SIGALRM is delivered
            self.signals.send(SIGALRM, SI_KERNEL)
            return
        if timer.interval:  # posix_timer_fn
            timer.requeue += 1
        if any(q.timer == timer.id for q in self.signals.pending):  # send_sigqueue: its one sigqueue
            timer.queued_overrun += 1
            timer.queued_requeue = timer.requeue
        elif self.signals.send(timer.signo, SI_TIMER, timer=timer.id):
            timer.queued_overrun, timer.queued_requeue = 0, timer.requeue
        elif timer.interval:  # ignored: the next period starts now
            timer.overrun += timer.forward(now)
            timer.running = True
            timer.requeue += 1

    def _delivered(self, entry) -> bytes:
        """A pending signal is taken (dequeue_signal): a periodic ITIMER_REAL starts its
        next period with any SIGALRM, a POSIX timer with its own, which then says how many
        periods it missed (posixtimer_rearm)."""
        real = self.itimers[ITIMER_REAL]
        if entry.signo == SIGALRM and real.interval and not real.running:
            real.forward(self.now(real))
            real.running = True
            self.arm()
        if entry.timer is None:
            return entry.fields
        timer = self.posix[entry.timer]
        overrun = timer.queued_overrun
        if timer.interval and timer.requeue == timer.queued_requeue and timer.requeue & 1:
            timer.overrun += timer.forward(self.now(timer))
            timer.running = True
            timer.overrun_last, timer.overrun = timer.overrun, -1
            timer.requeue += 1
            overrun = min(timer.overrun_last + overrun, INT_MAX)
            self.arm()
        return timer.fields(overrun)

    # -- setting and reading ------------------------------------------------------------------

    def remaining(self, timer: Timer) -> int:
        """What getitimer and timer_gettime say is left (common_timer_get,
        itimer_get_remtime): nothing for a timer that is not running, else at least 1 ns
        (1 us for an interval timer) for one that has expired, its signal not yet sent."""
        if timer.id >= 0 and timer.interval and (timer.requeue & 1 or not timer.notify):
            timer.overrun += timer.forward(self.now(timer))  # as if started again now
        elif not timer.running and (timer.notify or timer.id < 0):
            return 0
        left = timer.expiry - self.now(timer)
        if left > 0:
            return left
        return 0 if not timer.notify else 1000 if timer.id < 0 else 1

    def set(self, timer: Timer, value: int, interval: int, absolute: bool = False) -> None:
        """Start ``timer`` to expire in ``value`` ns (at ``value`` with ``absolute``, on its
        clock), then every ``interval``; a value of 0 stops it (common_timer_set). A
        POSIX timer's pending signal is dropped."""
        if timer.id >= 0:
            self.signals.discard(lambda q: q.timer != timer.id)
            timer.overrun_last, timer.overrun = 0, -1
            timer.requeue = (timer.requeue + 2) & ~1
        timer.running = False
        timer.interval = interval if value or timer.cpu and timer.id < 0 else 0  # set_cpu_itimer keeps it
        if value:
            timer.expiry = value if absolute else self.now(timer) + value
            timer.running = True
        self.arm()

    def create(self, signo: int, cpu: bool, wall: bool, value: int | None, notify: bool) -> Timer | None:
        """A new POSIX timer, the lowest free id from the last one given (posix_timer_add),
        or None when the process has MAX_TIMERS. Without a sigevent (``value`` None) it
        sends SIGALRM with its id as si_value."""
        if len(self.posix) >= MAX_TIMERS:
            return None
        while self.next_id in self.posix:
            self.next_id = (self.next_id + 1) & INT_MAX
        timer = Timer(signo, cpu, wall, self.next_id, self.next_id if value is None else value, notify)
        self.posix[timer.id] = timer
        self.next_id = (self.next_id + 1) & INT_MAX
        return timer

    def delete(self, timer_id: int) -> None:
        del self.posix[timer_id]
        self.signals.discard(lambda q: q.timer != timer_id)
        self.arm()

    def exec(self) -> None:
        """execve: POSIX timers go (begin_new_exec's exit_itimers); the interval timers
        stay, an alarm set before the call rings in the new program."""
        for timer_id in list(self.posix):
            self.delete(timer_id)
