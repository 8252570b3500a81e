"""The VM's processes and the scheduler that runs all their threads on its one vCPU.

Every process of the VM is a :class:`~minivmm.linux.kernel.Kernel` (its address space,
descriptors, signals, threads) in one process table, under one clock: a VM is one
EVC domain and one timeline. The scheduler takes the threads in turn, process by
process (by pid, then tid), and when none can run lets time pass (virtual time jumps)
to the first wait that runs out or timer that expires. A waiting thread wakes when its
futex is woken, its time runs out, a signal it would take arrives, or what it waits for
is ready (a pipe, a child), in which case it makes its system call again.
"""

from __future__ import annotations

import time

from .pipes import PIPE_BUF, PIPE_SIZE, Pipe
from .threads import Threads

WAITED = 0.1                  # seconds of the machine's time waited at once: the run stays stoppable
FIRST_PID = 1000
# What a VM's guest may make, so that it can hurt only itself (the machine's memory stays
# bounded): threads of all its processes (RLIMIT_NPROC counts threads), its processes, each
# with RAM of the VM's size and the VMM's translated code (vm.TRANSLATION_BUFFER), within
# MAX_VM_MEMORY together, and the bytes its pipes buffer (Linux's pipe-user-pages-soft:
# beyond it, a new pipe holds one page). Past a bound, clone and fork fail with EAGAIN,
# as at RLIMIT_NPROC.
MAX_TASKS = 1024
MAX_PROCESSES = 256
MAX_VM_MEMORY = 8 << 30
PROCESS_OVERHEAD = 64 << 20
PIPES_SOFT = 16384 * 4096


class Zombie:
    """A process that ended and that its parent has not reaped: what wait4 tells of it."""

    def __init__(self, process):
        self.p = process
        self.threads = Threads(process.tid)


class Machine:
    def __init__(self, first):
        self.kernels = {first.p.tid: first}   # pid -> kernel, zombies included until reaped
        self.first = first.p.tid
        self.current = first.p.tid
        self.next_pid = first.p.tid + 1
        self.forked: list = []                 # new processes whose CPU the VMM has yet to make
        self.pipe_bytes = 0                    # what the VM's pipes may buffer together
        self.pipes_made = 0

    def may_fork(self) -> bool:
        live = self.live()
        each = len(self.running.p.memory.ram) + PROCESS_OVERHEAD
        return len(live) < MAX_PROCESSES and (len(live) + 1) * each <= max(MAX_VM_MEMORY, 2 * each) and \
            self.tasks() < MAX_TASKS

    def new_pipe(self, capacity: int | None = None) -> Pipe:
        """A pipe of ``capacity`` bytes; by default PIPE_SIZE while the VM's pipes hold
        less than PIPES_SOFT together, one page beyond (pipe-user-pages-soft)."""
        if capacity is None:
            capacity = PIPE_SIZE if self.pipe_bytes + PIPE_SIZE <= PIPES_SOFT else PIPE_BUF
        self.pipe_bytes += capacity

        def freed():
            self.pipe_bytes -= capacity
        self.pipes_made += 1
        return Pipe(capacity, freed, inode=self.pipes_made)

    def tasks(self) -> int:
        return sum(len(k.threads.all) for k in self.live())

    @property
    def running(self):
        return self.kernels[self.current]

    def new_pid(self) -> int:
        while self.next_pid in self.kernels or any(self.next_pid in k.threads.all for k in self.kernels.values()):
            self.next_pid += 1
        self.next_pid += 1
        return self.next_pid - 1

    def live(self) -> list:
        return [k for pid, k in sorted(self.kernels.items()) if k.p.exit_status is None]

    def children(self, parent: int) -> list:
        return [k for pid, k in sorted(self.kernels.items()) if k.p.ppid == parent]

    def group(self, pgid: int) -> list:
        return [k for k in self.live() if k.p.pgid == pgid]

    def pick(self):
        """(kernel, thread): the next runnable thread after the running one, in turn."""
        order = [(pid, tid) for k in self.live() for pid in [k.p.tid] for tid in sorted(k.threads.all)
                 if k.threads.all[tid].wait is None]
        if not order:
            return None
        current = (self.current, self.running.threads.current)
        later = [key for key in order if key > current]
        pid, tid = (later or order)[0]
        return self.kernels[pid], self.kernels[pid].threads.all[tid]

    def schedule(self):
        """The next thread to run (the running one's state already saved): waits ended by
        time, signals and readiness first; while none can run, time passes to the first
        wait's end or timer. None when nothing can run again and the run's end is asked."""
        while True:
            self._end_waits()
            chosen = self.pick()
            if chosen is not None:
                return chosen
            clock = self.running.clock
            ends = [t.wait.until for k in self.live() for t in k.threads.waiting() if t.wait.until is not None]
            ends += [w for k in self.live() if (w := k.timers.next_wakeup()) is not None]
            now = clock.since_boot()
            wake = min(ends, default=None)
            if wake is not None and not clock.realtime:
                clock.pass_idle(max(wake - now, 0))
            else:
                time.sleep(WAITED if wake is None else min(max(wake - now, 0) / 1e9, WAITED))
            for kernel in self.live():
                kernel.timers.expire()
            if (wake is None or clock.realtime) and self.running.should_stop():
                return None

    def _end_waits(self) -> None:
        for kernel in self.live():
            threads, signals = kernel.threads, kernel.signals
            now = kernel.clock.since_boot()
            for thread in sorted(threads.waiting(), key=lambda t: (t.wait.until or 0, t.wait.order)):
                wait = thread.wait
                if wait.ready is not None and wait.ready():
                    threads.end_wait(thread, "ready")
                elif wait.until is not None and now >= wait.until:
                    threads.end_wait(thread, "timeout")
                else:
                    entry = signals.next_for(thread.tid, thread.blocked)
                    if entry is not None and not signals.ignored(entry.signo):
                        threads.end_wait(thread, "signal")   # signal_wake_up
