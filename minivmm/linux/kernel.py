"""The kernel's state and the system-call dispatch: number -> (name, handler) from the
tables of :mod:`minivmm.linux.calls` (Linux x86-64 numbering,
arch/x86/entry/syscalls/syscall_64.tbl). A handler takes the kernel, the engine and the
six argument registers and returns the result, or raises SyscallError(errno); the result
goes back in RAX as Linux returns it (-errno on failure). What is not in the table
returns ENOSYS and is counted by number, never ending the run."""

from __future__ import annotations

import os
import random
import select
import time

from .calls import RETURNED, TABLE
from .calls.base import sys_enosys
from .clock import EPOCH, Clock
from .compat import COMPAT
from .errno import EINTR, ENOSYS, SyscallError
from .files import Descriptors, Stream
from .process import SAMPLE
from .signals import ERESTARTSYS, Signals
from .threads import Thread, Threads
from .timers import Timers
from .vfs import FileSystem, device

STDERR_KEPT = 16 << 20            # stderr bytes the report keeps (the rest is counted)
UNKNOWN_KEPT = 1000               # distinct unknown system-call numbers counted one by one
WAITED = 0.1                      # seconds a blocked call waits at a time: the run stays stoppable


class Kernel:
    """The kernel's state shared by the handlers: the process, its files, the clock and
    its timers."""

    def __init__(self, process, fs: FileSystem, seed: int, stdin=None, realtime: bool = False,
                 terminal: bool = False, xsave: dict | None = None, epoch: int = EPOCH):
        """``stdin``: the bytes of standard input, a file descriptor of the machine's to
        pass through, or None (empty); ``terminal``: the run's output is a terminal
        (TCGETS answers for fds 0-2); ``xsave``: the CPU's XSAVE layout (signal frames);
        ``epoch``: where the virtual wall clock starts."""
        self.p = process
        self.fs = fs
        self.fds = Descriptors()
        self.cwd = "/"
        self.umask = 0o022
        self.view = None                  # the VM's CPUID view: what an execve's auxiliary vector says
        self.on_exec = lambda: None       # the VMM's: an execve replaced the image (what it knew of the code is stale)
        self.random = random.Random(seed ^ 0x5EED)
        self.clock = Clock(realtime, epoch)
        self.signals = Signals(process, xsave)
        self.timers = Timers(self.clock, self.signals)
        self.threads = Threads(process.tid, seed)
        self.signals.current = process.tid
        self.on_clone = lambda thread: None   # the VMM's: a thread was created (time slices begin)
        self.terminal = terminal
        self.should_stop = lambda: False  # the run's budget is spent: a waiting read gives up
        self._input = stdin if isinstance(stdin, int) else bytearray(stdin or b"")
        tty = device("tty")
        self.fds.add(Stream("/dev/stdin", tty, 0, source=self._read_input))
        self.fds.add(Stream("/dev/stdout", tty, 1, sink=process.stdout_sink))
        self.fds.add(Stream("/dev/stderr", tty, 1, sink=self._stderr))

    @property
    def calls(self) -> int:
        return self.clock.calls

    def _read_input(self, count: int) -> bytes:
        """Standard input. Waiting for a terminal takes the time it takes, virtual time
        too (as QEMU's -icount lets time pass while the CPU is idle), so a timer can
        interrupt the read (ERESTARTSYS: restarted under SA_RESTART); other input (bytes,
        a pipe, a file) is there at once, and reading it takes no virtual time."""
        if not isinstance(self._input, int):
            data = bytes(self._input[:count])
            del self._input[:count]
            return data
        waits = self.clock.realtime or os.isatty(self._input)
        while True:
            began = time.monotonic_ns()
            if select.select([self._input], [], [], WAITED)[0]:
                break
            if self.should_stop():
                raise SyscallError(EINTR)
            if waits:
                self.clock.pass_idle(time.monotonic_ns() - began)
                self.timers.expire()
                if self.signals.interrupting():
                    raise SyscallError(ERESTARTSYS)
        return os.read(self._input, min(count, 1 << 20))

    def wait(self, until: int | None) -> bool:
        """Block, as a sleeping task does, until the time since boot reaches ``until``
        (None: until a signal): True then; False when a pending signal the process acts
        on ends the wait first, as one does already. Virtual time jumps to whichever
        comes first, ``until`` or the next timer (nothing runs meanwhile); the machine's
        clock is waited for. With neither, nothing can end the wait but the run's end
        (EINTR then): Linux's process would sleep forever."""
        while not self.signals.interrupting():
            now = self.clock.since_boot()
            if until is not None and now >= until:
                return True
            wake = min((t for t in (until, self.timers.next_wakeup()) if t is not None), default=None)
            if wake is not None and not self.clock.realtime:
                self.clock.pass_idle(max(wake - now, 0))
            else:
                time.sleep(WAITED if wake is None else min(max(wake - now, 0) / 1e9, WAITED))
            self.timers.expire()
            if self.should_stop():
                raise SyscallError(EINTR)
        return False

    def schedule(self) -> Thread | None:
        """The thread to run next (the running one's state already saved into it): the
        next runnable in turn; while none is, time passes (virtual time jumps) to the
        first wait's end or timer, and a signal ends the waits of the threads that would
        take it. None when nothing can ever run again and the run's end is asked for."""
        threads = self.threads
        while True:
            now = self.clock.since_boot()
            for thread in sorted(threads.waiting(), key=lambda t: (t.wait.until or 0, t.wait.order)):
                if thread.wait.until is not None and now >= thread.wait.until:
                    threads.end_wait(thread, "timeout")
            self._interrupt_waits()
            chosen = threads.pick()
            if chosen is not None:
                return chosen
            first = threads.earliest()
            now = self.clock.since_boot()
            wake = min((t for t in (first.wait.until if first else None, self.timers.next_wakeup()) if t is not None),
                       default=None)
            if wake is not None and not self.clock.realtime:
                self.clock.pass_idle(max(wake - now, 0))
            else:
                time.sleep(WAITED if wake is None else min(max(wake - now, 0) / 1e9, WAITED))
            self.timers.expire()
            if first is not None and self.clock.since_boot() >= first.wait.until:
                threads.end_wait(first, "timeout")
            elif self.should_stop():
                return None

    def _interrupt_waits(self) -> None:
        """A pending signal a waiting thread would take (not blocked, not ignored) wakes
        it, its wait ended by the signal (signal_wake_up)."""
        for thread in self.threads.waiting():
            entry = self.signals.next_for(thread.tid, thread.blocked)
            if entry is not None and not self.signals.ignored(entry.signo):
                self.threads.end_wait(thread, "signal")

    def _stderr(self, data: bytes) -> None:
        kept = max(STDERR_KEPT - len(self.p.stderr), 0)
        self.p.stderr += data[:kept]
        self.p.stderr_left_out += len(data) - len(data[:kept])

    def dispatch_compat(self, uc, number: int, args: tuple[int, ...]):
        """A 32-bit system call (:mod:`minivmm.linux.compat`): the number and
        arguments as 32-bit values. Its 64-bit twin answers; any other returns ENOSYS,
        counted in ``unknown_others`` only (its number is the 32-bit table's, which the
        report's numbers and ``syscall:N`` points do not count)."""
        native = COMPAT.get(number)
        if native is not None:
            return self.dispatch(uc, native, args)
        self.p.unknown_others += 1
        return -ENOSYS & (1 << 64) - 1

    def dispatch(self, uc, number: int, args: tuple[int, ...]):
        """One system call, its registers already read by the VMM (RAX the number, RDI
        RSI RDX R10 R8 R9 the arguments, RIP past the SYSCALL): the value for RAX, or
        RETURNED when the call set every register itself (rt_sigreturn, a signal)."""
        name, handler = TABLE.get(number, (None, sys_enosys))
        p = self.p
        copied = p.copied
        if name is None and (number in p.unknown or len(p.unknown) < UNKNOWN_KEPT):
            p.unknown[number] += 1
        elif name is None:
            p.unknown_others += 1  # a program calling random numbers cannot grow the report
        else:
            p.counts[name] += 1
        if len(p.sample) < SAMPLE:
            p.sample.append(name or number)
        try:
            result = handler(self, uc, *args)
        except SyscallError as e:
            result = -e.errno
        self.clock.syscall(p.copied - copied)
        if self.clock.reached():  # the call took the time to a timer's expiry
            self.timers.expire()
        return result if result is RETURNED else result & (1 << 64) - 1
