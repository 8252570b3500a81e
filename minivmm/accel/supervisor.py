"""A Linux program as a native process on the machine's own CPU, its CPUID answered by
a ptrace supervisor (``--accel native``).

CPUID faulting (arch_prctl(ARCH_SET_CPUID, 0), arch/x86/kernel/process.c) makes CPUID
at CPL 3 raise #GP, which the kernel sends as SIGSEGV with SI_KERNEL and no address.
The supervisor sees that signal before the program does (ptrace(2) signal-delivery-
stop), finds a CPUID at RIP, writes the view's answer into RAX, RBX, RCX and RDX, steps
RIP over the instruction and suppresses the signal. Any other SIGSEGV goes to the
program untouched. This is how rr virtualises CPUID.

Faulting belongs to a thread: clone and fork copy it, execve clears it
(arch_setup_new_exec). So the supervisor follows every thread and child
(PTRACE_O_TRACECLONE/FORK/VFORK) and re-arms at every exec stop
(PTRACE_O_TRACEEXEC), before the new image runs an instruction: it lets execve
return (its syscall-exit-stop, where RAX is already written), puts a SYSCALL at RIP,
runs arch_prctl there, and puts the bytes and registers back. The same stop rewrites
AT_HWCAP and AT_HWCAP2 in the new stack's auxiliary vector.

A seccomp filter installed before the first execve (seccomp(2), SECCOMP_RET_TRACE)
sends the supervisor every open, openat and openat2: one that names /proc/cpuinfo
(the same file, however the path reaches it) is pointed at a file holding the view's
cpuinfo, its path written below the thread's red zone. The filter also sends
arch_prctl(ARCH_GET_CPUID/ARCH_SET_CPUID): the program sees a machine without CPUID
faulting, so it cannot switch the supervisor off.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import signal
import struct
import termios
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from iced_x86 import Decoder, Mnemonic

from ..errors import MinivmmError
from ..linux.binfmt import stack_layout
from ..linux.process import SAMPLE, STACK_SIZE
from . import ptrace as pt
from .capture import Uncarried, capture
from .placement import KERNEL_AREAS, PAGE, free_below, moved_stack, parse_maps

SI_KERNEL = 0x80
SYSCALL = b"\x0f\x05"
AT_FDCWD = -100
O_ACCMODE, O_NOFOLLOW = 0o3, 0o400000
RED_ZONE = 128                        # bytes below RSP a leaf function may use (System V ABI)
AT_NULL, AT_HWCAP, AT_HWCAP2 = 0, 16, 26
KEPT = 16 << 20                       # bytes of stdout and stderr the report keeps, as the emulator's
OPTIONS = (pt.PTRACE_O_TRACESYSGOOD | pt.PTRACE_O_TRACEFORK | pt.PTRACE_O_TRACEVFORK | pt.PTRACE_O_TRACECLONE
           | pt.PTRACE_O_TRACEEXEC | pt.PTRACE_O_TRACESECCOMP | pt.PTRACE_O_EXITKILL)
FAULT_SIGNALS = (signal.SIGILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGTRAP)
STOP_SIGNALS = (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
PROT_RW, MAP_PRIVATE_ANONYMOUS, MAP_FIXED, MAP_FIXED_NOREPLACE = 3, 0x22, 0x10, 0x100000


@dataclass
class Program:
    """What to run and what it is told: ``answer(leaf, ecx)`` CPUID's registers (each
    CPUID the program executes), ``hwcap`` AT_HWCAP, ``hwcap2(machine's)`` AT_HWCAP2, and
    the file /proc/cpuinfo opens as (``cpuinfo``). ``on_fault(fault)`` hears of each fault
    signal the kernel sends a task: its ``signal``, ``code``, ``rip``, ``bytes`` there and
    whether the task ``handled`` it (catches it, unblocked)."""
    path: str
    argv: list[str]
    env: list[str]
    answer: object
    hwcap: int
    hwcap2: object
    cpuinfo: str
    on_fault: object = None
    stdin: object = None              # a file descriptor, bytes, or None (empty)
    # A program that may move into the emulator (placement.py): the VM's RAM, and the
    # system calls (counted from the first after execve) after which ``on_point(count,
    # process or Uncarried, stdout and stderr so far, calls by number, the first calls,
    # when it stopped)`` is called; it returns True to end the native run there (moved).
    keep_low: int | None = None
    points: tuple = ()
    on_point: object = None


@dataclass
class Outcome:
    how: str                          # exited | signaled | limit | unsupported | failed (to start)
    status: int = 0                   # exited: the status; signaled: the signal's number
    fault: dict | None = None         # signaled by a fault the kernel sent: as on_fault heard it
    message: str = ""
    stdout: bytes = b""
    stderr: bytes = b""
    left_out: dict = field(default_factory=dict)
    tasks: int = 1                    # threads and processes followed
    execs: int = 0
    calls: Counter | None = None      # the program's system calls by number, when counted
    sample: list = field(default_factory=list)


@dataclass
class _Task:
    tgid: int
    # arming CPUID faulting after execve: "exec" (execve returning), "call" (arch_prctl
    # entering), "entered" (its entry stop seen: the supervisor's filter stop must come
    # next), "called" (arch_prctl past the filter, returning)
    arming: str | None = None
    saved: pt.Regs | None = None
    code: bytes = b""
    deferred: list = field(default_factory=list)   # signals that arrived while arming
    point: int = 0                                 # at the exit of this counted call, a point


class _Output(threading.Thread):
    """Drains one pipe of the program's (its stdout or stderr, shared by every task) into
    ``sink`` as the bytes come, keeping the first KEPT of them."""

    def __init__(self, fd: int, sink=None):
        super().__init__(daemon=True)
        self.fd, self.sink, self.kept, self.left_out = fd, sink, bytearray(), 0
        self.lock = threading.Lock()     # held while bytes are read and kept
        self.closed = False              # every writer closed it: all is kept
        self.inode = os.fstat(fd).st_ino
        self.start()

    def run(self):
        while True:
            select.select([self.fd], [], [])
            with self.lock:
                data = os.read(self.fd, 1 << 16)
                room = KEPT - len(self.kept)
                self.kept += data[:max(room, 0)]
                self.left_out += max(len(data) - max(room, 0), 0)
                if not data:
                    self.closed = True
                    os.close(self.fd)
                    break
            if self.sink:
                self.sink(data)

    def settled(self) -> bytes:
        """Everything written so far (the writers are stopped): kept once the pipe is empty."""
        while True:
            with self.lock:
                waiting = 0 if self.closed else struct.unpack("i", fcntl.ioctl(self.fd, termios.FIONREAD, b"\0" * 4))[0]
                if not waiting:
                    return bytes(self.kept)
            select.select([], [], [], 0.001)


class Supervisor:
    def __init__(self, program: Program, cpuinfo_path: str, timeout: float | None, console=None):
        self.program, self.cpuinfo_path, self.timeout, self.console = program, cpuinfo_path, timeout, console
        self.tasks: dict[int, _Task] = {}
        self.outcome = Outcome("exited")
        self.root = 0
        self.expired = False
        self.unsupported = ""
        self._mem: dict[int, int] = {}
        self._faults: dict[int, dict] = {}   # tgid -> the last fault signal it was sent
        self._cpuinfo = os.stat("/proc/cpuinfo")
        self._procfs: dict[int, bool] = {self._cpuinfo.st_dev: True}   # st_dev -> a procfs mount
        self.counting = bool(program.keep_low)
        self.calls: Counter = Counter()
        self.sample: list[int] = []
        self.moved = False
        self.unplaced = ""           # why the program's layout cannot move into the emulator
        self.auxv = b""              # its auxiliary vector as placed
        self.old_stack = (0, 0)      # where its stack was before it was placed
        self._outputs: tuple = ()

    # -- start and end ------------------------------------------------------------------------

    def run(self) -> Outcome:
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        stdin = self.program.stdin
        feed = os.pipe() if isinstance(stdin, bytes) else None
        go_r, go_w = os.pipe()
        failed_r, failed_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:   # the child: only system calls from here to execve
            try:
                os.close(go_w)
                os.close(failed_r)
                os.dup2(feed[0] if feed else stdin if isinstance(stdin, int) else os.open(os.devnull, os.O_RDONLY), 0)
                os.dup2(stdout_w, 1)
                os.dup2(stderr_w, 2)
                os.read(go_r, 1)                # the supervisor has seized this process
                # the program gets 0-2 and nothing else of minivmm's (as subprocess's close_fds)
                os.closerange(3, failed_w)
                os.closerange(failed_w + 1, os.sysconf("SC_OPEN_MAX"))
                if self.program.keep_low:
                    pt.no_randomize()
                pt.install_filter(pt.supervisor_filter(every_call=bool(self.program.keep_low)))
                os.execve(self.program.path, self.program.argv, dict(e.split("=", 1) for e in self.program.env))
            except BaseException as error:  # noqa: BLE001 - whatever it is, the parent hears of it
                os.write(failed_w, f"{self.program.path}: {_why(error)}".encode(errors="replace")[:512])
            os._exit(127)
        self.root = pid
        for fd in (stdout_w, stderr_w, go_r, failed_w):
            os.close(fd)
        outputs = self._outputs = (_Output(stdout_r, self.console), _Output(stderr_r))
        if feed:
            os.close(feed[0])
            threading.Thread(target=_feed, args=(feed[1], stdin), daemon=True).start()
        timer = threading.Timer(self.timeout, self._expire) if self.timeout else None
        self.tasks[pid] = _Task(pid)
        try:
            try:
                pt.seize(pid, OPTIONS)
            except OSError as error:
                raise MinivmmError(f"--accel native: cannot trace the program's process ({error.strerror}: "
                                   f"a security module or /proc/sys/kernel/yama/ptrace_scope forbids ptrace)") from None
            os.write(go_w, b"!")
            if timer:
                timer.start()
            self._loop()
        finally:
            os.close(go_w)
            if timer:
                timer.cancel()
            self._kill_all()
            self._drain()
            for fd in self._mem.values():
                os.close(fd)
        failure = os.read(failed_r, 512)
        os.close(failed_r)
        for output in outputs:
            output.join()
        out = self.outcome
        out.stdout, out.stderr = bytes(outputs[0].kept), bytes(outputs[1].kept)
        out.left_out = {"console": outputs[0].left_out, "stderr": outputs[1].left_out}
        if self.counting:
            out.calls, out.sample = self.calls, self.sample
        if self.moved:
            out.how = "moved"
        elif failure:
            out.how, out.message = "failed", failure.decode(errors="replace")
        elif self.unsupported:
            out.how, out.message = "unsupported", self.unsupported
        elif self.expired:
            out.how, out.message = "limit", f"time budget of {self.timeout:g} s exhausted"
        return out

    def _expire(self) -> None:
        self.expired = True
        self._kill_all()

    def _kill_all(self) -> None:
        """SIGKILL every process followed (a killed thread takes its thread group along);
        a tracee stopped by ptrace dies too."""
        for tid in list(self.tasks):
            try:
                os.kill(tid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _drain(self) -> None:
        """Reap what is left after everything was killed, until no tracee remains."""
        while True:
            try:
                tid, status = os.waitpid(-1, pt.WALL)
            except ChildProcessError:
                return
            if os.WIFSTOPPED(status):
                os.kill(tid, signal.SIGKILL)

    # -- the event loop --------------------------------------------------------------------

    def _loop(self) -> None:
        """Every stop of every task until the program's first process has ended; what it
        leaves behind is killed (the run is the program)."""
        while True:
            try:
                tid, status = os.waitpid(-1, pt.WALL)
            except ChildProcessError:
                return
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self._gone(tid)
                if tid == self.root:
                    if os.WIFEXITED(status):
                        self.outcome.how, self.outcome.status = "exited", os.WEXITSTATUS(status)
                    else:
                        self._signaled(os.WTERMSIG(status))
                    return
                continue
            if not os.WIFSTOPPED(status):
                continue
            task = self.tasks.get(tid)
            if task is None:      # a new thread or child, stopped before its parent's event came
                task = self._adopt(tid)
            if self.expired or self.unsupported:
                os.kill(tid, signal.SIGKILL)
                continue
            try:
                self._stopped(tid, task, os.WSTOPSIG(status), status >> 16)
            except OSError:
                # Killed while stopped (by the deadline, or SIGKILL from elsewhere, which wakes
                # a tracee): its exit is the next event. Anything else is the supervisor's.
                if not self.expired and _alive(tid):
                    raise

    def _adopt(self, tid: int) -> _Task:
        self.tasks[tid] = task = _Task(_tgid(tid))
        self.outcome.tasks += 1
        return task

    def _gone(self, tid: int) -> None:
        self.tasks.pop(tid, None)
        fd = self._mem.pop(tid, None)
        if fd is not None:
            os.close(fd)

    def _stopped(self, tid: int, task: _Task, signo: int, event: int) -> None:
        if event in (pt.EVENT_FORK, pt.EVENT_VFORK, pt.EVENT_CLONE):
            child = pt.event_message(tid)
            if child not in self.tasks:
                self._adopt(child)
            pt.resume(tid)
        elif event == pt.EVENT_EXEC:
            self._exec(tid, task)
        elif event == pt.EVENT_SECCOMP:
            self._seccomp(tid, task)
        elif event == pt.EVENT_STOP:
            # SIGTRAP: a new task's first stop; a stop signal: a group-stop, which
            # PTRACE_LISTEN keeps without resuming the task (ptrace(2), PTRACE_SEIZE)
            pt.resume(tid, 0, pt.PTRACE_LISTEN if signo in STOP_SIGNALS else pt.PTRACE_CONT)
        elif signo == pt.SYSCALL_STOP:
            self._syscall_stop(tid, task)
        elif task.arming:
            task.deferred.append(signo)   # sent again once the thread runs its own code
            pt.resume(tid, 0, pt.PTRACE_SYSCALL)
        elif signo == signal.SIGSEGV and self._cpuid(tid):
            pt.resume(tid)
        else:
            self._signal(tid, task, signo)

    # -- CPUID --------------------------------------------------------------------------------

    def _cpuid(self, tid: int) -> bool:
        """Answer a CPUID that faulted: SIGSEGV from the kernel (SI_KERNEL, no address:
        a #GP) with a CPUID at RIP. Anything else is a real SIGSEGV."""
        info = pt.siginfo(tid)
        if info.code != SI_KERNEL or info.addr:
            return False
        regs = pt.get_regs(tid)
        instr = Decoder(64, self._read(tid, regs.rip, 15), ip=regs.rip).decode()
        if instr.mnemonic != Mnemonic.CPUID:
            return False
        regs.rax, regs.rbx, regs.rcx, regs.rdx = self.program.answer(regs.rax & 0xFFFFFFFF, regs.rcx & 0xFFFFFFFF)
        regs.rip += instr.len    # the answer's 32-bit values zero the upper halves, as CPUID does
        pt.set_regs(tid, regs)
        return True

    # -- exec: arm CPUID faulting, rewrite the auxiliary vector ------------------------------

    def _exec(self, tid: int, task: _Task) -> None:
        former = pt.event_message(tid)
        if former != tid:   # a thread other than the leader called execve and took its place
            self._gone(former)
        for other in [t for t, o in self.tasks.items() if o.tgid == task.tgid and t != tid]:
            self._gone(other)   # execve ended every other thread of the process (de_thread)
        self._drop_mem(tid)
        self.outcome.execs += 1
        regs = pt.get_regs(tid)
        if regs.cs != 0x33:
            self.unsupported = (f"{_exe(tid)} is a 32-bit program: --accel native supervises x86-64 programs "
                                f"(run it under the emulator)")
            os.kill(tid, signal.SIGKILL)
            return
        self._auxv(tid, regs.rsp)
        task.arming = "exec"
        pt.resume(tid, 0, pt.PTRACE_SYSCALL)   # to execve's syscall-exit-stop

    def _syscall_stop(self, tid: int, task: _Task) -> None:
        if task.arming == "exec":
            # execve has returned (RAX 0 is written): the registers set now stay set
            task.saved = pt.get_regs(tid)
            rip = task.saved.rip
            task.code = self._read(tid, rip, len(SYSCALL))
            self._write(tid, rip, SYSCALL)
            call = task.saved.copy()
            call.rax, call.rdi, call.rsi = pt.SYS_ARCH_PRCTL, pt.ARCH_SET_CPUID, 0
            pt.set_regs(tid, call)
            task.arming = "call"
            pt.resume(tid, 0, pt.PTRACE_SYSCALL)
        elif task.arming == "call":    # its syscall-entry-stop; the filter's stop comes next
            task.arming = "entered"
            pt.resume(tid, 0, pt.PTRACE_SYSCALL)
        elif task.arming == "entered":
            # The call returned without passing the supervisor's filter: a filter of the
            # program's own (which seccomp runs first, and whose errno or allow wins over a
            # trace) kept it from arming CPUID faulting. The program must not go on.
            self._refuse(tid, "its own seccomp filter keeps arch_prctl(ARCH_SET_CPUID) from the supervisor, "
                              "so CPUID faulting cannot be armed")
        elif task.arming == "called":
            result = _signed(pt.get_regs(tid).rax)
            if result:
                self._refuse(tid, f"arch_prctl(ARCH_SET_CPUID, 0) failed after execve ({os.strerror(-result)}), "
                                  f"so CPUID faulting cannot be armed")
                return
            if self.program.keep_low and task.tgid == self.root:
                self._place(tid, task)
            self._write(tid, task.saved.rip, task.code)
            pt.set_regs(tid, task.saved)
            task.arming, task.saved = None, None
            for signo in task.deferred:
                pt.tgkill(task.tgid, tid, signo)
            task.deferred.clear()
            self._after_call(tid, task)
        else:
            self._after_call(tid, task)

    def _after_call(self, tid: int, task: _Task) -> None:
        """On from a syscall-exit-stop; at a point, first the program's ``on_point``."""
        count, task.point = task.point, 0
        if count and self._at_point(tid, count):
            return
        pt.resume(tid)

    def _refuse(self, tid: int, why: str) -> None:
        """End the run: the program would run unsupervised from here. Every task dies."""
        self.unsupported = f"{_exe(tid)}: {why}"
        self._kill_all()

    def _auxv(self, tid: int, rsp: int) -> None:
        """AT_HWCAP and AT_HWCAP2 of the new image's stack (fs/binfmt_elf.c
        create_elf_tables: argc, argv, NULL, envp, NULL, then the pairs)."""
        at = rsp + 8 + 8 * (int.from_bytes(self._read(tid, rsp, 8), "little") + 1)
        while int.from_bytes(self._read(tid, at, 8), "little"):
            at += 8
        at += 8
        while True:
            pair = self._read(tid, at, 16)
            kind, value = int.from_bytes(pair[:8], "little"), int.from_bytes(pair[8:], "little")
            if kind == AT_NULL:
                return
            if kind == AT_HWCAP:
                self._write(tid, at + 8, self.program.hwcap.to_bytes(8, "little"))
            elif kind == AT_HWCAP2:
                self._write(tid, at + 8, self.program.hwcap2(value).to_bytes(8, "little"))
            at += 16

    # -- system calls the filter sends ---------------------------------------------------------

    def _seccomp(self, tid: int, task: _Task) -> None:
        asked = pt.event_message(tid)
        if asked == pt.TRACE_CPUID_PRCTL and task.arming == "entered":   # the supervisor's own: on to its exit
            task.arming = "called"
            pt.resume(tid, 0, pt.PTRACE_SYSCALL)
            return
        if self.counting and task.tgid == self.root and self.outcome.execs:
            self._count(tid, task)
        if asked == pt.TRACE_CPUID_PRCTL:
            regs = pt.get_regs(tid)
            # the machine without CPUID faulting: CPUID enabled, and no way to change it
            result = 1 if regs.rdi & 0xFFFFFFFF == pt.ARCH_GET_CPUID else -errno.ENODEV
            regs.orig_rax, regs.rax = (1 << 64) - 1, result & ((1 << 64) - 1)   # skipped (seccomp(2))
            pt.set_regs(tid, regs)
        elif asked == pt.TRACE_OPEN:
            self._open(tid)
        elif asked == pt.TRACE_CALL and self.program.keep_low and task.tgid == self.root:
            self._place_mmap(tid)
        pt.resume(tid, 0, pt.PTRACE_SYSCALL if task.point else pt.PTRACE_CONT)

    # -- a program that may move into the emulator ---------------------------------------------

    def _count(self, tid: int, task: _Task) -> None:
        nr = pt.get_regs(tid).orig_rax
        self.calls[nr] += 1
        if len(self.sample) < SAMPLE:
            self.sample.append(nr)
        total = sum(self.calls.values())
        if total in self.program.points:
            task.point = total

    def _place(self, tid: int, task: _Task) -> None:
        """At the exec stop, armed: the stack below the VM's RAM top, 8 MiB as the
        emulator maps it, its pointers shifted; the vDSO withheld (placement.py)."""
        top, bottom = stack_layout(self.program.keep_low)
        self.unplaced = ""    # a new image: it may move where the last could not
        with open(f"/proc/{tid}/maps") as maps:
            areas = parse_maps(maps.read())
        rsp = task.saved.rsp
        stack = next(a for a in areas if a.start <= rsp < a.end)
        for area in areas:
            if area is not stack and area.name not in KERNEL_AREAS and area.end > bottom - PAGE:
                self.unplaced = (f"{_exe(tid)} is mapped at {area.start:#x}, above the VM's RAM: a program moves "
                                 f"into the emulator when it is linked at a fixed address (static, not PIE)")
                return
        placed = self._syscall(tid, pt.SYS_MMAP, bottom, STACK_SIZE, PROT_RW,
                               MAP_PRIVATE_ANONYMOUS | MAP_FIXED_NOREPLACE, (1 << 64) - 1, 0)
        if placed != bottom:
            self.unplaced = f"its stack cannot be placed at {bottom:#x} ({os.strerror(-placed)})"
            return
        delta = top - stack.end
        data, self.auxv = moved_stack(self._read(tid, stack.start, stack.end - stack.start), stack.start, rsp, delta)
        self._write(tid, top - len(data), data)
        for area in areas:
            if area.name in KERNEL_AREAS[:-1]:   # [vsyscall] is no mapping of the process's
                self._syscall(tid, pt.SYS_MUNMAP, area.start, area.end - area.start)
        # The old stack stays, unused, for the kernel's /proc/PID/cmdline and environ
        # (mm->arg_start points there); a capture leaves it behind.
        self.old_stack = (stack.start, stack.end)
        task.saved.rsp += delta

    def _place_mmap(self, tid: int) -> None:
        """An mmap without an address gets the one the emulator would pick: top-down below
        the stack (a hint: the kernel takes it when it is free, as it is here). rseq fails
        with ENOSYS, as under the emulator, which could not carry a registration."""
        regs = pt.get_regs(tid)
        if regs.orig_rax == pt.SYS_RSEQ:
            regs.orig_rax, regs.rax = (1 << 64) - 1, -errno.ENOSYS & ((1 << 64) - 1)   # skipped
            pt.set_regs(tid, regs)
            return
        if regs.orig_rax != pt.SYS_MMAP or regs.rdi or regs.r10 & (MAP_FIXED | MAP_FIXED_NOREPLACE):
            return
        with open(f"/proc/{tid}/maps") as maps:
            areas = parse_maps(maps.read())
        _, bottom = stack_layout(self.program.keep_low)
        hint = free_below(areas, regs.rsi, bottom - PAGE, 0x10000)
        if hint is not None:
            regs.rdi = hint
            pt.set_regs(tid, regs)

    def _syscall(self, tid: int, nr: int, *args: int) -> int:
        """Make one system call in a task stopped at a syscall-exit-stop, its registers and
        code as they were afterwards; signals arriving meanwhile are sent again later."""
        saved = pt.get_regs(tid)
        # The call that stopped is a SYSCALL just before RIP: run that one again.
        at = saved.rip - len(SYSCALL)
        if self._read(tid, at, len(SYSCALL)) != SYSCALL:
            raise Uncarried("the system call it stopped at is no SYSCALL instruction")
        call = saved.copy()
        call.rip, call.rax = at, nr
        for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
            setattr(call, name, value & ((1 << 64) - 1))
        pt.set_regs(tid, call)
        entered, result = False, None
        pt.resume(tid, 0, pt.PTRACE_SYSCALL)
        while result is None:
            _, status = os.waitpid(tid, pt.WALL)
            if not os.WIFSTOPPED(status):
                raise ProcessLookupError(tid)
            if os.WSTOPSIG(status) == pt.SYSCALL_STOP and status >> 16 == 0:
                if entered:
                    result = _signed(pt.get_regs(tid).rax)
                    break
                entered = True
            elif status >> 16 == 0:
                self.tasks[tid].deferred.append(os.WSTOPSIG(status))
            pt.resume(tid, 0, pt.PTRACE_SYSCALL)
        pt.set_regs(tid, saved)
        return result

    def _at_point(self, tid: int, count: int) -> bool:
        """The program's state at a point, or why it cannot be carried; True if the
        program moved (its process here is ended)."""
        stopped = time.perf_counter()
        try:
            if self.unplaced:
                raise Uncarried(self.unplaced)
            others = [t for t in self.tasks if t != tid]
            if others:
                raise Uncarried(f"it runs with {len(others)} more threads or processes; minivmm carries one")
            streams = {output.inode: name for output, name in zip(self._outputs, ("/dev/stdout", "/dev/stderr"))}
            state = capture(tid, self._mem_fd(tid), lambda nr, *args: self._syscall(tid, nr, *args),
                            self.program.keep_low, streams, self.old_stack, self.cpuinfo_path)
            state.auxv = self.auxv
            if self.tasks[tid].deferred:
                raise Uncarried("signals came while it was captured")
        except Uncarried as why:
            state = why
        task = self.tasks[tid]
        for signo in task.deferred:
            pt.tgkill(task.tgid, tid, signo)
        task.deferred.clear()
        if self.program.on_point(count, state, self._outputs[0].settled(), self._outputs[1].settled(), self.calls,
                                 self.sample, stopped):
            self.moved = True
            self._kill_all()
            return True
        return False

    def _open(self, tid: int) -> None:
        regs = pt.get_regs(tid)
        nr = regs.orig_rax & ~pt.X32_SYSCALL_BIT
        if nr == pt.OPEN_CALLS[0]:
            dirfd, pointer, flags, register = AT_FDCWD, regs.rdi, regs.rsi, "rdi"
        else:
            dirfd, pointer, register = _signed(regs.rdi, 32), regs.rsi, "rsi"
            flags = regs.rdx if nr == pt.OPEN_CALLS[1] else int.from_bytes(self._read(tid, regs.rdx, 8), "little")
        if flags & O_ACCMODE:
            return     # for writing: /proc/cpuinfo refuses it itself
        path = self._string(tid, pointer)
        if path is None or not self._is_cpuinfo(tid, dirfd, path, not flags & O_NOFOLLOW):
            return
        replacement = self.cpuinfo_path.encode() + b"\0"
        at = (regs.rsp - RED_ZONE - len(replacement)) & ~0xF
        try:
            self._write(tid, at, replacement)
            setattr(regs, register, at)
        except OSError:   # no stack below the red zone: the call fails rather than show the machine's
            regs.orig_rax, regs.rax = (1 << 64) - 1, -errno.EFAULT & ((1 << 64) - 1)
        pt.set_regs(tid, regs)

    def _is_cpuinfo(self, tid: int, dirfd: int, path: bytes, follow: bool) -> bool:
        """The path names /proc/cpuinfo as the task resolves it: from its root, its
        working directory or the directory ``dirfd`` (their /proc/TID links)."""
        base = "root" if path.startswith(b"/") else "cwd" if dirfd == AT_FDCWD else f"fd/{dirfd}"
        try:
            where = f"/proc/{tid}/{base}/".encode() + path.lstrip(b"/")
            seen = os.stat(where, follow_symlinks=follow)
        except OSError:
            return False
        # Every procfs mount (a new one in a user namespace too) gives /proc/cpuinfo the
        # same inode number, its proc_dir_entry's; only the device differs.
        if seen.st_ino != self._cpuinfo.st_ino:
            return False
        if seen.st_dev not in self._procfs:
            self._procfs[seen.st_dev] = _fs_type(where) == PROC_SUPER_MAGIC
        return self._procfs[seen.st_dev]

    # -- signals -------------------------------------------------------------------------------

    def _signal(self, tid: int, task: _Task, signo: int) -> None:
        """A signal for the program, passed on as it came; a fault the kernel raised is
        recorded (and named if it turns out fatal)."""
        if signo in FAULT_SIGNALS:
            info = pt.siginfo(tid)
            if info.code > 0:    # the kernel's; a process's kill, tgkill or sigqueue has si_code <= 0
                self._fault(tid, task, signo, info)
        pt.resume(tid, signo)

    def _fault(self, tid: int, task: _Task, signo: int, info) -> None:
        rip = pt.get_regs(tid).rip
        fault = {"signal": signo, "code": info.code, "rip": rip, "bytes": self._read(tid, rip, 15),
                 "handled": _handled(tid, signo)}
        if self.program.on_fault:
            self.program.on_fault(fault)
        self._faults[task.tgid] = fault

    def _signaled(self, signo: int) -> None:
        self.outcome.how, self.outcome.status = "signaled", signo
        fault = self._faults.get(self.root)
        self.outcome.fault = fault if fault and fault["signal"] == signo else None

    # -- the tracee's memory -------------------------------------------------------------------

    def _mem_fd(self, tid: int) -> int:
        fd = self._mem.get(tid)
        if fd is None:
            fd = self._mem[tid] = os.open(f"/proc/{tid}/mem", os.O_RDWR | os.O_CLOEXEC)
        return fd

    def _drop_mem(self, tid: int) -> None:
        """After execve the task has another address space: open its mem file again."""
        fd = self._mem.pop(tid, None)
        if fd is not None:
            os.close(fd)

    def _read(self, tid: int, address: int, size: int) -> bytes:
        try:
            return os.pread(self._mem_fd(tid), size, address)
        except OSError:
            return b""

    def _write(self, tid: int, address: int, data: bytes) -> None:
        os.pwrite(self._mem_fd(tid), data, address)

    def _string(self, tid: int, address: int) -> bytes | None:
        """A NUL-terminated path (at most PATH_MAX), read page by page."""
        out = b""
        while len(out) < 4096:
            chunk = self._read(tid, address, 4096 - address % 4096)
            if not chunk:
                return None
            end = chunk.find(b"\0")
            if end >= 0:
                return out + chunk[:end]
            out, address = out + chunk, address + len(chunk)
        return None


PROC_SUPER_MAGIC = 0x9FA0   # include/uapi/linux/magic.h
_libc = ctypes.CDLL(None, use_errno=True)
_libc.statfs.argtypes = (ctypes.c_char_p, ctypes.c_void_p)


def _fs_type(path: bytes) -> int | None:
    """statfs's f_type, the first field of struct statfs (asm-generic/statfs.h)."""
    buf = ctypes.create_string_buffer(120)
    return None if _libc.statfs(path, buf) else int.from_bytes(buf.raw[:8], "little")


def _why(error: BaseException) -> str:
    """An execve's failure in the kernel's words (ELOOP: a #! chain too deep, or a loop)."""
    if not isinstance(error, OSError) or error.errno is None:
        return str(error)
    if error.errno == errno.ELOOP:
        return "more than 5 #! scripts in a row, or a loop of symbolic links (ELOOP)"
    return f"{os.strerror(error.errno)} ({errno.errorcode.get(error.errno, error.errno)})"


def _signed(value: int, bits: int = 64) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _alive(tid: int) -> bool:
    """The task exists and is not a zombie (/proc/TID/stat's state)."""
    try:
        with open(f"/proc/{tid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def _tgid(tid: int) -> int:
    try:
        with open(f"/proc/{tid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return tid


def _exe(tid: int) -> str:
    try:
        return os.readlink(f"/proc/{tid}/exe")
    except OSError:
        return "a program"


def _handled(tid: int, signo: int) -> bool:
    """The task catches ``signo`` and does not block it (/proc/TID/status SigCgt, SigBlk)."""
    masks = {}
    try:
        with open(f"/proc/{tid}/status", "rb") as status:
            for line in status:
                name, _, value = line.partition(b":")
                if name in (b"SigCgt", b"SigBlk"):
                    masks[name] = int(value, 16)
    except OSError:
        return False
    bit = 1 << (signo - 1)
    return bool(masks.get(b"SigCgt", 0) & bit) and not masks.get(b"SigBlk", 0) & bit


def _feed(fd: int, data: bytes) -> None:
    try:
        os.write(fd, data)
    except OSError:
        pass
    finally:
        os.close(fd)
