"""Privileged instructions checked as the architecture checks them.

The engine runs WRMSR/RDMSR of MSRs that do not exist, reserved CR bits, SYSCALL with
EFER.SCE clear and SYSENTER on AMD's long mode as no-ops; hardware faults. Each of these
instructions exits here before it executes: a fault the manuals name is delivered
through the guest's IDT, what the engine cannot do right is done here, and everything
else runs in the engine. Sources: Intel SDM Vol. 2 (the instructions' "Protected Mode
Exceptions" / "64-Bit Mode Exceptions"), Vol. 3A 2.5 (control registers), Vol. 4 (MSRs);
AMD APM Vol. 3 (SYSENTER) and Vol. 2 (EFER).
"""

from __future__ import annotations

import unicorn.x86_const as x86
from iced_x86 import Code, Mnemonic, Register, RegisterExt
from unicorn import UcError

from ...cpu import isa
from ...cpu.features import catalogue
from .emulate import memory_address

CHECKED_MNEMONICS = frozenset({Mnemonic.RDMSR, Mnemonic.WRMSR, Mnemonic.SYSCALL, Mnemonic.SYSENTER, Mnemonic.RDPMC,
                               Mnemonic.XSETBV,  # XSETBV: the engine runs it; the VMM notes XCR0 changed
                               Mnemonic.WRFSBASE, Mnemonic.WRGSBASE, Mnemonic.LDMXCSR})  # at any CPL, below
CHECKED_CODES = frozenset({Code.MOV_CR_R64})     # mov crN, r64 (reads of CRs cannot fault at CPL 0)

EFER, STAR, LSTAR, CSTAR, FMASK = 0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
FS_BASE, GS_BASE, KERNEL_GS_BASE, TSC_AUX = 0xC0000100, 0xC0000101, 0xC0000102, 0xC0000103
SYSENTER_CS, SYSENTER_ESP, SYSENTER_EIP = 0x174, 0x175, 0x176
# The MSRs minivmm's virtual CPUs have (docs/abi.md): any other index is #GP(0), as for
# an MSR the CPU does not implement (SDM Vol. 2B, RDMSR/WRMSR).
COMMON_MSRS = frozenset({0x10, 0x1B, 0xFE, SYSENTER_CS, SYSENTER_ESP, SYSENTER_EIP, 0x179, 0x17A, 0x277, 0x2FF,
                         0x250, 0x258, 0x259, *range(0x200, 0x210), *range(0x268, 0x270),
                         EFER, STAR, LSTAR, CSTAR, FMASK, FS_BASE, GS_BASE, KERNEL_GS_BASE})
VENDOR_MSRS = {"intel": frozenset({0x17, 0x3A, 0x8B, 0x1A0}), "amd": frozenset({0xC0010015})}
CANONICAL_MSRS = frozenset({FS_BASE, GS_BASE, KERNEL_GS_BASE, LSTAR, CSTAR, SYSENTER_ESP, SYSENTER_EIP})
# EFER: SCE, LME, LMA, then bits that exist with a feature (SDM Vol. 4 Table 2-2; APM Vol. 2, 3.1.7).
EFER_ALWAYS = (1 << 0) | (1 << 8) | (1 << 10)
EFER_WITH = {11: "nx", 12: "svm", 14: "fxsr_opt"}
# CR4 bits and the feature that makes each one writable (SDM Vol. 3A, 2.5; KVM's
# __cr4_reserved_bits checks the guest's CPUID the same way). Bits not listed are reserved.
CR4_WITH = {0: "vme", 1: "vme", 2: "tsc", 3: "de", 4: "pse", 5: "pae", 6: "mce", 7: "pge", 8: None, 9: "fxsr",
            10: "sse", 11: "umip", 12: "la57", 13: "vmx", 14: "smx", 16: "fsgsbase", 17: "pcid", 18: "xsave",
            20: "smep", 21: "smap", 22: "pku", 23: ("shstk", "ibt"), 24: "pks"}
CR0_PE, CR0_NW, CR0_CD, CR0_PG = 1 << 0, 1 << 29, 1 << 30, 1 << 31
CR4_PCE = 1 << 8
CONTROL_REGISTERS = frozenset({Register.CR0, Register.CR2, Register.CR3, Register.CR4, Register.CR8})
RFLAGS_RF, RFLAGS_IF, RFLAGS_VM = 1 << 16, 1 << 9, 1 << 17
GPR64 = {getattr(Register, name): getattr(x86, f"UC_X86_REG_{name}")
         for name in ("RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "RSP", *(f"R{i}" for i in range(8, 16)))}
CR_NAMES = {getattr(Register, f"CR{i}"): f"CR{i}" for i in range(16)}


def canonical(value: int) -> bool:
    return (value >> 47) in (0, 0x1FFFF)


class PrivilegedExits:
    """``check(uc, address, size, instr)``: deliver the architecture's fault, or carry
    the instruction out, or let the engine run it."""

    def __init__(self, host, view, faults):
        self.host, self.view, self.faults = host, view, faults
        has = lambda name: view.has(catalogue()[name])  # noqa: E731
        self.msrs = COMMON_MSRS | VENDOR_MSRS.get(host.vendor, frozenset()) | ({TSC_AUX} if has("rdtscp") else set())
        self.efer_valid = EFER_ALWAYS | sum(1 << bit for bit, name in EFER_WITH.items() if has(name))
        self.cr4_valid = sum(1 << bit for bit, needs in CR4_WITH.items()
                             if needs is None or any(has(n) for n in (needs if isinstance(needs, tuple) else (needs,))))
        self.max_phys = (view.answer(0x80000008, 0, 0)[0] & 0xFF or 36) if view.table.in_range(0x80000008) else 36
        self.compat_entry = None   # (uc): a Linux program's SYSENTER, which its kernel takes (Intel)

    def check(self, uc, address: int, size: int, instr) -> None:
        fault = self._fault(uc, address, size, instr)
        if fault:
            vector, detail = fault
            self.faults.deliver(uc, vector, address, 0 if vector == 13 else None, instr=instr, detail=detail)

    def _fault(self, uc, address, size, instr) -> tuple[int, str] | None:
        mnemonic = instr.mnemonic
        if mnemonic == Mnemonic.SYSCALL:
            return self._syscall(uc, address + size)
        if mnemonic == Mnemonic.SYSENTER:
            return self._sysenter(uc)
        if instr.code == Code.MOV_CR_R64 and instr.op0_register not in CONTROL_REGISTERS:
            return 6, f"{CR_NAMES.get(instr.op0_register, 'that control register')} does not exist"  # at any CPL
        if mnemonic in (Mnemonic.WRFSBASE, Mnemonic.WRGSBASE, Mnemonic.LDMXCSR):
            return self._operand(uc, instr)
        cpl = uc.reg_read(x86.UC_X86_REG_CS) & 3
        if cpl:
            return self._user_mode(uc, address + size, instr, cpl)
        if instr.code == Code.MOV_CR_R64 or mnemonic == Mnemonic.XSETBV:
            self.faults.forget_control()  # what the guest enabled may change (the engine carries it out)
        if mnemonic in (Mnemonic.RDMSR, Mnemonic.WRMSR):
            return self._msr(uc, mnemonic == Mnemonic.WRMSR)
        if instr.code == Code.MOV_CR_R64:
            return self._mov_cr(uc, instr)
        if mnemonic == Mnemonic.RDPMC:
            return self._rdpmc(uc, address + size)
        return None

    def _user_mode(self, uc, next_rip: int, instr, cpl: int):
        """Above CPL 0 (a Linux program runs at CPL 3) RDMSR, WRMSR, MOV to a control
        register and XSETBV are #GP(0), and so is RDPMC unless CR4.PCE allows it (SDM
        Vol. 2B, each instruction's exceptions): never carried out."""
        if instr.mnemonic == Mnemonic.RDPMC and uc.reg_read(x86.UC_X86_REG_CR4) & CR4_PCE:
            return self._rdpmc(uc, next_rip)
        return 13, f"{isa.disassemble(instr)} at CPL {cpl}: it needs CPL 0"

    @staticmethod
    def _operand(uc, instr):
        """The engine takes these without the check the CPU makes: #GP(0) for a
        non-canonical base (SDM Vol. 2D, WRFSBASE/WRGSBASE) and for MXCSR's reserved bits
        (Vol. 2A, LDMXCSR; every x86-64 CPU's MXCSR_MASK is 0xFFFF: DAZ exists)."""
        if instr.mnemonic == Mnemonic.LDMXCSR:
            try:
                value = int.from_bytes(uc.mem_read(memory_address(uc, instr), 4), "little")
            except UcError:
                return None  # the engine's own access faults
            return (13, f"MXCSR value {value:#x} sets reserved bits") if value >> 16 else None
        base = uc.reg_read(GPR64[RegisterExt.full_register(instr.op0_register)])
        base &= 0xFFFFFFFF if RegisterExt.is_gpr32(instr.op0_register) else (1 << 64) - 1
        return None if canonical(base) else (13, f"base {base:#x} is not canonical")

    # -- MSRs ---------------------------------------------------------------------------

    def _msr(self, uc, write: bool):
        index = uc.reg_read(x86.UC_X86_REG_ECX) & 0xFFFFFFFF
        if index not in self.msrs:
            return 13, f"MSR {index:#x} does not exist on this CPU"
        if not write:
            return None
        value = (uc.reg_read(x86.UC_X86_REG_EDX) & 0xFFFFFFFF) << 32 | uc.reg_read(x86.UC_X86_REG_EAX) & 0xFFFFFFFF
        if index in CANONICAL_MSRS and not canonical(value):
            return 13, f"MSR {index:#x} takes a canonical address, not {value:#x}"
        if index == EFER and value & ~self.efer_valid:
            return 13, f"reserved EFER bits {value & ~self.efer_valid:#x}"
        if index == TSC_AUX and value >> 32:
            return 13, "TSC_AUX bits 63:32 are reserved"
        return None

    # -- control registers --------------------------------------------------------------

    def _mov_cr(self, uc, instr):
        cr = instr.op0_register
        value = uc.reg_read(GPR64[instr.op1_register])
        if cr == Register.CR0:
            if value >> 32:
                return 13, "CR0 bits 63:32 are reserved"
            if not value & CR0_PE or (value & CR0_NW and not value & CR0_CD) or (value & CR0_PG and not value & CR0_PE):
                return 13, f"CR0 {value:#x} leaves protected mode or is an invalid combination in 64-bit mode"
        elif cr == Register.CR3:
            reserved = ((1 << 63) - 1) & ~((1 << self.max_phys) - 1)
            if not uc.reg_read(x86.UC_X86_REG_CR4) & (1 << 17):
                reserved |= 1 << 63
            if value & reserved:
                return 13, f"CR3 {value:#x} sets bits beyond the {self.max_phys}-bit physical address width"
        elif cr == Register.CR4:
            if value & ~self.cr4_valid:
                return 13, f"reserved CR4 bits {value & ~self.cr4_valid:#x} for this CPU"
        elif cr == Register.CR8:
            if value >> 4:
                return 13, "CR8 bits 63:4 are reserved"
        return None

    # -- fast system calls --------------------------------------------------------------

    def _syscall(self, uc, next_rip: int):
        """SDM Vol. 2B, SYSCALL: #UD while EFER.SCE is clear; otherwise done here. (A
        Linux program's SYSCALL goes to its kernel through the engine's own hook.)"""
        if not uc.reg_read(x86.UC_X86_REG_MSR, EFER) & 1:
            return 6, "SYSCALL with EFER.SCE clear"
        rflags = uc.reg_read(x86.UC_X86_REG_RFLAGS)
        star = uc.reg_read(x86.UC_X86_REG_MSR, STAR)
        uc.reg_write(x86.UC_X86_REG_RCX, next_rip)
        uc.reg_write(x86.UC_X86_REG_R11, rflags & ~RFLAGS_RF)
        uc.reg_write(x86.UC_X86_REG_RFLAGS, rflags & ~uc.reg_read(x86.UC_X86_REG_MSR, FMASK) & ~RFLAGS_RF | 2)
        uc.reg_write(x86.UC_X86_REG_CS, star >> 32 & 0xFFFC)
        uc.reg_write(x86.UC_X86_REG_SS, (star >> 32 & 0xFFFC) + 8)
        uc.reg_write(x86.UC_X86_REG_RIP, uc.reg_read(x86.UC_X86_REG_MSR, LSTAR))
        return None

    def _sysenter(self, uc):
        """APM Vol. 3, SYSENTER: #UD in long mode on AMD (and Hygon's, AMD's Zen). SDM
        Vol. 2B: #GP(0) if IA32_SYSENTER_CS[15:2] is 0; otherwise done here, or a Linux
        program's kernel takes it."""
        if self.host.vendor in ("amd", "hygon"):
            return 6, "SYSENTER is invalid in long mode on AMD processors"
        if self.compat_entry is not None:
            self.compat_entry(uc)
            return None
        selector = uc.reg_read(x86.UC_X86_REG_MSR, SYSENTER_CS) & 0xFFFC
        if not selector:
            return 13, "IA32_SYSENTER_CS is 0"
        rflags = uc.reg_read(x86.UC_X86_REG_RFLAGS)
        uc.reg_write(x86.UC_X86_REG_CS, selector)
        uc.reg_write(x86.UC_X86_REG_SS, selector + 8)
        uc.reg_write(x86.UC_X86_REG_RSP, uc.reg_read(x86.UC_X86_REG_MSR, SYSENTER_ESP))
        uc.reg_write(x86.UC_X86_REG_RFLAGS, rflags & ~(RFLAGS_RF | RFLAGS_IF | RFLAGS_VM))
        uc.reg_write(x86.UC_X86_REG_RIP, uc.reg_read(x86.UC_X86_REG_MSR, SYSENTER_EIP))
        return None

    # -- performance counters -----------------------------------------------------------

    def _rdpmc(self, uc, next_rip: int):
        """SDM Vol. 2B, RDPMC: at CPL 0 it reads a counter; #GP(0) for a counter the CPU
        does not have. No counter is programmed (their MSRs are not modelled), so 0."""
        index = uc.reg_read(x86.UC_X86_REG_ECX) & 0xFFFFFFFF
        if self.host.vendor == "intel":
            leaf_a = self.view.answer(0xA, 0, 0) if self.view.table.in_range(0xA) else (0, 0, 0, 0)
            general, fixed = leaf_a[0] >> 8 & 0xFF, leaf_a[3] & 0x1F
            valid = index < general if not index & (1 << 30) else (index & ~(1 << 30)) < fixed
        else:
            valid = index < (6 if self.view.has(catalogue()["perfctr_core"]) else 4)
        if not valid:
            return 13, f"performance counter {index:#x} does not exist"
        uc.reg_write(x86.UC_X86_REG_RAX, 0)
        uc.reg_write(x86.UC_X86_REG_RDX, 0)
        uc.reg_write(x86.UC_X86_REG_RIP, next_rip)
        return None
