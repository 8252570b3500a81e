"""x87 floating-point exceptions, which the engine records but never raises.

An x87 exception whose FCW mask bit is clear is pending once it occurs: the CPU raises
#MF at the next waiting x87 instruction (or WAIT), before it executes (SDM Vol. 1, 8.6
"x87 FPU Exception Synchronization"; Vol. 3A, 6.15, interrupt 16). The engine sets
FSW's flags and ES and raises nothing, so minivmm raises it. While the guest's control
word unmasks an exception, every waiting x87 instruction exits and checks; with all of
them masked (FCW 0x37F, which every guest starts with) only the few below exit.
The instructions that load the control word exit to tell which of the two it is.

The engine's x87 also leaves out some exception flags themselves. While checking,
minivmm records a load of a signalling NaN (#IA, SDM Vol. 1, 8.5.1.1), as the CPU
would. FCOMI, FUCOMI (and their popping forms) and FISTTP always exit, masked or not,
and are carried out here where the engine is wrong (SDM Vol. 2A, FCOMI/FUCOMI; FISTTP):
a compare raises #IA for a NaN operand (FUCOMI: only for a signalling one), an
unsupported format or an empty register (#IS), and #D for a denormal one; FISTTP raises
#IA for what does not fit the integer (storing the integer indefinite), #P for what it
truncates. An unmasked one leaves the instruction half done, as the machine does: the
compare sets EFLAGS but does not pop, FISTTP neither stores nor pops.
"""

from __future__ import annotations

from fractions import Fraction

import unicorn.x86_const as x86
from iced_x86 import Code, Mnemonic, OpCodeTableKind, Register
from unicorn import UcError

from .emulate import memory_address

MASKS = 0x3F                 # FCW/FSW: IE DE ZE OE UE PE
IE, DE, PE, SF, ES, C1, BUSY = 0x01, 0x02, 0x20, 0x40, 0x80, 0x200, 0x8000
TOP = 0x3800
EMPTY = 3                    # a register's tag (FPTAG, two bits a physical register)
RFLAGS_COMPARE = 0x8D5       # OF SF ZF AF PF CF: FCOMI sets ZF PF CF and clears the rest
ZF, PF, CF = 0x40, 0x04, 0x01
# the compares, and whether each is unordered (a quiet NaN raises nothing)
COMPARES = {Mnemonic.FCOMI: False, Mnemonic.FCOMIP: False, Mnemonic.FUCOMI: True, Mnemonic.FUCOMIP: True}
POPS = frozenset((Mnemonic.FCOMIP, Mnemonic.FUCOMIP, Mnemonic.FISTTP))
CARRIED_OUT = frozenset(COMPARES) | {Mnemonic.FISTTP}   # these always exit
# FLD m32fp / m64fp: (size, exponent mask, quiet bit) of the format
LOADS = {Code.FLD_M32FP: (4, 0x7F800000, 1 << 22), Code.FLD_M64FP: (8, 0x7FF0000000000000, 1 << 51)}
STORES = {Code.FISTTP_M16INT: 16, Code.FISTTP_M32INT: 32, Code.FISTTP_M64INT: 64}   # FISTTP: bits stored
FP = tuple(getattr(x86, f"UC_X86_REG_FP{i}") for i in range(8))
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
    def carry_out(uc, address: int, size: int, instr, store) -> None:
        """What the engine leaves out of ``instr`` (no exception pending): its exception
        flags, set before it executes (the next waiting instruction takes them), or the
        whole instruction where the engine would do it wrong. ``store(address, data)``
        writes guest memory as the program's store would, False where that would fault
        (the engine's own store then raises it, nothing changed)."""
        if instr.mnemonic in COMPARES:
            _compare(uc, address, size, instr)
        elif instr.mnemonic == Mnemonic.FISTTP:
            _truncate(uc, address, size, instr, store)
        elif instr.code in LOADS:
            _load(uc, instr)

    @staticmethod
    def signal_code(pending: int) -> int:
        return next(code for bits, code in FPE_CODES if pending & bits)


def _load(uc, instr) -> None:
    size, exponent, quiet = LOADS[instr.code]
    try:
        value = int.from_bytes(uc.mem_read(memory_address(uc, instr), size), "little")
    except UcError:
        return
    if value & exponent == exponent and value & (exponent - 1) & ~(exponent | quiet) and not value & quiet:
        _raise(uc, IE)


def _compare(uc, address, size, instr) -> None:
    """FCOMI/FUCOMI ST0, ST(i) (SDM Vol. 2A): unordered (ZF PF CF = 111) with #IA, the
    comparison with #D; masked, the engine's own compare does the rest."""
    a, b = _register(uc, 0), _register(uc, instr.op1_register - Register.ST0)
    kinds = {_kind(*a), _kind(*b)}
    invalid = kinds & ({"empty", "unsupported", "snan"} | (set() if COMPARES[instr.mnemonic] else {"qnan"}))
    exception = IE | (SF if "empty" in kinds else 0) if invalid else DE if "denormal" in kinds and "qnan" not in kinds \
        else 0
    fcw = uc.reg_read(x86.UC_X86_REG_FPCW)
    if not exception or exception == DE and fcw & DE:   # the engine's compare is right: the flags alone
        _raise(uc, exception, clear=C1)
        return
    # Carried out here: an empty register's stale value must not be compared, and an
    # unmasked exception leaves the stack unpopped (as the machine does).
    if invalid:   # unordered, masked or not (Intel's CPUs; the SDM's pseudocode sets them when masked)
        flags = ZF | PF | CF
    else:
        x, y = _value(*a), _value(*b)
        flags = ZF if x == y else CF if x < y else 0
    uc.reg_write(x86.UC_X86_REG_RFLAGS, uc.reg_read(x86.UC_X86_REG_RFLAGS) & ~RFLAGS_COMPARE | flags)
    masked = not exception & ~fcw & MASKS
    _raise(uc, exception, clear=C1, pop=masked and instr.mnemonic in POPS)
    _done(uc, address, size)


def _truncate(uc, address, size, instr, store) -> None:
    """FISTTP m16/m32/m64 (SDM Vol. 2A): #IA (and the integer indefinite, 100..0b)
    for a NaN, an infinity, an unsupported format or a value whose truncation does not
    fit; #P where truncating changed the value."""
    bits = STORES[instr.code]
    top = _register(uc, 0)
    kind = _kind(*top)
    value = int(_value(*top)) if kind in ("normal", "denormal", "zero") else None
    fits = value is not None and -(1 << bits - 1) <= value < 1 << bits - 1
    if fits:   # the engine stores and pops; truncating never rounds up (C1 = 0)
        _raise(uc, PE if _value(*top) != value else 0, clear=C1)
        return
    exception = IE | (SF if kind == "empty" else 0)
    masked = not exception & ~uc.reg_read(x86.UC_X86_REG_FPCW) & MASKS
    target = memory_address(uc, instr)
    if masked and not store(target, (1 << bits - 1).to_bytes(bits // 8, "little")):   # the integer indefinite
        return
    _raise(uc, exception, clear=C1, pop=masked)
    uc.reg_write(x86.UC_X86_REG_FDP, target)
    _done(uc, address, size)


def _register(uc, i: int) -> tuple[int, int, bool]:
    """ST(i): (mantissa, sign and exponent, empty). The engine's FP0-7 and FPTAG are the
    physical registers; ST(i) is physical register TOP + i."""
    physical = ((uc.reg_read(x86.UC_X86_REG_FPSW) & TOP) >> 11) + i & 7
    mantissa, exponent = uc.reg_read(FP[physical])
    return mantissa, exponent, uc.reg_read(x86.UC_X86_REG_FPTAG) >> 2 * physical & 3 == EMPTY


def _kind(mantissa: int, exponent: int, empty: bool) -> str:
    """The operand class of an extended-precision value (SDM Vol. 1, 8.2.2, Table 8-3):
    an unnormal, pseudo-NaN or pseudo-infinity (integer bit clear, exponent not 0) is an
    unsupported format; a pseudo-denormal counts as a denormal."""
    biased = exponent & 0x7FFF
    if empty:
        return "empty"
    if biased and not mantissa >> 63:
        return "unsupported"
    if biased == 0x7FFF:
        return "infinity" if not mantissa << 1 & (1 << 64) - 1 else "qnan" if mantissa >> 62 & 1 else "snan"
    if biased == 0:
        return "denormal" if mantissa else "zero"
    return "normal"


def _value(mantissa: int, exponent: int, _empty: bool = False) -> Fraction | float:
    """The exact value of a non-NaN operand (a denormal's exponent is that of 1)."""
    sign = -1 if exponent & 0x8000 else 1
    biased = exponent & 0x7FFF
    if biased == 0x7FFF:
        return sign * float("inf")
    return sign * Fraction(mantissa) * Fraction(2) ** (max(biased, 1) - 16383 - 63)


def _raise(uc, exception: int, clear: int = 0, pop: bool = False) -> None:
    """Set ``exception`` in FSW, with ES and B where FCW unmasks it (the next waiting
    instruction raises #MF); ``pop``: free ST0 and increment TOP."""
    fsw = uc.reg_read(x86.UC_X86_REG_FPSW) & ~clear | exception
    if exception & ~uc.reg_read(x86.UC_X86_REG_FPCW) & MASKS:
        fsw |= ES | BUSY
    if pop:
        physical = (fsw & TOP) >> 11
        uc.reg_write(x86.UC_X86_REG_FPTAG, uc.reg_read(x86.UC_X86_REG_FPTAG) | EMPTY << 2 * physical)
        fsw = fsw & ~TOP | (physical + 1 & 7) << 11
    uc.reg_write(x86.UC_X86_REG_FPSW, fsw)


def _done(uc, address: int, size: int) -> None:
    """The instruction was carried out here: the last x87 instruction pointer is its
    address (the engine keeps FIP), execution goes on after it."""
    uc.reg_write(x86.UC_X86_REG_FIP, address)
    uc.reg_write(x86.UC_X86_REG_RIP, address + size)
