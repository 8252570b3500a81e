"""x87 floating-point exceptions, which the engine records but never raises.

An x87 exception whose FCW mask bit is clear is pending once it occurs: the CPU raises
#MF at the next waiting x87 instruction (or WAIT), before it executes (SDM Vol. 1, 8.6
"x87 FPU Exception Synchronization"; Vol. 3A, 6.15, interrupt 16). The engine sets
FSW's flags and ES and raises nothing, so minivmm raises it. While the guest's control
word unmasks an exception, every waiting x87 instruction exits and checks; with all of
them masked (FCW 0x37F, which every guest starts with) no x87 instruction exits at all.
The instructions that load the control word exit to tell which of the two it is.

The engine's x87 also leaves out some exception flags themselves; while checking,
minivmm records the one programs meet most, a load of a signalling NaN (#IA, SDM Vol. 1,
8.5.1.1), as the CPU would.
"""

from __future__ import annotations

import unicorn.x86_const as x86
from iced_x86 import Code, Mnemonic, OpCodeTableKind
from unicorn import UcError

from .emulate import memory_address

MASKS = 0x3F                 # FCW/FSW: IE DE ZE OE UE PE
IE, ES, BUSY = 0x01, 0x80, 0x8000
# FLD m32fp / m64fp: (size, exponent mask, quiet bit) of the format
LOADS = {Code.FLD_M32FP: (4, 0x7F800000, 1 << 22), Code.FLD_M64FP: (8, 0x7FF0000000000000, 1 << 51)}
# FCW is the first word of what each of these loads (SDM Vol. 1, Figures 8-9 to 8-12; FXRSTOR's image)
CONTROL_LOADS = frozenset((Mnemonic.FLDCW, Mnemonic.FLDENV, Mnemonic.FRSTOR, Mnemonic.FXRSTOR, Mnemonic.FXRSTOR64))
# si_code for the first pending exception, as Linux picks it (arch/x86/kernel/fpu/core.c,
# fpu__exception_code): invalid (and stack fault), zero divide, overflow, underflow or
# denormal, precision.
FPE_CODES = ((0x01, 7), (0x04, 3), (0x08, 4), (0x12, 5), (0x20, 6))


def waiting(instr) -> bool:
    """An x87 instruction (D8-DF) that checks for pending exceptions first, or WAIT:
    every one but the FN* forms (SDM Vol. 1, 8.3.12)."""
    if instr.mnemonic == Mnemonic.WAIT:
        return True
    info = instr.op_code()
    first = info.op_code >> 8 if info.op_code > 0xFF else info.op_code
    return info.table == OpCodeTableKind.NORMAL and 0xD8 <= first <= 0xDF and not info.is_fpu_no_wait


def unmasked(fcw: int) -> bool:
    return fcw & MASKS != MASKS


class X87Exceptions:
    """Whether waiting x87 instructions exit (``checking``), shared by every engine of a
    run; ``generation`` tells classifiers that their cached decisions are stale."""

    def __init__(self):
        self.checking = False
        self.generation = 0

    def switch(self, checking: bool) -> None:
        self.checking = checking
        self.generation += 1

    @staticmethod
    def loaded_control_word(uc, instr) -> int | None:
        """The FCW ``instr`` is about to load, or None if its operand cannot be read
        (the engine's own access then faults)."""
        try:
            return int.from_bytes(uc.mem_read(memory_address(uc, instr), 2), "little")
        except UcError:
            return None

    @staticmethod
    def pending(uc) -> int:
        """The exception flags FSW holds that FCW unmasks: nonzero means #MF is due."""
        return uc.reg_read(x86.UC_X86_REG_FPSW) & ~uc.reg_read(x86.UC_X86_REG_FPCW) & MASKS

    @staticmethod
    def record(uc, instr) -> None:
        """Set the exception flags ``instr`` raises and the engine leaves out (before it
        executes: the CPU sets them as it executes, and the next waiting instruction
        takes them)."""
        if instr.code not in LOADS:
            return
        size, exponent, quiet = LOADS[instr.code]
        try:
            value = int.from_bytes(uc.mem_read(memory_address(uc, instr), size), "little")
        except UcError:
            return
        if value & exponent == exponent and value & (exponent - 1) & ~(exponent | quiet) and not value & quiet:
            fcw = uc.reg_read(x86.UC_X86_REG_FPCW)
            uc.reg_write(x86.UC_X86_REG_FPSW, uc.reg_read(x86.UC_X86_REG_FPSW) | IE
                         | (ES | BUSY if unmasked(fcw) and not fcw & IE else 0))

    @staticmethod
    def signal_code(pending: int) -> int:
        return next(code for bits, code in FPE_CODES if pending & bits)
