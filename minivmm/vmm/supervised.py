"""A Linux program on the machine's own CPU under a ptrace supervisor (``accel="native"``).

The program is a native process of this machine; minivmm answers only what it asks of
the CPU's identity: CPUID (through CPUID faulting), /proc/cpuinfo, and AT_HWCAP and
AT_HWCAP2. Every answer comes from the same view, built by the same code, as under the
emulator's ``--host native``. Everything else is the machine's: its kernel answers the
system calls, its OS set XCR0 (the program may enable nothing and disable nothing
there, as under EVC), its CPU executes every instruction, hidden or not.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time

from iced_x86 import Decoder

from ..accel import ptrace
from ..accel.capture import Uncarried
from ..accel.supervisor import SI_KERNEL, Program, Supervisor
from ..cpu import isa
from ..cpu.features import catalogue
from ..errors import MinivmmError
from ..linux.cpuinfo import cpuinfo
from ..linux.process import DEFAULT_ENV, hwcap, hwcap2
from ..linux.start import linux_cr4
from ..masking.compat import compatibility
from ..masking.view import GuestCpuidView
from ..cpu.profiles import load_profile
from .accelerated import refuse_beyond_machine
from . import from_native
from .exits.faults import VECTOR_NAMES
from .log import ExitLog
from .migration import MigrationRequest, policy_refusal, trigger_of, unreached
from .report import SIGNALS, RunResult, Stop
from .snapshot import save as save_snapshot

HWCAP2_FSGSBASE = 1 << 1
BUS_ADRALN, TRAP_BRKPT, FPE_INTDIV, FPE_INTOVF = 1, 1, 1, 2   # si_code values (asm-generic/siginfo.h)
CACHE_LIMIT = 4096                   # distinct answers kept ready, as the emulator's CPUID exit
NOTE = ("the program ran as a native process of this machine under a ptrace supervisor: its kernel answered "
        "the system calls (not counted), its CPU executed every instruction (not counted, never audited), and "
        "XCR0 is the machine's operating system's")


def unusable_reason() -> str | None:
    """Why ``--accel native`` cannot run here, or None."""
    if os.uname().machine != "x86_64":
        return f"this is a {os.uname().machine} machine, not x86-64"
    if not ptrace.cpuid_faulting_available():
        return ("this CPU or kernel has no CPUID faulting (no cpuid_fault in /proc/cpuinfo: Intel since Ivy Bridge "
                "has it, AMD since Zen 4 with a kernel that supports it), so CPUID cannot be intercepted")
    return None


def check(host, view: GuestCpuidView, image) -> None:
    """Refuse what a native process cannot do: another host than the machine, a view
    that shows what the machine lacks, a program that is not an x86-64 ELF."""
    refuse_beyond_machine("native", host, view)
    if image.kind != "linux":
        raise MinivmmError(f"--accel native runs x86-64 Linux programs; {image.name} is a guest of the guest ABI "
                           f"(run it on the emulator, or with --accel kvm)")
    reason = unusable_reason()
    if reason:
        raise MinivmmError(f"--accel native: {reason}")


def answers(view: GuestCpuidView, log: ExitLog):
    """``answer(leaf, ecx)``: the view's registers for a program whose CR4 is what Linux
    would set from the view (as the emulator's Linux start), each exit logged as the
    emulator logs it."""
    cr4 = linux_cr4(view) & view.LIVE_CR4_BITS
    indexed, cache = view.indexed_leaves, {}

    def answer(leaf: int, ecx: int):
        key = (leaf, ecx if leaf in indexed else 0)   # leaves that ignore ECX log as subleaf 0
        regs = cache.get(key)
        if regs is None:
            regs = view.answer(*key, cr4)
            if len(cache) < CACHE_LIMIT:
                cache[key] = regs
        log.add((key, regs, "native"))
        return regs
    return answer


def vector(signo: int, code: int, instr) -> int:
    """The exception behind a fault's signal (arch/x86/kernel/traps.c and mm/fault.c)."""
    if signo == signal.SIGILL:
        return 6
    if signo == signal.SIGSEGV:
        return 13 if code == SI_KERNEL else 14
    if signo == signal.SIGBUS:
        return 17 if code == BUS_ADRALN else 13
    if signo == signal.SIGTRAP:
        return 3 if code in (TRAP_BRKPT, SI_KERNEL) else 1
    if code in (FPE_INTDIV, FPE_INTOVF):
        return 0
    return 16 if isa.disassemble(instr).startswith("f") else 19   # x87's #MF, else SIMD's #XM


def describe(fault: dict) -> dict:
    """A fault as the emulator's exception log has it, and its one-line message."""
    instr = Decoder(64, fault["bytes"], ip=fault["rip"]).decode()
    text = isa.disassemble(instr) if instr.len else "(bad)"
    number = vector(fault["signal"], fault["code"], instr)
    name, signame = VECTOR_NAMES.get(number, f"vector {number}"), SIGNALS.get(fault["signal"], str(fault["signal"]))
    message = (f"{signame} delivered to the program's handler" if fault["handled"]
               else f"{signame} from {name} at {fault['rip']:#x} ({text})")
    return {"vector": number, "name": name, "rip": fault["rip"], "instruction": text, "features": [],
            "delivered": fault["handled"], "host": "native", "message": message}


class Moves:
    """A supervised program's migration and snapshot points (``syscall:N``: the machine's
    CPU counts no instructions, its kernel's system calls are counted for minivmm). At
    each, the process is captured as the emulator's snapshot (from_native.py): written
    to a file, or resumed on the destination host, the native process ended. A process
    that cannot be carried, or a destination that cannot take its view, stays where it
    is, the reason recorded, as a refused migration leaves a VM on its source."""

    def __init__(self, vm, events, force: bool, console):
        for event in events:
            if trigger_of(event).kind != "syscall":
                raise MinivmmError(f"--accel native: {trigger_of(event)} is not a point the machine's CPU can stop "
                                   f"at; a program moves into the emulator at syscall:N")
        if isinstance(vm.linux.stdin, bytes) and events:
            raise MinivmmError("--accel native: standard input given as bytes does not move into the emulator; "
                               "give it as a file descriptor, or none")
        if vm.memory_given and not events:
            raise MinivmmError("--accel native: --memory is the RAM of the VM the program moves into; it applies "
                               "with --migrate or --snapshot-at only")
        self.vm, self.force, self.console = vm, force, console
        self.events = sorted(events, key=lambda e: trigger_of(e).count)
        self.points = {trigger_of(e).count for e in events}
        self.migrations: list[dict] = []
        self.snapshots: list[dict] = []
        self.moved = None                     # the run on the destination, ready, once the program moved
        self.stopped = 0.0                    # when the process stopped at the last point (perf_counter)

    def on_point(self, count: int, process, console: bytes, stderr: bytes, calls, sample, stopped: float) -> bool:
        """The points at this count, snapshots first; True once the program moved."""
        self.stopped = stopped
        here = sorted((e for e in self.events if trigger_of(e).count == count),
                      key=lambda e: isinstance(e, MigrationRequest))
        self.events = [e for e in self.events if trigger_of(e).count != count]
        why, snapshot, pages = None, None, 0
        if isinstance(process, Uncarried):
            why = f"the program cannot move into the emulator: {process}; it runs on natively"
        else:
            try:
                snapshot = self.vm.snapshot_of_native(process, console, stderr, calls, sample)
                pages = sum(len(data) for data in process.contents.values()) // 4096
            except MinivmmError as error:   # what the emulator cannot take: the program stays
                why = f"the program cannot move into the emulator: {error}; it runs on natively"
        for event in here:
            if isinstance(event, MigrationRequest):
                if self._migrate(event, why, snapshot, pages):
                    return True
                continue
            record = {"when": str(event[0]), "file": event[1], "host": "native"}
            refusal = why or self._unresumable(snapshot)
            if refusal:
                record["refused"] = refusal
            else:
                save_snapshot(snapshot, event[1])
            self.snapshots.append(record)
        return False

    def _unresumable(self, snapshot) -> str | None:
        """Why the snapshot would not resume (its files, its view): a snapshot minivmm
        writes, it resumes."""
        try:
            self.vm.continue_native(snapshot, "native", False, [], None)
        except MinivmmError as error:
            return f"the program's snapshot would not resume: {error}"
        return None

    def _migrate(self, request, why, snapshot, pages: int) -> bool:
        destination = load_profile(request.destination)
        record = {"from": "native", "to": destination.name, "when": str(request.when), "ok": False, "forced": False,
                  "cold": False, "missing": [], "rounds": 0, "pages_sent": 0, "pages_per_round": [],
                  "downtime_ms": 0.0, "total_ms": 0.0, "mode": None, "refused": True}
        self.migrations.append(record)
        why = policy_refusal(self.vm.policy, request) or why
        if why is None and request.cold:
            why = "--accel native moves a running program: cold migration is for the emulator"
        if why is None:
            missing, marks = compatibility(self.vm.view, self.vm.host, destination)
            record["missing"], record["marks"] = missing, marks
            if (missing or marks) and not self.force:
                why = f"{destination.name} lacks {', '.join(missing + marks)}: the program stays native"
            record["forced"] = bool(missing or marks)
        if why is None:
            try:   # the destination is ready before the process here ends: a failure leaves it running
                self.moved = self.vm.continue_native(snapshot, destination.name, self.force, self.events, self.console)
            except MinivmmError as error:
                why = f"{destination.name} cannot take the program: {error}; it runs on natively"
        if why:
            record["reason"] = why
            return False
        took = round((time.perf_counter() - self.stopped) * 1e3, 3)   # stopped natively to ready to run
        record.update(ok=True, refused=False, mode="stop-and-copy", pages_sent=pages, downtime_ms=took, total_ms=took)
        return True


def run_supervised(vm, timeout: float | None, console, events=(), force: bool = False) -> RunResult:
    host, view, image, linux = vm.host, vm.view, vm.image, vm.linux
    moves = Moves(vm, events, force, console)
    shown = hwcap2(view)
    cpuid, exceptions = ExitLog(lambda entry: entry[0]), ExitLog(lambda entry: entry["vector"])
    program = Program(
        path=image.path, argv=[image.linux["execfn"], *linux.argv],
        env=list(linux.env if linux.env is not None else DEFAULT_ENV), answer=answers(view, cpuid), hwcap=hwcap(view),
        hwcap2=lambda machine: machine & ~HWCAP2_FSGSBASE | shown, cpuinfo=cpuinfo(host, view),
        on_fault=lambda fault: exceptions.add(describe(fault)), stdin=linux.stdin,
        keep_low=vm.memory if events else None, points=frozenset(moves.points), on_point=moves.on_point)
    started = time.monotonic()
    folder = tempfile.mkdtemp(prefix="minivmm-native-")
    try:
        path = os.path.join(folder, "cpuinfo")
        with open(path, "w", encoding="latin-1") as out:
            out.write(program.cpuinfo)
        os.chmod(path, 0o444)
        outcome = Supervisor(program, path, timeout, console).run()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if outcome.how == "failed":
        raise MinivmmError(f"--accel native: cannot start {outcome.message}")
    if outcome.how == "moved":
        left = None if timeout is None else max(timeout - (time.monotonic() - started), 0.001)
        result = moves.moved.run(None, left)
        result.cpuid_log[:0] = cpuid.entries
        result.exceptions[:0] = exceptions.entries
        for totals, native in ((result.cpuid_totals, cpuid.counts), (result.exception_totals, exceptions.counts)):
            for key, count in native.items():
                totals[key] = totals.get(key, 0) + count
        result.migrations[:0] = moves.migrations
        result.snapshots[:0] = moves.snapshots
        result.accel = "native"
        result.notes = [NOTE + f" until it moved into the emulator on {moves.migrations[-1]['to']} at "
                               f"{moves.migrations[-1]['when']}"]
        return result
    if outcome.how == "exited":
        stop = Stop("exited", outcome.status, message=f"program exited with status {outcome.status}")
    elif outcome.how == "signaled":
        name = SIGNALS.get(outcome.status, f"signal {outcome.status}")
        if outcome.fault:
            fault = describe({**outcome.fault, "handled": False})
            stop = Stop("signaled", 128 + outcome.status, signal=name, vector=fault["vector"], rip=fault["rip"],
                        instruction=fault["instruction"], message=fault["message"])
        else:
            stop = Stop("signaled", 128 + outcome.status, signal=name, message=f"{name} ended the program")
    else:
        stop = Stop(outcome.how, message=outcome.message)
    return RunResult(
        guest=image.name, stop=stop, console=outcome.stdout.decode("latin-1"), host=host.name, hosts=[host.name],
        evc=vm.evc, instructions=None, cpuid_log=cpuid.entries, exceptions=exceptions.entries,
        cpuid_totals=dict(cpuid.counts), exception_totals=dict(exceptions.counts),
        left_out={"cpuid_exits": cpuid.left_out, "cpuid_exit_counts": cpuid.other_keys,
                  "exceptions": exceptions.left_out, **outcome.left_out},
        stderr=outcome.stderr.decode("latin-1"), view_features=catalogue().decode(view.table), accel="native",
        migrations=moves.migrations, snapshots=moves.snapshots, syscalls=_calls(outcome),
        unreached=unreached(moves.events),
        notes=[NOTE, f"followed {outcome.tasks} threads and processes through {outcome.execs} execve calls"])


def _calls(outcome) -> dict | None:
    """The program's system calls, counted where it may move into the emulator (every
    call then stops in the supervisor), by name as the emulator's report has them."""
    if outcome.calls is None:
        return None
    counted, unknown = from_native.by_name(outcome.calls)
    return {"total": sum(outcome.calls.values()), "counts": counted, "unknown_others": 0,
            "sample": [from_native.NAMES.get(nr, nr) for nr in outcome.sample],
            "unknown": [{"number": nr, "count": n} for nr, n in unknown.items()]}
