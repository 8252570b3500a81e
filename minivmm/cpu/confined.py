"""What may run on the machine's own CPU for a guest, and why: the native executor's allow-list.

An instruction runs natively (vmm/exits/native.py) only when its whole effect is known
to stay inside what the executor holds for the guest: the general registers (RSP among
them, renamed: the host's stack pointer is never the guest's), the arithmetic flags and
DF, MXCSR's exception flags, XMM/YMM 0-15 (ZMM 0-31 and K0-7 on an AVX-512 host), and one
explicit memory operand whose every byte was checked against the guest's RAM and page
protections before it ran. Nothing else is the guest's to reach: a feature or mnemonic
not named below stays with the engine or the VMM, whatever it is.
"""

from __future__ import annotations

import functools

import iced_x86
from iced_x86 import EncodingKind, InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register, RegisterExt

# CPUID features (iced-x86's names) whose every instruction computes on registers of the
# context and at most its explicit memory operand (tests/test_native_escape.py checks
# each form of each against the rules below, with iced-x86's list of what it uses).
CONFINED_FEATURES = {
    **dict.fromkeys(("SSE", "SSE2", "SSE3", "SSSE3", "SSE4_1", "SSE4_2"),
                    "XMM arithmetic, shuffles and moves (MMX forms name MM registers: refused below)"),
    **dict.fromkeys(("AVX", "AVX2", "FMA", "F16C", "AVX_VNNI", "AVX_IFMA", "AVX_VNNI_INT8", "AVX_NE_CONVERT",
                     "AVX_VNNI_INT16"), "VEX vector work on XMM/YMM 0-15"),
    **dict.fromkeys(("AES", "PCLMULQDQ", "SHA", "VAES", "VPCLMULQDQ", "GFNI"), "cryptographic rounds on vectors"),
    **dict.fromkeys(("BMI1", "BMI2", "ADX", "MOVBE"), "general-register bit work"),
    **dict.fromkeys(("AVX512F", "AVX512VL", "AVX512BW", "AVX512DQ", "AVX512CD", "AVX512_VBMI", "AVX512_VBMI2",
                     "AVX512_IFMA", "AVX512_VNNI", "AVX512_BITALG", "AVX512_VPOPCNTDQ", "AVX512_BF16",
                     "AVX512_FP16", "AVX512_VP2INTERSECT"),
                    "EVEX vector work on ZMM 0-31 under K0-7 (an AVX-512 host only)"),
}
# Instructions every x86-64 CPU has that may join a run, by mnemonic: integer work on
# general registers and flags. Division (#DE), the stack, control flow, string
# instructions, segment, descriptor-table, system, x87 and MSR instructions are not here.
GENERAL = frozenset(getattr(Mnemonic, m) for m in (
    "MOV", "MOVZX", "MOVSX", "MOVSXD", "LEA", "XCHG", "XADD", "CMPXCHG", "ADD", "ADC", "SUB", "SBB", "AND", "OR",
    "XOR", "CMP", "TEST", "NOT", "NEG", "INC", "DEC", "SHL", "SAL", "SHR", "SAR", "ROL", "ROR", "RCL", "RCR",
    "SHLD", "SHRD", "BT", "BTS", "BTR", "BTC", "BSF", "BSR", "BSWAP", "IMUL", "MUL", "CBW", "CWDE", "CDQE", "CWD",
    "CDQ", "CQO", "NOP", "MOVNTI", "CLC", "STC", "CMC",
    "SETO", "SETNO", "SETB", "SETAE", "SETE", "SETNE", "SETBE", "SETA", "SETS", "SETNS", "SETP", "SETNP", "SETL",
    "SETGE", "SETLE", "SETG", "CMOVO", "CMOVNO", "CMOVB", "CMOVAE", "CMOVE", "CMOVNE", "CMOVBE", "CMOVA", "CMOVS",
    "CMOVNS", "CMOVP", "CMOVNP", "CMOVL", "CMOVGE", "CMOVLE", "CMOVG"))
# Within the confined features: the MXCSR load/store (a reserved bit would fault in the
# VMM; minivmm carries them out, exits/xsave.py) and the XSAVE family (the machine's layout).
NOT_CONFINED = frozenset(getattr(Mnemonic, m) for m in (
    "LDMXCSR", "STMXCSR", "VLDMXCSR", "VSTMXCSR"))
_FEATURES = {v: k for k, v in vars(iced_x86.CpuidFeature).items() if k.isupper()}
_BASELINE = frozenset(("INTEL8086", "INTEL186", "INTEL286", "INTEL386", "INTEL486", "X64", "CMOV"))
_SEGMENTS = frozenset((Register.FS, Register.GS))   # an operand's override: rebased on the guest's base
# A bit string: with a register offset the bit lies anywhere within +-2^63 bits of the
# operand (SDM Vol. 2A, BT), far outside the bytes its operand names.
BIT_STRING = frozenset((Mnemonic.BT, Mnemonic.BTS, Mnemonic.BTR, Mnemonic.BTC))


def _register_allowed(register: int, wide: bool) -> bool:
    if RegisterExt.is_gpr(register) or register == Register.RIP:
        return True
    if RegisterExt.is_xmm(register) or RegisterExt.is_ymm(register) or RegisterExt.is_zmm(register):
        return RegisterExt.number(register) < (32 if wide else 16)
    return wide and RegisterExt.is_k(register)


@functools.cache
def _kind_refusal(code: int, mnemonic: int, features: tuple[int, ...]) -> str | None:
    """By the form's features and mnemonic (cached per form: ``code`` determines both)."""
    names = {_FEATURES.get(f, "") for f in features}
    if mnemonic in NOT_CONFINED:
        return "it loads or stores MXCSR"
    if names <= _BASELINE:
        return None if mnemonic in GENERAL else "not an integer instruction of the allow-list"
    outside = sorted(names - _BASELINE - set(CONFINED_FEATURES))
    if outside:
        return f"{', '.join(outside)} is not on the allow-list"
    return None


def refusal(instr, wide: bool) -> str | None:
    """Why ``instr`` may not run on the machine's CPU for a guest, or None when it may."""
    if instr.encoding not in (EncodingKind.LEGACY, EncodingKind.VEX) and not (
            wide and instr.encoding == EncodingKind.EVEX):
        return "its encoding is not held by the context"
    why = _kind_refusal(instr.code, instr.mnemonic, tuple(instr.cpuid_features()))
    if why:
        return why
    info = InstructionInfoFactory().info(instr)
    explicit = [i for i in range(instr.op_count) if instr.op_kind(i) == OpKind.MEMORY]
    for used in info.used_registers():
        # FS/GS only as the override of the memory operand (rebased), never loaded or read (MOV Sreg)
        override = used.register in _SEGMENTS and used.register == instr.memory_segment \
            and (explicit or instr.mnemonic == Mnemonic.VMASKMOVDQU) \
            and not any(instr.op_kind(i) == OpKind.REGISTER and instr.op_register(i) == used.register
                        for i in range(instr.op_count))
        if not (override or _register_allowed(used.register, wide)):
            return "it uses a register the context does not hold"
    if instr.mnemonic in BIT_STRING and explicit and instr.op1_kind == OpKind.REGISTER:
        return "a bit string with a register offset reaches beyond its operand"
    accesses = [u for u in info.used_memory() if u.access != OpAccess.NO_MEM_ACCESS]
    if accesses and not explicit and instr.mnemonic != Mnemonic.VMASKMOVDQU:
        return "it accesses memory no operand names"
    if instr.is_vsib and address32(instr):
        return "a vector-indexed operand with a 32-bit address"
    named = names_rsp(instr) or RegisterExt.full_register(instr.memory_base) == Register.RSP and explicit
    if not named and any(RegisterExt.full_register(u.register) == Register.RSP for u in info.used_registers()):
        return "it uses the stack"
    return None


def address32(instr) -> bool:
    """An address-size prefix (67h): the effective address is computed in 32 bits (a
    32-bit base or index, EIP, or a bare 32-bit displacement)."""
    return instr.memory_displ_size == 4 or any(
        r == Register.EIP or RegisterExt.is_gpr32(r) for r in (instr.memory_base, instr.memory_index))


def names_rsp(instr) -> bool:
    """RSP (or ESP, SP, SPL) as a register operand: the thunk renames it."""
    return any(instr.op_kind(i) == OpKind.REGISTER and RegisterExt.full_register(instr.op_register(i)) == Register.RSP
               for i in range(instr.op_count))
