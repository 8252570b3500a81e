"""The threads of the process and the scheduler that runs them on the VM's one vCPU.

A thread is a CPU context and its share of the kernel's per-thread state: its id, its
signal mask, alternate stack and sigsuspend mask, the address clear_child_tid names
and its robust list. The running thread's state lives in the engine and in the
``Signals`` object; the others' is saved here, and a switch swaps them.

Switches happen where Linux's scheduler could take the CPU from a task and nowhere
else: when the running thread blocks (a futex wait, a sleep), yields (sched_yield) or
exits, and when its time slice is over, a slice being an amount of executed code
measured by the engine's block counter (the virtual clock's unit), not the machine's
time. So a run is deterministic: the same program, input and ``--seed`` give the
same interleaving; the seed varies the length of the slices, and with it where
preemption falls (as a different machine load would).

A blocked thread waits on a futex key (its address: every thread shares the address
space) with a bitset, or on nothing but time; ``until`` is the time since boot its
wait ends at (None: only a wake-up or a signal ends it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

SLICE_NS = 4_000_000          # a time slice: 4 ms of the virtual clock (about a million bytes of code)
MAX_THREADS = 1024            # threads of one process at once (beyond: EAGAIN, as RLIMIT_NPROC)
SS_DISABLE = 2


class Block(Exception):
    """A system call that must wait until ``ready()`` (a pipe has data, a child ended):
    the thread sleeps, and makes the call again once it is ready (or its time, given,
    ran out: ``finish("timeout")`` is then the result)."""

    def __init__(self, ready, until: int | None = None, finish=None):
        super().__init__()
        self.ready, self.until, self.finish = ready, until, finish


@dataclass
class Wait:
    key: int | None                  # a futex's address, or None (a sleep)
    bitset: int = 0xFFFFFFFF
    until: int | None = None         # time since boot
    finish: object = None            # (kernel, how) -> RAX: "woken", "timeout" or "signal"
    order: int = 0                   # when it began (wake-ups go in this order)
    ready: object = None             # the wait ends once this says True
    again: bool = False              # and the call is then made again (what it waits for is ready)
    call: tuple[int, int] | None = None   # the call it waits in: its number and address
    vfork: int = 0                   # vfork's parent: the child it waits for (not a call to make again)


@dataclass
class Thread:
    tid: int
    context: object = None           # the engine's saved context while it does not run
    opmasks: dict | None = None      # K0-7 on an AVX-512 host, while it does not run
    blocked: int = 0                 # its signal mask
    altstack: tuple = (0, SS_DISABLE, 0)
    saved_mask: int | None = None
    clear_child_tid: int = 0
    robust_list: tuple[int, int] = (0, 0)
    wait: Wait | None = None
    result: int | None = None        # RAX when it runs again (its wait ended)
    again: tuple[int, int] | None = None   # or the call to make again: its number and address
    interrupted: tuple[int, int] | None = None   # the call a signal ended its wait in (for a restart)
    settid: int = 0                  # a new process's CLONE_CHILD_SETTID, written once its memory is made
    regs: dict | None = None         # a snapshot's registers, until the VMM makes them its context
    start: tuple | None = None       # a new thread's stack and TLS (None: the caller's)


@dataclass
class Threads:
    leader: int                      # the thread group's id (the process's)
    seed: int = 0
    all: dict[int, Thread] = field(default_factory=dict)
    current: int = 0
    next_tid: int = 0
    switch_wanted: bool = False      # the running thread blocked, yielded or exited
    waits: int = 0

    def __post_init__(self):
        self.all = {self.leader: Thread(self.leader)}
        self.current = self.leader
        self.next_tid = self.leader + 1
        self._random = random.Random(self.seed ^ 0x7EAD)

    @property
    def running(self) -> Thread:
        return self.all[self.current]

    @property
    def many(self) -> bool:
        return len(self.all) > 1

    def only_running(self) -> None:
        """execve: the calling thread goes on alone, as the process's leader (de_thread)."""
        self.all = {self.leader: Thread(self.leader)}
        self.current = self.leader
        self.switch_wanted = False

    def slice(self) -> int:
        """The next time slice, in nanoseconds of executed code (the seed varies it)."""
        return SLICE_NS // 2 + self._random.randrange(SLICE_NS)

    def spawn(self) -> Thread:
        thread = Thread(self.next_tid)
        self.next_tid += 1
        self.all[thread.tid] = thread
        return thread

    def block(self, wait: Wait) -> None:
        self.waits += 1
        wait.order = self.waits
        self.running.wait = wait
        self.switch_wanted = True

    def wake(self, key: int, count: int, bitset: int = 0xFFFFFFFF) -> int:
        """FUTEX_WAKE: up to ``count`` waiters on ``key`` whose bitset meets ``bitset``,
        in the order they began to wait."""
        woken = 0
        for thread in self.waiting():
            if woken >= count:
                break
            if thread.wait.key == key and thread.wait.bitset & bitset:
                self.end_wait(thread, "woken")
                woken += 1
        return woken

    def requeue(self, key: int, count: int, target: int, limit: int) -> int:
        """FUTEX_REQUEUE: wake ``count`` waiters on ``key``, move up to ``limit`` more to ``target``."""
        woken = self.wake(key, count)
        moved = 0
        for thread in self.waiting():
            if moved >= limit:
                break
            if thread.wait.key == key:
                thread.wait.key = target
                moved += 1
        return woken + moved

    def waiting(self) -> list[Thread]:
        return sorted((t for t in self.all.values() if t.wait is not None), key=lambda t: t.wait.order)

    def end_wait(self, thread: Thread, how: str) -> None:
        wait, thread.wait = thread.wait, None
        if how == "ready" and wait.again:
            thread.again = wait.call
        else:
            thread.result = wait.finish(how) if wait.finish else 0
            thread.interrupted = wait.call if how == "signal" else None

    def runnable(self) -> list[Thread]:
        return [t for t in self.all.values() if t.wait is None]

    def pick(self) -> Thread | None:
        """The next thread to run: round-robin in creation order after the current one."""
        order = sorted(self.all)
        later = [tid for tid in order if tid > self.current]
        for tid in later + [tid for tid in order if tid <= self.current]:
            thread = self.all[tid]
            if thread.wait is None:
                return thread
        return None

    def earliest(self) -> Thread | None:
        """The waiting thread whose time runs out first."""
        timed = [t for t in self.all.values() if t.wait is not None and t.wait.until is not None]
        return min(timed, key=lambda t: (t.wait.until, t.tid)) if timed else None
