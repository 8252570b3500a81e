"""The virtual machine: guest RAM, a vCPU on an emulated host, and the run loop.

Power-on builds the machine state of SPEC section 2 (long mode, GDT, CR0/CR4/XCR0,
stack at the top of RAM), freezes the guest CPUID view, and wires the exit
handlers of :mod:`minivmm.intercept`. ``run`` executes until the guest powers off,
halts, crashes or exhausts a budget, and never lets a guest take the VMM down.
"""

from __future__ import annotations

import re
import struct
import threading
import time

import unicorn
import unicorn.x86_const as x86
from unicorn import (UC_ARCH_X86, UC_ERR_FETCH_UNMAPPED, UC_ERR_READ_UNMAPPED,
                     UC_ERR_WRITE_UNMAPPED, UC_HOOK_INSN_INVALID, UC_HOOK_INTR,
                     UC_HOOK_MEM_UNMAPPED, UC_MODE_64, Uc, UcError)

from . import isa
from .cpuidview import CR4_OSXSAVE, GuestCpuidView
from .errors import MinivmmError
from .evc import evc_mode
from .features import catalogue
from .intercept import CpuidExitHandler, IoExitHandler
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

VECTOR_NAMES = {0: "#DE", 1: "#DB", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
                10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC",
                18: "#MC", 19: "#XM"}


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

    def _power_on(self) -> Uc:
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.ctl_set_cpu_model(getattr(x86, f"UC_CPU_X86_{self.host.engine_model}"))
        uc.mem_map(0, self.memory)
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
            self._enable_xsave(uc)
        uc.reg_write(x86.UC_X86_REG_RFLAGS, 0x2)
        uc.reg_write(x86.UC_X86_REG_RSP, self.memory & ~0xF)
        uc.reg_write(x86.UC_X86_REG_RIP, self.image.entry)
        return uc

    def _enable_xsave(self, uc: Uc):
        """CR4.OSXSAVE and XCR0 = x87|SSE, as firmware and an OS leave them."""
        uc.reg_write(x86.UC_X86_REG_CR4, CR4_BOOT | CR4_OSXSAVE)
        if not uc.reg_read(x86.UC_X86_REG_CR4) & CR4_OSXSAVE:
            return  # the engine model has no XSAVE: the guest sees OSXSAVE clear
        # XCR0 is reachable only through XSETBV: run it from the VMM's own area.
        stub = bytes.fromhex("31c9" "b803000000" "31d2" "0f01d1" "f4")  # xor ecx; mov eax,3; xor edx; xsetbv; hlt
        saved = uc.mem_read(BOOT_STUB, len(stub))
        uc.mem_write(BOOT_STUB, stub)
        try:
            uc.emu_start(BOOT_STUB, NEVER, count=len(stub))
        except UcError:
            uc.reg_write(x86.UC_X86_REG_CR4, CR4_BOOT)  # no XSETBV on this model after all
        uc.mem_write(BOOT_STUB, bytes(saved))
        for reg in (x86.UC_X86_REG_RAX, x86.UC_X86_REG_RCX, x86.UC_X86_REG_RDX):
            uc.reg_write(reg, 0)

    # ---- running -------------------------------------------------------------------

    def run(self, max_insns: int | None = None, timeout: float | None = None,
            console=None) -> RunResult:
        """Run to completion. ``console`` receives guest console bytes as they appear."""
        uc = self._power_on()
        stop: list[Stop] = []
        errors: list[BaseException] = []

        def end(s: Stop):
            if not stop:
                stop.append(s)
            uc.emu_stop()

        def fail(e: BaseException):
            errors.append(e)
            uc.emu_stop()

        cpuid = CpuidExitHandler(self.view, self.host.name, fail)
        cpuid.install(uc)
        io = IoExitHandler(console, lambda status: end(Stop("exited", status, message=f"guest powered off with status {status}")),
                           lambda n: None)
        io.install(uc)
        uc.hook_add(UC_HOOK_INSN_INVALID, lambda uc, _ud: self._on_invalid(uc, end) or True)
        uc.hook_add(UC_HOOK_INTR, lambda uc, intno, _ud: self._on_interrupt(uc, intno, end))
        uc.hook_add(UC_HOOK_MEM_UNMAPPED, lambda uc, access, address, size, value, _ud:
                    self._on_unmapped(uc, access, address, end))

        executed = None
        if max_insns:
            executed = self._run_counted(uc, max_insns, timeout, stop, end)
        else:
            self._run_sliced(uc, timeout, stop, errors, end)
        if errors:
            raise errors[0]
        return RunResult(
            guest=self.image.name, stop=stop[0], console=io.console.decode("latin-1"), host=self.host.name,
            hosts=[self.host.name], evc=self.evc, instructions=executed,
            cpuid_log=cpuid.log, checkpoints=io.checkpoints,
            unknown_port_writes=dict(io.unknown_writes), engine_model=self.host.engine_model,
            memory=self.memory)

    def _run_counted(self, uc, max_insns, timeout, stop, end) -> int | None:
        """One start with the engine's exact instruction count (slower per instruction,
        so used only when a budget in instructions is asked for)."""
        started = time.monotonic()
        try:
            uc.emu_start(self._rip(uc), NEVER, count=max_insns,
                         timeout=int(timeout * 1e6) if timeout else 0)
        except UcError as e:
            end(self._engine_error(uc, e))
        if stop:
            return None
        if self._after_hlt(uc):
            end(Stop("halted", rip=self._rip(uc) - 1, instruction="hlt", message="guest executed hlt"))
            return None
        if timeout and time.monotonic() - started >= timeout:
            end(Stop("limit", rip=self._rip(uc), message=f"time budget of {timeout:g} s exhausted"))
            return None
        end(Stop("limit", rip=self._rip(uc), message=f"instruction budget of {max_insns} exhausted"))
        return max_insns

    def _run_sliced(self, uc, timeout, stop, errors, end):
        """Full-speed slices between watchdog stops, until a stop reason appears."""
        deadline = time.monotonic() + timeout if timeout else None
        watchdog = _Watchdog(uc, SLICE_SECONDS)
        try:
            while not stop and not errors:
                watchdog.arm()
                try:
                    uc.emu_start(self._rip(uc), NEVER)
                except UcError as e:
                    if not stop:
                        end(self._engine_error(uc, e))
                ticked = watchdog.disarm()
                if stop or errors:
                    break
                # HLT ends emu_start with no hook of its own. A watchdog stop lands on a
                # block boundary; only one right after an F4 byte that is not HLT (the end
                # of a not-taken "jcc -12") would be mistaken for it.
                if self._after_hlt(uc):
                    end(Stop("halted", rip=self._rip(uc) - 1, instruction="hlt", message="guest executed hlt"))
                elif not ticked:
                    end(Stop("crashed", rip=self._rip(uc), message="the engine stopped the guest for no known reason"))
                elif deadline and time.monotonic() >= deadline:
                    end(Stop("limit", rip=self._rip(uc), message=f"time budget of {timeout:g} s exhausted"))
        finally:
            watchdog.close()

    @staticmethod
    def _rip(uc) -> int:
        return uc.reg_read(x86.UC_X86_REG_RIP)

    def _after_hlt(self, uc) -> bool:
        # The engine ends emu_start after HLT with RIP past it; HLT has no hook of its own.
        rip = self._rip(uc)
        return 0 < rip <= self.memory and uc.mem_read(rip - 1, 1) == b"\xf4"

    def _fault(self, uc, vector: int, rip: int, detail: str = "") -> Stop:
        try:
            code = bytes(uc.mem_read(rip, 15))
        except UcError:
            code = b""
        instruction, needs = isa.decode(code, rip) if code else ("(unmapped)", [])
        missing = [f for f in needs if f not in self.host.physical] if vector == 6 else []
        name = VECTOR_NAMES.get(vector, f"vector {vector}")
        message = f"{name} at 0x{rip:x} ({instruction})"
        if missing:
            message += f": needs {', '.join(missing)}, which {self.host.name} lacks"
        if detail:
            message += f": {detail}"
        return Stop("crashed", vector=vector, rip=rip, instruction=instruction,
                    missing_features=missing, message=message + "; no IDT to deliver it")

    def _on_invalid(self, uc, end):
        end(self._fault(uc, 6, self._rip(uc)))

    def _on_interrupt(self, uc, intno, end):
        end(self._fault(uc, intno, self._rip(uc)))

    def _on_unmapped(self, uc, access, address, end):
        kind = {unicorn.UC_MEM_FETCH_UNMAPPED: "fetch from", unicorn.UC_MEM_READ_UNMAPPED: "read of",
                unicorn.UC_MEM_WRITE_UNMAPPED: "write to"}.get(access, "access to")
        rip = self._rip(uc)
        end(self._fault(uc, 14, rip, f"{kind} 0x{address:x} beyond guest RAM (0x{self.memory:x} bytes)"))
        return False

    def _engine_error(self, uc, error: UcError) -> Stop:
        rip = self._rip(uc)
        if error.errno in (UC_ERR_FETCH_UNMAPPED, UC_ERR_READ_UNMAPPED, UC_ERR_WRITE_UNMAPPED):
            return self._fault(uc, 14, rip, str(error))
        return Stop("crashed", rip=rip, message=f"engine stopped the guest at 0x{rip:x}: {error}")


def run(guest: GuestImage | str, host: HostProfile | str = "nehalem", **options) -> RunResult:
    """Build a VM and run it: ``run("hello", host="penryn", timeout=5)``."""
    run_options = {k: options.pop(k) for k in ("max_insns", "timeout", "console") if k in options}
    return VM(guest, host, **options).run(**run_options)


__all__ = ["VM", "run", "parse_size", "LOAD_ADDRESS"]
