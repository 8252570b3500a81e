"""A VM on the machine's own CPU (``accel="kvm"``): QEMU's ``-accel kvm -cpu host,-feature``.

The host is the machine itself, so the view may only hide what the machine has: KVM
cannot make the machine lack an instruction (that is what the emulated profiles are
for). After installing the table the VMM reads it back from KVM: a hypervisor that
shows bits the view hides (a paravirtual KVM such as PVM, which runs guests without
hardware virtualization, shows the machine's leaf 1 and 7 features) is refused,
naming them, rather than run a guest on a view that is not the one asked for.
"""

from __future__ import annotations

import mmap
import time

from ..accel.kvm import KvmMachine, unusable_reason
from ..cpu.features import catalogue
from ..cpu.table import CpuidTable
from ..errors import MinivmmError
from ..masking.view import CR4_OSXSAVE, GuestCpuidView
from .exits.io import IoExits
from .report import RunResult, Stop

ACCELERATORS = ("tcg", "kvm", "native")
NOT_VISIBLE = ("CPUID executions and exceptions are not visible to the VMM under --accel kvm: the hardware "
               "answers CPUID from the installed table and delivers exceptions to the guest's IDT itself")


def refuse_beyond_machine(accel: str, host, view: GuestCpuidView) -> None:
    """An accelerator on the machine's own CPU refuses another host than the machine and
    a view that shows what the machine lacks: it cannot make the CPU lack an instruction."""
    if host.name != "native":
        raise MinivmmError(f"--accel {accel} runs on this machine's own CPU: use --host native, not {host.name} "
                           f"(the emulated profiles can make a machine lack an instruction)")
    extra = sorted(catalogue().decode(view.table) - host.physical - {"hypervisor"})  # every VMM shows that one
    if extra:
        raise MinivmmError(f"--accel {accel}: the CPUID view shows {', '.join(extra)}, which this machine lacks: "
                           f"a mask on the machine's own CPU may only hide features")


def check_view(host, view: GuestCpuidView) -> None:
    """Refuse what KVM cannot do (refuse_beyond_machine), or where KVM cannot run."""
    refuse_beyond_machine("kvm", host, view)
    reason = unusable_reason()
    if reason:
        raise MinivmmError(f"--accel kvm: {reason}")


def entries(view: GuestCpuidView) -> list[tuple[int, int, int, int, int, int]]:
    table = view.seen_with(0)  # KVM sets OSXSAVE (and the APIC bit) from the vCPU's state itself
    return [(leaf, sub, *table.query(leaf, sub)) for leaf, sub in table]


def shown_anyway(view: GuestCpuidView, installed: dict) -> list[str]:
    """Features the view hides that KVM's table shows."""
    seen = CpuidTable(installed, view.table.origin)
    return sorted(catalogue().decode(seen) - catalogue().decode(view.table) - {"osxsave", "hypervisor", "apic"})


def run_on_kvm(vm, timeout: float | None, console, boot) -> RunResult:
    """Run ``vm`` (an ABI guest) to its end on the machine's CPU. ``boot`` is the VM's
    power-on state: (gdt, gdt_base, cr0, cr4, xcr0, mxcsr)."""
    gdt, gdt_base, cr0, cr4, xcr0, mxcsr = boot
    ram = mmap.mmap(-1, vm.memory)
    for address, data, _ in vm.image.segments:
        ram[address:address + len(data)] = data
    ram[gdt_base:gdt_base + len(gdt)] = gdt
    machine = KvmMachine(ram)
    try:
        machine.set_cpuid(entries(vm.view), vm.view.indexed_leaves)
        forced = shown_anyway(vm.view, machine.cpuid())
        if forced:
            raise MinivmmError(f"--accel kvm: this machine's KVM shows {', '.join(forced)} whatever the CPUID "
                               f"table says, so the view asked for cannot be shown (run without --accel kvm to "
                               f"use the emulated native profile)")
        machine.boot(gdt_base, len(gdt) - 1, cr0, cr4, vm.image.entry, vm.memory & ~0xF,
                     xcr0 if cr4 & CR4_OSXSAVE else None, mxcsr)
        status = []
        io = IoExits(console, status.append, lambda n: False)
        deadline = time.monotonic() + timeout if timeout else None
        how, detail = machine.run(lambda port, value, size: io.write(port, size, value), io.read, deadline)
    finally:
        machine.close()
    if how == "stopped":
        stop = Stop("exited", status[0], message=f"guest powered off with status {status[0]}")
    elif how == "halted":
        stop = Stop("halted", rip=detail, instruction="hlt", message="guest executed hlt")
    elif how == "limit":
        stop = Stop("limit", message=f"time budget of {timeout:g} s exhausted")
    else:
        stop = Stop("crashed", message=detail)
    return RunResult(guest=vm.image.name, stop=stop, console=io.console.decode("latin-1"), host=vm.host.name,
                     hosts=[vm.host.name], evc=vm.evc, instructions=None, cpuid_log=[], checkpoints=io.checkpoints,
                     unknown_port_writes=dict(io.unknown_writes), engine_model="", memory=vm.memory, ram=ram,
                     view_features=catalogue().decode(vm.view.table), accel="kvm", notes=[NOT_VISIBLE],
                     left_out={"cpuid_exits": 0, "cpuid_exit_counts": 0, "exceptions": 0,
                               "console": io.console_left_out, "stderr": 0})
