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
import struct
import time

from .calls import RETURNED, TABLE
from .calls.base import sys_enosys
from .clock import EPOCH, Clock
from .compat import COMPAT
from .errno import EINTR, ENOSYS, EPIPE, SyscallError
from .files import Descriptors, Stream
from .process import SAMPLE
from .signals import ERESTARTNOHAND, ERESTARTSYS, Signals
from .scheduler import Machine
from .threads import Block, Threads, Wait
from .timers import Timers
from .vfs import FileSystem, device

STDERR_KEPT = 16 << 20            # stderr bytes the report keeps (the rest is counted)
SIGPIPE, SI_USER = 13, 0
UNKNOWN_KEPT = 1000               # distinct unknown system-call numbers counted one by one
UNKNOWN_CALL = (None, sys_enosys)
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
        self.machine = Machine(self)          # the VM's processes (a fork's child shares its parent's)
        self.calling = (0, 0)                 # the system call being made: its number and address
        self.seed = seed
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
        a pipe, a file) is there at once, and reading it takes no virtual time. While
        other threads of the VM exist, a read with nothing to read lets them run."""
        if not isinstance(self._input, int):
            data = bytes(self._input[:count])
            del self._input[:count]
            return data
        source = self._input
        if self.busy() and not select.select([source], [], [], 0)[0]:   # the VM's other threads run meanwhile
            raise Block(lambda: bool(select.select([source], [], [], 0)[0]))
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
        if self.busy():   # other threads run meanwhile: the scheduler keeps this one waiting
            raise Block(None, until, finish=lambda how: 0 if how == "timeout" else -ERESTARTNOHAND)
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

    def busy(self) -> bool:
        """Another thread of the VM exists, which may run while one of this waits."""
        return sum(len(k.threads.all) for k in self.machine.live()) > 1

    def fork(self, tid: int):
        """The kernel of a child process (copy_process without CLONE_VM): the address
        space's mappings (the VMM copies the memory), the descriptors (the same open file
        descriptions), the signal dispositions and mask, the working directory, umask and
        clock; a new id, this process its parent, its group and session."""
        child_process = self.p.forked(tid)
        child = Kernel.__new__(Kernel)
        child.__dict__.update(self.__dict__)
        child.p = child_process
        child.fds = self.fds.copy()
        child.signals = self.signals.forked(child_process)
        child.timers = Timers(self.clock, child.signals)
        child.threads = Threads(tid, self.seed)
        child.threads.running.blocked = self.signals.blocked
        child.signals.current = tid
        child.random = random.Random(self.seed ^ 0x5EED ^ tid)
        return child

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

    def dispatch(self, uc, number: int, args):
        """One system call, its registers already read by the VMM (RAX the number, RDI
        RSI RDX R10 R8 R9 the arguments, RIP past the SYSCALL): the value for RAX, or
        RETURNED when the call set every register itself (rt_sigreturn, a signal)."""
        name, handler = TABLE.get(number, UNKNOWN_CALL)
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
            if e.errno == EPIPE:   # a write to a pipe nobody reads: SIGPIPE too (pipe_write)
                self.signals.send(SIGPIPE, SI_USER, struct.pack("<iI", self.p.tid, 1000))
        except Block as block:   # it waits, and makes the call again once ready
            if self.signals.interrupting():
                result = (block.finish or _interrupted)("signal")
            else:
                self.threads.block(Wait(None, until=block.until, finish=block.finish or _interrupted,
                                        ready=block.ready, again=True))
                result = 0
        waiting = self.threads.all.get(self.threads.current)
        if waiting is not None and waiting.wait is not None and waiting.wait.call is None:
            waiting.wait.call = self.calling   # a snapshot carries it as this call, made again
        self.clock.syscall(p.copied - copied)
        if self.clock.reached():  # the call took the time to a timer's expiry
            self.timers.expire()
        return result if result is RETURNED else result & (1 << 64) - 1


def _interrupted(how: str) -> int:
    """A wait for readiness that a signal ended: restarted under SA_RESTART, else EINTR."""
    return -ERESTARTSYS if how == "signal" else 0
