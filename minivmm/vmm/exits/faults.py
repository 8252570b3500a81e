"""Fault exits: #UD and every other exception, delivered through the guest's IDT.

Sources: a planted #UD exit (the host lacks the instruction's feature), the engine's
own invalid-opcode exit, its interrupt exit (#DE, #BP, #GP, INT n ...), and accesses
beyond guest RAM (delivered as #PF). An instruction the host has but the engine cannot
execute exactly ends the run as ``unsupported``; a fault that cannot be delivered
(no IDT, gate not present, handler or stack outside RAM) ends it as ``crashed``.
"""

from __future__ import annotations

import unicorn.x86_const as x86
from iced_x86 import Code, Decoder, Mnemonic, Register
from unicorn import UcError

from ...cpu import isa
from .. import engine, idt
from ..log import ExitLog
from ..report import SIGNALS, Stop
from .emulate import EMULATED, TRANSACTIONAL
from .native import Fault
from .xsave import CARRIED_OUT

VECTOR_NAMES = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
                10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC", 18: "#MC",
                19: "#XM", 21: "#CP"}
PF_PRESENT, PF_WRITE, PF_USER, PF_FETCH = 1, 1 << 1, 1 << 2, 1 << 4
SEGV_MAPERR, SEGV_ACCERR = 1, 2
MAPPED = 8                   # a Linux program's protection byte: some mapping is there
# vector -> signal Linux sends the process (arch/x86/kernel/traps.c): #DE/#MF/#XM SIGFPE,
# #DB/#BP SIGTRAP, #UD SIGILL, #NP/#SS/#AC SIGBUS, #GP/#PF and the rest SIGSEGV.
VECTOR_SIGNALS = {0: 8, 1: 5, 3: 5, 6: 4, 11: 7, 12: 7, 13: 11, 14: 11, 16: 8, 17: 7, 19: 8}
# vector -> (si_code, si_addr; None: the faulting RIP, or CR2 for #PF): ILL_ILLOPN,
# FPE_INTDIV, SEGV_MAPERR; #MF's code is the pending exception's (the exit gives it)
# and its address the waiting instruction (math_error); others SI_KERNEL without an
# address.
SIGNAL_CODES = {6: (2, None), 0: (1, None), 14: (1, None), 16: (0x80, None)}


# The gates of Linux's IDT a program may use (arch/x86/kernel/idt.c: SYSG, DPL 3): #BP
# (INT3, INT $3), #OF (INT $4) and the 32-bit system call (IA32_SYSCALL_VECTOR, with
# IA32 emulation); every other vector's gate has DPL 0, so INT n there is #GP (SDM Vol.
# 3A, 6.12.1.1).
COMPAT_VECTOR = 0x80
DECODES_KEPT = 4096             # faulting instructions whose decode is kept
USER_GATES = frozenset((3, 4, COMPAT_VECTOR))


def _name(vector: int) -> str:
    return VECTOR_NAMES.get(vector, f"vector {vector}")


def _contributory(vector: int) -> bool:
    return vector in idt.CONTRIBUTORY or vector == 14


class FaultExits:
    def __init__(self, host, memory: int, end, exceptions: ExitLog | None = None):
        self.host = host
        self.memory = memory
        self._end = end              # end(Stop): finish the run
        self.exceptions = ExitLog(lambda entry: entry["vector"]) if exceptions is None else exceptions
        self.signals = False         # a Linux program: faults become the signals Linux sends
        self.on_signal = None        # (uc, signo, si_code, si_addr, vector, error) -> bool: its handler ran
        self.on_compat_call = None   # (uc): a Linux program's INT $0x80, RIP after it
        self.native = None           # a NativeExecutor: what the engine cannot run, the machine may
        self.counting = lambda: False  # the engine counts instructions: one native instruction an exit
        self.xsave = None              # an XsaveUnit where the host has XSAVE
        self.ram = None                # guest RAM as a host buffer (identity-mapped): reads without the engine
        self.on_write = None           # (address, size): the VMM wrote guest RAM (InstructionExits.note_write)
        self._controls = None
        self._enabled: set[int] = set()   # instruction forms the controls were seen to allow
        self._decodes: dict[tuple[int, bytes], tuple] = {}   # (RIP, bytes) -> (instruction, text)

    # -- what the instruction is -------------------------------------------------------

    def _instruction(self, uc, rip: int):
        return self._decoded(uc, rip)[0]

    def _decoded(self, uc, rip: int) -> tuple:
        """The instruction at ``rip`` and its text ((None, "(bad)") where none is), kept
        for its bytes: a guest taking the same fault in a loop decodes it once."""
        try:
            code = bytes(self.ram[rip:rip + 15]) if self.ram is not None and rip + 15 <= self.memory \
                else bytes(uc.mem_read(rip, 15))
        except UcError:
            return None, "(bad)"
        known = self._decodes.get((rip, code))
        if known is None:
            instr = Decoder(64, code, ip=rip).decode()
            known = (None, "(bad)") if instr.code == Code.INVALID else (instr, isa.disassemble(instr))
            if len(self._decodes) >= DECODES_KEPT:
                self._decodes.clear()
            self._decodes[(rip, code)] = known
        return known

    def _record(self, vector, rip, instruction, features, delivered, message=""):
        entry = {"vector": vector, "name": _name(vector), "rip": rip,
                 "instruction": instruction, "features": sorted(features), "delivered": delivered,
                 "host": self.host.name}
        if message:
            entry["message"] = message
        self.exceptions.add(entry)

    # -- delivery --------------------------------------------------------------------------

    def deliver(self, uc, vector: int, rip: int, error_code: int | None = None, instr=None,
                missing=(), detail: str = "", external: bool = True, si_code: int | None = None,
                text: str | None = None) -> bool:
        """Enter the guest's handler for ``vector``, or end the run as crashed. A gate
        whose code segment is unusable raises #GP/#NP in its place; two contributory
        faults make #DF, and a fault delivering #DF is a triple fault (SDM Vol. 3A,
        6.15, Table 6-5)."""
        if instr is None:
            instr, text = self._decoded(uc, rip)
        elif text is None:
            text = isa.disassemble(instr)
        if self.signals:
            return self._signal(uc, vector, rip, text, missing, detail, error_code, si_code)
        first = vector
        while True:
            try:
                idt.deliver(uc, vector, rip, self.memory, error_code, external, self.ram, self.on_write)
                break
            except idt.GateFault as fault:
                self._record(vector, rip, text, missing, False, f"{_name(vector)} not delivered: {fault}")
                if vector == 8:
                    return self._crash(uc, first, rip, text, missing, detail, f"triple fault: {fault}")
                double = _contributory(vector) and _contributory(fault.vector)
                vector, error_code = (8, 0) if double else (fault.vector, fault.error_code)
                missing, detail, external = (), str(fault), True
            except idt.DeliveryFailed as e:
                return self._crash(uc, vector, rip, text, missing, detail, f"cannot deliver it: {e}")
        self._record(vector, rip, text, missing, True)
        if vector in idt.CONTRIBUTORY or vector == 14:
            engine.forget_exception(uc)
        return True

    def _signal(self, uc, vector, rip, text, missing, detail, error_code, si_code) -> bool:
        """What Linux's trap handlers send (arch/x86/kernel/traps.c): to the program's
        handler on an rt_sigframe, or fatal (no handler, ignored or blocked: force_sig)."""
        signo = VECTOR_SIGNALS.get(vector, 11)
        name = SIGNALS[signo]
        code, address = SIGNAL_CODES.get(vector, (0x80, 0))  # SI_KERNEL, as for #GP
        code = code if si_code is None else si_code
        if address is None:
            address = uc.reg_read(x86.UC_X86_REG_CR2) if vector == 14 else rip
        if self.on_signal and self.on_signal(uc, signo, code, address, vector, error_code or 0):
            self._record(vector, rip, text, missing, True, f"{name} delivered to the program's handler")
            return True
        message = f"{name} from {_name(vector)} at {rip:#x} ({text})"
        if missing:
            message += f": needs {', '.join(missing)}, which {self.host.name} lacks"
        if detail:
            message += f": {detail}"
        self._record(vector, rip, text, missing, False, message)
        self._end(Stop("signaled", 128 + signo, signal=name, vector=vector, rip=rip, instruction=text,
                       missing_features=list(missing), message=message))
        uc.emu_stop()
        return False

    def _crash(self, uc, vector, rip, text, missing, detail, why) -> bool:
        message = f"{_name(vector)} at {rip:#x} ({text})"
        if missing:
            message += f": needs {', '.join(missing)}, which {self.host.name} lacks"
        if detail:
            message += f": {detail}"
        message += f"; {why}"
        self._record(vector, rip, text, missing, False, message)
        self._end(Stop("crashed", vector=vector, rip=rip, instruction=text,
                       missing_features=list(missing), message=message))
        uc.emu_stop()
        return False

    def undefined(self, uc, rip: int, instr, missing) -> None:
        """#UD for an instruction whose feature the host lacks."""
        self.deliver(uc, 6, rip, instr=instr, missing=sorted(missing))

    def unsupported(self, uc, rip: int, instr) -> None:
        """An instruction the host has and the engine cannot run: unless the guest has
        not enabled what it needs, which makes it the architecture's #UD. Where the
        machine has it too, it runs on the machine's own CPU."""
        reason = self._os_disabled(uc, instr)
        if reason:
            self.deliver(uc, 6, rip, instr=instr, detail=reason)
            return
        if instr.mnemonic in TRANSACTIONAL:
            vector = TRANSACTIONAL[instr.mnemonic](uc, rip, instr.len, instr)
            if vector is not None:
                self.deliver(uc, vector, rip, 0, instr=instr, detail="outside a transaction")
            return
        if self.xsave is not None and instr.mnemonic in CARRIED_OUT:
            try:
                if self.xsave.carry_out(uc, rip, instr):
                    return
            except Fault as fault:
                self._native_fault(uc, rip, instr, fault)
                return
        if self.native is not None and self.native.runnable(rip, instr):
            try:
                self.native.run(uc, rip, instr, self._control(uc)[0], single=self.counting(),
                                allowed=lambda later: not self._os_disabled(uc, later))
            except Fault as fault:
                self._native_fault(uc, rip, instr, fault)
            return
        text, needs = isa.disassemble(instr), isa.needed_features(instr)
        beyond = sorted(needs - isa.engine_capable()) or sorted(needs)
        lacking = sorted(needs - self.native.machine) if self.native is not None else []
        message = (f"{text} at {rip:#x} needs {', '.join(beyond)}: {self.host.name} has it, but the "
                   f"emulation engine cannot execute it exactly"
                   + (f", and this machine lacks {', '.join(lacking)}" if lacking else ""))
        self._end(Stop("unsupported", rip=rip, instruction=text, missing_features=beyond, message=message))
        uc.emu_stop()

    # -- the engine's exits ------------------------------------------------------------

    def on_invalid(self, uc, rip: int) -> bool:
        """The engine refused the instruction at ``rip``. If the host has it and the guest
        enabled what it needs, the refusal is the engine model's gap: emulate it or stop
        as unsupported. Otherwise it is the architecture's #UD."""
        instr, text = self._decoded(uc, rip)
        missing = []
        # The engine reports INT 6 as the #UD it raises, at the INT
        if self.signals and instr is not None and instr.mnemonic == Mnemonic.INT \
                and self._linux_gate(uc, instr.immediate8, rip, instr.next_ip):
            return True
        if instr is not None:
            needs = isa.needed_features(instr)
            if needs and needs <= self.host.physical and not self._os_disabled(uc, instr):
                if instr.mnemonic in EMULATED:
                    EMULATED[instr.mnemonic](uc, rip, instr.len)
                else:
                    self.unsupported(uc, rip, instr)
                return True
            missing = sorted(needs - self.host.physical)
        self.deliver(uc, 6, rip, instr=instr, missing=missing, text=text)
        return True

    def _control(self, uc) -> tuple[int, int | None]:
        """CR4 and XCR0, read once until the guest may have changed them (MOV CR4 and
        XSETBV are exits: they call forget_control). XCR0 costs a context copy."""
        if self._controls is None:
            self._controls = (uc.reg_read(x86.UC_X86_REG_CR4), engine.read_xcr0(uc))
        return self._controls

    def forget_control(self) -> None:
        self._controls = None
        self._enabled.clear()
        if self.native is not None:  # runs were compiled with what the old controls allowed
            self.native.forget()

    def _os_disabled(self, uc, instr) -> str | None:
        """Why CR4/XCR0 make ``instr`` #UD, or None; None is remembered per instruction
        form until the controls change."""
        if instr.code in self._enabled:
            return None
        cr4, xcr0 = self._control(uc)
        reason = isa.os_disabled(instr, cr4, lambda: xcr0)
        if reason is None:
            self._enabled.add(instr.code)
        return reason

    def on_interrupt(self, uc, vector: int, _ud) -> None:
        rip = uc.reg_read(x86.UC_X86_REG_RIP)
        software = self._software_interrupt(uc, rip, vector)
        if self.signals and software == "int n" and self._linux_gate(uc, vector, rip - 2, rip):
            return
        error = 0 if vector in idt.ERROR_CODE_VECTORS and not software else None
        self.deliver(uc, vector, rip, error, instr=None if software else self._instruction(uc, rip),
                     external=not software)

    def _linux_gate(self, uc, vector: int, at: int, after: int) -> bool:
        """INT n in a Linux program, through its kernel's IDT: the 32-bit system call, or
        #GP(vector * 8 + 2) (IDT, not EXT) at the INT where the gate's DPL is 0 (SDM Vol.
        3A, 6.12.1.1); False for the gates a program may use, which deliver as the CPU
        raised them."""
        if vector == COMPAT_VECTOR:
            uc.reg_write(x86.UC_X86_REG_RIP, after)
            self.on_compat_call(uc)
            return True
        if vector in USER_GATES:
            return False
        uc.reg_write(x86.UC_X86_REG_RIP, at)
        self.deliver(uc, 13, at, vector * 8 + 2, detail=f"INT {vector:#x} through a DPL 0 gate", external=False)
        return True

    @staticmethod
    def _software_interrupt(uc, rip: int, vector: int) -> str | None:
        """Which of INT n, INT3, INTO and INT1 raised ``vector`` (they report RIP after
        themselves and push no error code), or None: an exception."""
        try:
            before = bytes(uc.mem_read(max(rip - 2, 0), 2))
        except UcError:
            return None
        if before == bytes([0xCD, vector]):
            return "int n"
        return {(3, 0xCC): "int3", (4, 0xCE): "into", (1, 0xF1): "int1"}.get((vector, before[1]))

    def _fetching(self, uc, block: int, address: int) -> int:
        """The instruction whose fetch reached ``address``: the engine reports the start
        of its block, but the frame must hold the faulting instruction (SDM Vol. 3A, 6.5:
        a fault's saved RIP points at the instruction that faulted). A block is straight
        code, so walk it from its start."""
        ip = block
        while ip < address:
            instr = Decoder(64, bytes(uc.mem_read(ip, min(15, self.memory - ip))), ip=ip).decode()
            if instr.code == Code.INVALID or instr.next_ip > address:
                return ip
            ip = instr.next_ip
        return ip

    def on_unmapped(self, uc, access: int, address: int, rip: int, kind: str) -> None:
        """An access beyond guest RAM: #PF, as an unmapped page would raise it; #GP(0)
        for a non-canonical address (Intel SDM Vol. 1, 3.3.7.1)."""
        from unicorn import UC_MEM_FETCH_UNMAPPED, UC_MEM_WRITE_UNMAPPED
        if (address >> 47) not in (0, 0x1FFFF):  # #SS through the stack segment (SDM Vol. 3A, 6.15)
            instr = self._instruction(uc, rip)
            stack = instr is not None and (instr.memory_segment == Register.SS or instr.is_stack_instruction)
            self.deliver(uc, 12 if stack else 13, rip, 0, detail=f"{kind} non-canonical address {address:#x}")
            return
        error = (PF_WRITE if access == UC_MEM_WRITE_UNMAPPED else 0) | (PF_FETCH if access == UC_MEM_FETCH_UNMAPPED else 0)
        if access == UC_MEM_FETCH_UNMAPPED and rip < address:
            rip = self._fetching(uc, rip, address)
            uc.reg_write(x86.UC_X86_REG_RIP, rip)
        uc.reg_write(x86.UC_X86_REG_CR2, address)
        self.deliver(uc, 14, rip, error, detail=f"{kind} {address:#x} beyond guest RAM ({self.memory:#x} bytes)")


    def _native_fault(self, uc, rip: int, instr, fault) -> None:
        """What the machine's CPU would have raised, checked before it ran: the guest's."""
        from unicorn import UC_MEM_READ_UNMAPPED, UC_MEM_WRITE_UNMAPPED
        if fault.at is not None:  # an instruction further into a run: the run stopped there
            rip, instr = fault.at, fault.instr
        if fault.vector == 14 and fault.allowed is not None:  # a Linux program's page protections
            access = UC_MEM_WRITE_UNMAPPED if fault.access == "write" else UC_MEM_READ_UNMAPPED
            self.on_denied(uc, access, fault.address, fault.allowed)
            return
        if fault.vector == 14:
            uc.reg_write(x86.UC_X86_REG_CR2, fault.address)
        self.deliver(uc, fault.vector, rip, fault.error, instr=instr, detail=fault.detail)

    def on_denied(self, uc, access: int, address: int, allowed: int) -> None:
        """An access a Linux program's page protections refuse (the engine stopped at
        the instruction): #PF with the error code a CPU would push (present, write,
        user, fetch; SDM Vol. 3A, 4.7) and CR2 the address, and the SIGSEGV code Linux
        picks (arch/x86/mm/fault.c): SEGV_ACCERR where a mapping exists (a write to a
        read-only page, PROT_NONE), SEGV_MAPERR where none does."""
        from unicorn import UC_MEM_FETCH_UNMAPPED, UC_MEM_WRITE_UNMAPPED
        rip = uc.reg_read(x86.UC_X86_REG_RIP)
        fetch, write = access == UC_MEM_FETCH_UNMAPPED, access == UC_MEM_WRITE_UNMAPPED
        if fetch and rip < address:
            rip = self._fetching(uc, rip, address)
            uc.reg_write(x86.UC_X86_REG_RIP, rip)
        error = (PF_PRESENT if allowed & 7 else 0) | (PF_WRITE if write else 0) | PF_USER | (PF_FETCH if fetch else 0)
        uc.reg_write(x86.UC_X86_REG_CR2, address)
        what = "fetch from" if fetch else "write to" if write else "read of"
        state = f"a page mapped {_prot_text(allowed)}" if allowed & MAPPED else "an unmapped page"
        self.deliver(uc, 14, rip, error, detail=f"{what} {address:#x}, {state}",
                     si_code=SEGV_ACCERR if allowed & MAPPED else SEGV_MAPERR)


def _prot_text(allowed: int) -> str:
    return "".join(c if allowed & bit else "-" for c, bit in (("r", 1), ("w", 2), ("x", 4)))
