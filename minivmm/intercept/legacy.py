"""LZCNT and TZCNT on hosts without ABM/BMI1: they execute as BSR and BSF.

Intel SDM Vol. 2A (LZCNT, TZCNT): on processors without the feature the encoding
(F3 0F BD / F3 0F BC) is a REP-prefixed BSR/BSF and the prefix is ignored. A guest that
uses LZCNT without asking CPUID gets silently different answers there. When the engine
model has the feature, this exit computes the BSR/BSF result instead.
"""

from __future__ import annotations

import unicorn.x86_const as x86
from iced_x86 import OpKind, Register, RegisterExt

ZF = 1 << 6


def _unicorn_register(register: int) -> int:
    name = next(k for k, v in vars(Register).items() if v == register)
    return getattr(x86, f"UC_X86_REG_{name}")


def bit_scan(uc, address: int, size: int, instr, reverse: bool) -> None:
    """Execute ``instr`` (LZCNT/TZCNT r, r/m) as BSR (reverse) or BSF, then step over it."""
    bits = 8 * RegisterExt.size(instr.op0_register)
    if instr.op1_kind == OpKind.REGISTER:
        source = uc.reg_read(_unicorn_register(instr.op1_register))
    else:
        where = instr.virtual_address(1, 0, lambda reg, _i, _n: uc.reg_read(_unicorn_register(reg)))
        source = int.from_bytes(uc.mem_read(where, bits // 8), "little")
    source &= (1 << bits) - 1
    flags = uc.reg_read(x86.UC_X86_REG_RFLAGS)
    if source == 0:
        uc.reg_write(x86.UC_X86_REG_RFLAGS, flags | ZF)  # destination unchanged
    else:
        index = source.bit_length() - 1 if reverse else (source & -source).bit_length() - 1
        # A 32-bit destination zero-extends into the 64-bit register (Intel SDM Vol. 1, 3.4.1.1).
        target = RegisterExt.full_register(instr.op0_register) if bits == 32 else instr.op0_register
        uc.reg_write(_unicorn_register(target), index)
        uc.reg_write(x86.UC_X86_REG_RFLAGS, flags & ~ZF)
    uc.reg_write(x86.UC_X86_REG_RIP, address + size)

