"""The virtual machine: guest RAM, a vCPU on an emulated host, and the run loop.

Power-on builds the machine state of SPEC section 2 (long mode, GDT, CR0/CR4/XCR0,
stack at the top of RAM), freezes the guest CPUID view, and wires the exit
handlers of :mod:`minivmm.intercept`. ``run`` executes until the guest powers off,
halts, crashes or exhausts a budget, and never lets a guest take the VMM down.
"""

from __future__ import annotations

import ctypes
import mmap
import re
import struct
import threading
import time

import unicorn.x86_const as x86
from iced_x86 import Code, Mnemonic
from unicorn import (UC_ARCH_X86, UC_HOOK_INSN_INVALID, UC_HOOK_INTR, UC_HOOK_MEM_UNMAPPED,
                     UC_MEM_FETCH_UNMAPPED, UC_MEM_READ_UNMAPPED, UC_MEM_WRITE_UNMAPPED, UC_MODE_64, UC_PROT_ALL,
                     Uc, UcError)

from . import isa
from .audit import Audit
from .cpuidview import CR4_OSXSAVE, GuestCpuidView
from .errors import MinivmmError
from .evc import evc_mode
from .features import catalogue
from .intercept import CpuidExitHandler, FaultExits, InstructionExits, IoExits
from .intercept.emulate import bit_scan
from .loader import LOAD_ADDRESS, GuestImage, load_guest
from .profiles import HostProfile, load_profile
from .report import RunResult, Stop

DEFAULT_MEMORY = 16 << 20
GDT_BASE = 0x1000
VMM_AREA = (0x1000, 0x2000)       # reserved for the VMM's tables (SPEC section 2)
BOOT_STUB = 0x1800                # inside the VMM area: sets XCR0 before the guest runs
GDT = struct.pack("<QQQ", 0, 0x00209A0000000000, 0x0000920000000000)  # null, 64-bit code, data
CODE_SELECTOR, DATA_SELECTOR = 0x08, 0x10
CR0_BOOT = 0x33                   # PE | MP | ET | NE; not EM, not TS
CR4_BOOT = 0x600                  # OSFXSR | OSXMMEXCPT: without them every SSE op is #UD
XCR0_BOOT = 0x3                   # x87 | SSE; the engine cannot execute AVX state
NEVER = 1 << 63                   # a non-canonical "until" address: run until stopped
SLICE_SECONDS = 0.2               # run-loop slice: how soon a timeout or Ctrl-C is seen


def parse_size(text: str | int) -> int:
    """``64M``, ``1G``, ``512K``, ``16MiB`` or a byte count."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(i?[bB])?\s*", str(text))
    if not m:
        raise MinivmmError(f"malformed size '{text}': use bytes or a number with K, M or G (e.g. 64M)")
    return int(m[1]) << {"": 0, "k": 10, "m": 20, "g": 30}[m[2].lower()]


class _Watchdog:
    """Stops the engine every slice so the run loop can check its clock and signals.

    A thread calling ``emu_stop`` slices execution at full speed, where the engine's
    own instruction ``count`` would slow every instruction."""

    def __init__(self, uc, seconds: float):
        self._uc, self._seconds = uc, seconds
        self._lock = threading.Lock()
        self._running = False
        self._done = threading.Event()
        self.ticked = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._done.wait(self._seconds):
            with self._lock:
                if self._running:
                    self.ticked = True
                    self._uc.emu_stop()

    def arm(self):
        with self._lock:
            self._running, self.ticked = True, False

    def disarm(self) -> bool:
        with self._lock:
            self._running = False
            return self.ticked

    def close(self):
        self._done.set()
        self._thread.join()


class VM:
    """One guest on one host profile.

    >>> vm = VM("detect_cpuid", host="penryn")
    >>> result = vm.run(timeout=10)
    >>> result.detections["sse4_1"].cpuid
    True
    """

    def __init__(self, guest: GuestImage | str, host: HostProfile | str = "nehalem",
                 memory: int | str = DEFAULT_MEMORY, evc: str | None = None, masks=()):
        """``evc`` is a VMware EVC key; ``masks`` are :class:`Mask` objects or strings in
        any mask format, applied after the EVC mode's mask, in order."""
        self.image = load_guest(guest) if isinstance(guest, str) else guest
        self.host = load_profile(host) if isinstance(host, str) else host
        self.memory = parse_size(memory)
        self.evc = evc_mode(evc).key if evc else None
        self.view = GuestCpuidView.for_host(self.host, self.evc, masks)
        self._check_layout()

    def _check_layout(self):
        if self.memory % 4096 or self.memory < 2 << 20:
            raise MinivmmError(f"guest memory {self.memory} bytes: must be a multiple of 4 KiB and at least 2M")
        for addr, data in self.image.segments:
            end = addr + len(data)
            if end > self.memory:
                raise MinivmmError(f"{self.image.name}: segment 0x{addr:x}-0x{end:x} lies beyond guest RAM "
                                   f"(0x{self.memory:x} bytes; raise --memory)")
            if addr < VMM_AREA[1] and end > VMM_AREA[0]:
                raise MinivmmError(f"{self.image.name}: segment 0x{addr:x}-0x{end:x} overlaps the VMM's "
                                   f"reserved area 0x1000-0x1fff")
        if not 0 <= self.image.entry < self.memory:
            raise MinivmmError(f"{self.image.name}: entry point 0x{self.image.entry:x} is outside guest RAM")

    # ---- power-on ------------------------------------------------------------------

    def _power_on(self, uc: Uc, exits: InstructionExits) -> None:
        """The machine state of SPEC section 2 on a fresh engine with RAM mapped."""
        for addr, data in self.image.segments:
            uc.mem_write(addr, data)
        uc.mem_write(GDT_BASE, GDT)
        uc.reg_write(x86.UC_X86_REG_GDTR, (0, GDT_BASE, len(GDT) - 1, 0))
        uc.reg_write(x86.UC_X86_REG_CR0, CR0_BOOT)
        uc.reg_write(x86.UC_X86_REG_CR4, CR4_BOOT)
        uc.reg_write(x86.UC_X86_REG_CS, CODE_SELECTOR)
        for reg in (x86.UC_X86_REG_DS, x86.UC_X86_REG_ES, x86.UC_X86_REG_SS):
            uc.reg_write(reg, DATA_SELECTOR)
        if self.view.has(catalogue()["xsave"]):
            self._enable_xsave(uc, exits)
        uc.reg_write(x86.UC_X86_REG_RFLAGS, 0x2)
        uc.reg_write(x86.UC_X86_REG_RSP, self.memory & ~0xF)
        uc.reg_write(x86.UC_X86_REG_RIP, self.image.entry)

    def _enable_xsave(self, uc: Uc, exits: InstructionExits):
        """CR4.OSXSAVE and XCR0 = x87|SSE, as firmware and an OS leave them."""
        uc.reg_write(x86.UC_X86_REG_CR4, CR4_BOOT | CR4_OSXSAVE)
        if not uc.reg_read(x86.UC_X86_REG_CR4) & CR4_OSXSAVE:
            return  # the engine model has no XSAVE: the guest sees OSXSAVE clear
        # XCR0 is reachable only through XSETBV: run it from the VMM's own area.
        stub = bytes.fromhex("31c9" "b803000000" "31d2" "0f01d1" "f4")  # xor ecx; mov eax,3; xor edx; xsetbv; hlt
        saved = uc.mem_read(BOOT_STUB, len(stub))
        uc.mem_write(BOOT_STUB, stub)
        try:
            uc.emu_start(BOOT_STUB, NEVER, count=4)  # up to the XSETBV, not the HLT
        except UcError:
            uc.reg_write(x86.UC_X86_REG_CR4, CR4_BOOT)  # no XSETBV on this model after all
        uc.mem_write(BOOT_STUB, bytes(saved))
        exits.forget(BOOT_STUB)
        for reg in (x86.UC_X86_REG_RAX, x86.UC_X86_REG_RCX, x86.UC_X86_REG_RDX):
            uc.reg_write(reg, 0)

    # ---- running -------------------------------------------------------------------

    def run(self, max_insns: int | None = None, timeout: float | None = None,
            console=None, audit: bool = False) -> RunResult:
        """Run to completion. ``console`` receives guest console bytes as they appear;
        ``audit`` reports instructions that need features the CPUID view hides."""
        return _Run(self, console, audit).run(max_insns, timeout)

    def classifier(self, audit: bool):
        """What an exit at each instruction does on this host (cached per opcode)."""
        physical = self.host.physical
        shown = catalogue().decode(self.view.table) if audit else frozenset()
        actions = {isa.Verdict.RUN: None, isa.Verdict.UD: "ud", isa.Verdict.UNSUPPORTED: "unsupported",
                   isa.Verdict.AS_BSR: "bsr", isa.Verdict.AS_BSF: "bsf"}
        cache: dict[int, tuple] = {}

        def classify(instr):
            result = cache.get(instr.code)
            if result is None:
                if instr.code == Code.INVALID:
                    result = (None, frozenset())
                else:
                    needs = isa.needed_features(instr)
                    action = EXIT_MNEMONICS.get(instr.mnemonic) or actions[isa.verdict(needs, instr.mnemonic, physical)]
                    result = (action, needs - shown if audit else frozenset())
                cache[instr.code] = result
            return result

        return classify


EXIT_MNEMONICS = {Mnemonic.HLT: "hlt", Mnemonic.OUT: "out"}


class _Run:
    """One run of a VM: the engine, its exit handlers, and the loop that drives them."""

    def __init__(self, vm: VM, console, audit: bool):
        self.vm = vm
        self.stop: list[Stop] = []
        self.errors: list[BaseException] = []
        self.pending_fault = None
        self.audit = Audit() if audit else None
        uc = self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.ctl_set_cpu_model(getattr(x86, f"UC_CPU_X86_{vm.host.engine_model}"))
        # Guest RAM is a host buffer the engine maps: the VMM reads it without the engine.
        self.ram = mmap.mmap(-1, vm.memory)
        uc.mem_map_ptr(0, vm.memory, UC_PROT_ALL, ctypes.addressof(ctypes.c_char.from_buffer(self.ram)))
        self.exits = InstructionExits(self.ram, vm.classifier(audit), self._on_exit)
        self.exits.install(uc)
        vm._power_on(uc, self.exits)
        self.cpuid = CpuidExitHandler(vm.view, vm.host.name, self._fail)
        self.cpuid.install(uc)
        self.io = IoExits(console, self._power_off, lambda n: False)
        self.io.install(uc)
        self.faults = FaultExits(vm.host, vm.memory, self._end)
        uc.hook_add(UC_HOOK_INSN_INVALID, self.faults.on_invalid)
        uc.hook_add(UC_HOOK_INTR, self.faults.on_interrupt)
        uc.hook_add(UC_HOOK_MEM_UNMAPPED, self._unmapped)

    def _end(self, stop: Stop) -> None:
        if not self.stop:
            self.stop.append(stop)
        self.uc.emu_stop()

    def _fail(self, error: BaseException) -> None:
        self.errors.append(error)
        self.uc.emu_stop()

    def _power_off(self, status: int) -> None:
        self._end(Stop("exited", status, message=f"guest powered off with status {status}"))

    def _on_exit(self, uc, address, size, action, audited, instr):
        try:
            if audited and self.audit:
                self.audit.count(address, instr, audited)
            if action == "hlt":
                self._end(Stop("halted", rip=address, instruction="hlt", message="guest executed hlt"))
            elif action == "out":
                self.io.on_out_exit(uc, address, size, instr)
            elif action == "ud":
                self.faults.undefined(uc, address, instr, isa.needed_features(instr) - self.vm.host.physical)
            elif action == "unsupported":
                self.faults.unsupported(uc, address, instr, isa.needed_features(instr))
            elif action in ("bsr", "bsf"):
                bit_scan(uc, address, size, instr, reverse=action == "bsr")
        except BaseException as e:  # an exception inside a hook must not vanish
            self._fail(e)

    def _unmapped(self, uc, access, address, size, value, _ud):
        kind = {UC_MEM_FETCH_UNMAPPED: "fetch from", UC_MEM_READ_UNMAPPED: "read of",
                UC_MEM_WRITE_UNMAPPED: "write to"}.get(access, "access to")
        self.pending_fault = (access, address, uc.reg_read(x86.UC_X86_REG_RIP), kind)
        return False  # the engine stops; the run loop delivers #PF

    def run(self, max_insns, timeout) -> RunResult:
        deadline = time.monotonic() + timeout if timeout else None
        watchdog = None if max_insns else _Watchdog(self.uc, SLICE_SECONDS)
        exact = True   # the engine's count restarts when a start is resumed
        try:
            while not self.stop and not self.errors:
                ticked = self._start(watchdog, max_insns, deadline)
                if self.stop or self.errors:
                    break
                if self.pending_fault:
                    access, address, rip, kind = self.pending_fault
                    self.pending_fault = None
                    self.faults.on_unmapped(self.uc, access, address, rip, kind)
                    exact = False
                elif deadline and time.monotonic() >= deadline:
                    self._end(Stop("limit", rip=self._rip(), message=f"time budget of {timeout:g} s exhausted"))
                elif max_insns:
                    self._end(Stop("limit", rip=self._rip(), message=f"instruction budget of {max_insns} exhausted"))
                elif not ticked:
                    self._end(Stop("crashed", rip=self._rip(), message="the engine stopped the guest for no known reason"))
        finally:
            if watchdog:
                watchdog.close()
        if self.errors:
            raise self.errors[0]
        stop = self.stop[0]
        vm = self.vm
        return RunResult(
            guest=vm.image.name, stop=stop, console=self.io.console.decode("latin-1"), host=vm.host.name,
            hosts=[vm.host.name], evc=vm.evc,
            instructions=max_insns if stop.reason == "limit" and max_insns and exact and "instruction" in stop.message else None,
            cpuid_log=self.cpuid.log, exceptions=self.faults.exceptions,
            audit=self.audit.report() if self.audit else [], checkpoints=self.io.checkpoints,
            unknown_port_writes=dict(self.io.unknown_writes), engine_model=vm.host.engine_model,
            memory=vm.memory)

    def _start(self, watchdog, max_insns, deadline) -> bool:
        """One engine start; True if the watchdog stopped it."""
        if watchdog:
            watchdog.arm()
        try:
            remaining = max(deadline - time.monotonic(), 0.001) if deadline else 0
            self.uc.emu_start(self._rip(), NEVER, count=max_insns or 0,
                              timeout=int(remaining * 1e6) if max_insns and deadline else 0)
        except UcError as e:
            if not self.pending_fault and not self.stop:
                self._end(Stop("crashed", rip=self._rip(), message=f"the engine stopped the guest at "
                                                                  f"{self._rip():#x}: {e}"))
        return watchdog.disarm() if watchdog else False

    def _rip(self) -> int:
        return self.uc.reg_read(x86.UC_X86_REG_RIP)


def run(guest: GuestImage | str, host: HostProfile | str = "nehalem", **options) -> RunResult:
    """Build a VM and run it: ``run("hello", host="penryn", timeout=5)``."""
    run_options = {k: options.pop(k) for k in ("max_insns", "timeout", "console") if k in options}
    return VM(guest, host, **options).run(**run_options)


__all__ = ["VM", "run", "parse_size", "LOAD_ADDRESS"]
