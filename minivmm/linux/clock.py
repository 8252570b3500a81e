"""The process's clocks (kernel/time/posix-timers.c, posix-cpu-timers.c): the wall clock,
the time since boot, the process's CPU time.

Time is virtual unless ``realtime``: it advances with the program's work, as QEMU's
``-icount`` advances it with instructions. The engine counts the bytes of code of every
block it executes (:func:`minivmm.vmm.engine.add_block_counter`) and each byte is 4 ns
(CODE_NS_SHIFT, as QEMU's icount shift): about 16 ns an instruction, a 60 MIPS machine,
the pace at which the engine runs typical code, so that virtual time keeps roughly with
the wall clock. A system call adds 1 us, and 1 ns for each byte the kernel copies from
or to the program's memory (a copy at 16 bytes an instruction of that machine: read and
write take time by their size, so dd reports a plausible speed); sleeping adds what was
slept. What a program reads is then a function of what it executed and asked for: the
same program on the same input reads the same times, run after run, however fast the
machine running it.

The wall clock starts at the newest modification time of what the run is given (the
program file, the mounted directories), and no earlier than EPOCH: the files a program
sees lie in its past, so ``ls -l`` prints their times rather than their years, and the
same inputs start the same clock."""

from __future__ import annotations

import ctypes
import math
import os
import time

from .errno import EINVAL, SyscallError

EPOCH = 1_700_000_000            # the earliest the virtual wall clock starts (2023-11-14)
CODE_NS_SHIFT = 2                # a byte of code executed is 2**CODE_NS_SHIFT ns
NS_PER_SYSCALL = 1000
NS_PER_BYTE_COPIED = 1
NEVER = (1 << 64) - 1
# clock ids (include/uapi/linux/time.h) by what they read; TAI is the wall clock while
# no adjtimex has set an offset (the kernel's default). 10 (CLOCK_SGI_CYCLE) is gone.
WALL = frozenset((0, 5, 8, 11))            # REALTIME, REALTIME_COARSE, REALTIME_ALARM, TAI
SINCE_BOOT = frozenset((1, 4, 6, 7, 9))    # MONOTONIC, MONOTONIC_RAW, MONOTONIC_COARSE, BOOTTIME, BOOTTIME_ALARM
CPU = frozenset((2, 3))                    # PROCESS_CPUTIME_ID, THREAD_CPUTIME_ID (one thread)
COARSE = frozenset((5, 6))                 # REALTIME_COARSE, MONOTONIC_COARSE: the tick's resolution
HZ = 250                                   # the kernel's tick (CONFIG_HZ of Debian's and Ubuntu's kernels)
CPUCLOCK_VIRT, CPUCLOCK_SCHED = 1, 2       # a CPU-time clock id's low bits (PROF 0: user and system time)


def cpu_clock(clock_id: int) -> tuple[int, int, bool] | None:
    """What a CPU-time clock id of clock_getcpuclockid and pthread_getcpuclockid names
    (include/linux/posix-timers.h: ~pid << 3 | per-thread << 2 | which): the pid (0: the
    caller), which time, and whether it is a thread's; None for a fixed clock id."""
    if clock_id >= 0:
        return None
    return ~(clock_id >> 3), clock_id & 3, bool(clock_id & 4)


def resolution(clock_id: int) -> int:
    """clock_getres in nanoseconds: the tick for the coarse clocks (LOW_RES_NSEC) and for
    the CPU clocks but the scheduler's (posix_cpu_clock_getres), 1 ns otherwise."""
    cpu = cpu_clock(clock_id)
    if clock_id in COARSE or cpu is not None and cpu[1] != CPUCLOCK_SCHED:
        return (10**9 + HZ - 1) // HZ
    return 1


def boot_epoch(paths) -> int:
    """Seconds since 1970 at which the virtual wall clock starts: the newest modification
    time of ``paths`` (those that exist), rounded up, at least EPOCH."""
    newest = max((os.stat(path).st_mtime_ns for path in paths if path and os.path.exists(path)), default=0)
    return max(EPOCH, math.ceil(newest / 1e9))


class Clock:
    """Virtual time (see the module), or the machine's (``realtime``)."""

    def __init__(self, realtime: bool = False, epoch: int = EPOCH):
        self.realtime = realtime
        self.epoch = epoch
        # Shared with the engine's block counter: [0] nanoseconds of the code executed,
        # [1] the engine stops at the block that brings [0] there (the next timer),
        # [2] the engine's stop function (the counter fills it in), [3] nonzero when the
        # counter stopped the engine, [4] where the counter stores the time since boot
        # for the vDSO (engine.set_time_store), [5] the rest of the time since boot, the
        # kernel's and the sleeps' (counted here: a system call does not touch the
        # engine's), [6] where the time goes when there is no vDSO.
        self.counter = (ctypes.c_uint64 * 7)(0, NEVER, 0, 0, 0, 0, 0)
        self.counter[4] = ctypes.addressof(self.counter) + 48
        self.calls = 0
        self.kernel_ns = 0
        self.slept_ns = 0
        self.deadline: int | None = None   # the time since boot of the next timer
        self.slice_end: int | None = None  # the running thread's time slice ends at this much code (threads.py)
        self.waits_end: int | None = None  # the time since boot a waiting thread's wait runs out

    # -- reading ------------------------------------------------------------------------------

    def since_boot(self) -> int:
        return time.monotonic_ns() if self.realtime else self.cpu() + self.slept_ns

    def cpu(self) -> int:
        """The process's CPU time: what it ran, not what it slept."""
        return time.process_time_ns() if self.realtime else self.counter[0] + self.kernel_ns

    def wall_offset(self) -> int:
        """The wall clock less the time since boot."""
        return time.time_ns() - time.monotonic_ns() if self.realtime else self.epoch * 10**9

    def read(self, clock_id: int) -> int:
        """What clock_gettime reads of ``clock_id``, in nanoseconds; EINVAL for no clock.
        A CPU-time clock id (cpu_clock) reads the one CPU time, or the user part of it
        (CPUCLOCK_VIRT: the code run); the caller checks whose it is."""
        if clock_id in SINCE_BOOT:
            return self.since_boot()
        if clock_id in WALL:
            return time.time_ns() if self.realtime else self.since_boot() + self.epoch * 10**9
        cpu = cpu_clock(clock_id)
        if clock_id in CPU or cpu is not None and cpu[1] in (0, CPUCLOCK_SCHED):
            return self.cpu()
        if cpu is not None and cpu[1] == CPUCLOCK_VIRT:
            return int(os.times().user * 1e9) if self.realtime else self.counter[0]
        raise SyscallError(EINVAL)

    # -- moving -------------------------------------------------------------------------------

    def syscall(self, copied: int) -> None:
        """A system call, which copied ``copied`` bytes from and to the program's memory."""
        self.calls += 1
        self.kernel_ns += NS_PER_SYSCALL + copied * NS_PER_BYTE_COPIED
        self.counter[5] = self.kernel_ns + self.slept_ns
        if self.deadline is not None and not self.realtime:
            self._stop_engine()   # the call brought the next timer nearer

    def pass_idle(self, ns: int) -> None:
        """The program waited ``ns`` without running (virtual time jumps; the machine's
        clock has moved by itself)."""
        if not self.realtime:
            self.slept_ns += ns
            self.counter[5] = self.kernel_ns + self.slept_ns
            self._stop_engine()

    def stop_engine_at(self, since_boot: int | None) -> None:
        """The engine stops at the first block that starts at or past ``since_boot``
        (None: never); under realtime, once the machine's clock gets there (:meth:`wake`)."""
        self.deadline = since_boot
        self._stop_engine()

    def preempt_after(self, ns: int | None) -> None:
        """The engine stops once ``ns`` more of code has run (None: never), whatever the
        clock: a thread's time slice is work done, so preemption falls where it fell."""
        self.slice_end = None if ns is None else self.counter[0] + ns
        self._stop_engine()

    def slice_over(self) -> bool:
        return self.slice_end is not None and self.counter[0] >= self.slice_end

    def wake_threads_at(self, since_boot: int | None) -> None:
        """The engine stops when a waiting thread's time runs out (None: no such wait)."""
        self.waits_end = since_boot
        self._stop_engine()

    def waits_over(self) -> bool:
        return self.waits_end is not None and self.since_boot() >= self.waits_end

    def _stop_engine(self) -> None:
        """The engine's count at the deadline (the code's part of the time until then),
        or at the slice's end if that comes first."""
        code = [self.slice_end]
        if not self.realtime:
            code += [max(when - self.kernel_ns - self.slept_ns, 0) for when in (self.deadline, self.waits_end)
                     if when is not None]
        self.counter[1] = min((c for c in code if c is not None), default=NEVER)

    def realtime_wait(self) -> float | None:
        """Under realtime, the seconds until the next timer (the watchdog waits no longer)."""
        return None if not self.realtime or self.deadline is None else (self.deadline - time.monotonic_ns()) / 1e9

    def wake(self) -> None:
        """Under realtime, from the VMM's watchdog thread: once the next timer's time has
        come, the engine stops at its next block."""
        if self.realtime and self.deadline is not None and time.monotonic_ns() >= self.deadline:
            self.counter[1] = 0

    def stopped_engine(self) -> bool:
        """The engine stopped for the clock (since the last time this was asked)."""
        stopped, self.counter[3] = bool(self.counter[3]), 0
        return stopped

    def reached(self) -> bool:
        """The next timer's time has come: the engine stopped for it, or a system call
        took the time there."""
        if self.realtime:
            return self.counter[1] == 0
        return self.deadline is not None and self.since_boot() >= self.deadline
