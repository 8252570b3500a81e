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

from iced_x86 import Decoder

from ..accel import ptrace
from ..accel.supervisor import SI_KERNEL, Program, Supervisor
from ..cpu import isa
from ..cpu.features import catalogue
from ..errors import MinivmmError
from ..linux.cpuinfo import cpuinfo
from ..linux.process import DEFAULT_ENV, hwcap, hwcap2
from ..linux.start import linux_cr4
from ..masking.view import GuestCpuidView
from .accelerated import refuse_beyond_machine
from .exits.faults import VECTOR_NAMES
from .log import ExitLog
from .report import SIGNALS, RunResult, Stop

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


def run_supervised(vm, timeout: float | None, console) -> RunResult:
    host, view, image, linux = vm.host, vm.view, vm.image, vm.linux
    shown = hwcap2(view)
    cpuid, exceptions = ExitLog(lambda entry: entry[0]), ExitLog(lambda entry: entry["vector"])
    program = Program(
        path=image.path, argv=[image.linux["execfn"], *linux.argv],
        env=list(linux.env if linux.env is not None else DEFAULT_ENV), answer=answers(view, cpuid), hwcap=hwcap(view),
        hwcap2=lambda machine: machine & ~HWCAP2_FSGSBASE | shown, cpuinfo=cpuinfo(host, view),
        on_fault=lambda fault: exceptions.add(describe(fault)), stdin=linux.stdin)
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
        notes=[NOTE, f"followed {outcome.tasks} threads and processes through {outcome.execs} execve calls"])
