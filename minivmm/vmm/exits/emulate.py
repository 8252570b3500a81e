"""Instructions minivmm executes itself, where the engine would not do what the host does.

* LZCNT and TZCNT on hosts without ABM/BMI1 (Intel SDM Vol. 2A, LZCNT, TZCNT): the
  encoding (F3 0F BD / F3 0F BC) is a REP-prefixed BSR/BSF and the prefix is ignored.
  A guest that uses LZCNT without asking CPUID gets silently different answers there.
  When the engine model has the feature, this exit computes the BSR/BSF result instead.
* RDTSCP on hosts that have it when the engine model does not (QEMU's Nehalem and
  Westmere models leave it out): EDX:EAX = TSC, ECX = IA32_TSC_AUX.
* LAHF/SAHF in 64-bit mode on K8 revision D and later (QEMU's Opteron_G1 model
  leaves LAHF_LM out): AH <-> SF:ZF:0:AF:0:PF:1:CF.
* CLFLUSHOPT and CLWB likewise (QEMU's Skylake-Client model leaves them out): cache
  write-back hints with no architectural effect on emulated memory.
* RTM (XBEGIN, XEND, XABORT, XTEST) on hosts that have it: no engine model does. A
  transaction may abort at any time for any reason (Intel SDM Vol. 1, 16.3.8 "RTM
  Abort Processing"), so every XBEGIN aborts at once and RTM code takes its fallback
  path: the behaviour of a CPU whose transactions never commit, exactly.
"""

from __future__ import annotations

import unicorn.x86_const as x86
from iced_x86 import Mnemonic, OpKind, Register, RegisterExt

from ...cpu import native

ZF = 1 << 6
IA32_TSC_AUX = 0xC0000103


def _unicorn_register(register: int) -> int:
    name = next(k for k, v in vars(Register).items() if v == register)
    return getattr(x86, f"UC_X86_REG_{name}")


def bit_scan(uc, address: int, size: int, instr, reverse: bool) -> None:
    """Execute ``instr`` (LZCNT/TZCNT r, r/m) as BSR (reverse) or BSF, then step over it."""
    bits = 8 * RegisterExt.size(instr.op0_register)
    if instr.op1_kind == OpKind.REGISTER:
        source = uc.reg_read(_unicorn_register(instr.op1_register))
    else:
        where = memory_address(uc, instr)
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



def memory_address(uc, instr) -> int:
    """The linear address of an instruction's memory operand (flat segments, FS/GS bases)."""
    address = instr.memory_displacement  # iced-x86 gives RIP-relative operands as the target
    if instr.memory_base not in (Register.NONE, Register.RIP, Register.EIP):
        address += uc.reg_read(_unicorn_register(instr.memory_base))
    if instr.memory_index != Register.NONE:
        address += uc.reg_read(_unicorn_register(instr.memory_index)) * instr.memory_index_scale
    if instr.memory_segment == Register.FS:
        address += uc.reg_read(x86.UC_X86_REG_FS_BASE)
    elif instr.memory_segment == Register.GS:
        address += uc.reg_read(x86.UC_X86_REG_GS_BASE)
    return address & 0xFFFFFFFFFFFFFFFF


def rdtscp(uc, address: int, size: int) -> None:
    # The engine's RDTSC reads the host's TSC; so does this, for one timebase.
    tsc = native.rdtsc()
    uc.reg_write(x86.UC_X86_REG_RAX, tsc & 0xFFFFFFFF)
    uc.reg_write(x86.UC_X86_REG_RDX, tsc >> 32)
    uc.reg_write(x86.UC_X86_REG_RCX, uc.reg_read(x86.UC_X86_REG_MSR, IA32_TSC_AUX) & 0xFFFFFFFF)
    uc.reg_write(x86.UC_X86_REG_RIP, address + size)


AH_FLAGS = 0xD5  # SF ZF AF PF CF: the flags LAHF/SAHF move (bit 1 always reads 1)


def lahf(uc, address: int, size: int) -> None:
    flags = uc.reg_read(x86.UC_X86_REG_RFLAGS)
    uc.reg_write(x86.UC_X86_REG_AH, (flags & AH_FLAGS) | 0x2)
    uc.reg_write(x86.UC_X86_REG_RIP, address + size)


def sahf(uc, address: int, size: int) -> None:
    flags = uc.reg_read(x86.UC_X86_REG_RFLAGS)
    uc.reg_write(x86.UC_X86_REG_RFLAGS, (flags & ~AH_FLAGS) | (uc.reg_read(x86.UC_X86_REG_AH) & AH_FLAGS))
    uc.reg_write(x86.UC_X86_REG_RIP, address + size)


def cache_hint(uc, address: int, size: int) -> None:
    uc.reg_write(x86.UC_X86_REG_RIP, address + size)


RFLAGS_ARITHMETIC = 0x8D5  # OF SF ZF AF PF CF
GP = 13


# RTM, outside any transaction; each returns the exception to raise instead, or None.
def xbegin(uc, address: int, size: int, instr) -> int | None:
    # The abort: state as at XBEGIN, EAX the abort status (0: no retry hint, no reason
    # bit), execution at the fallback address (SDM Vol. 2, XBEGIN).
    uc.reg_write(x86.UC_X86_REG_RAX, uc.reg_read(x86.UC_X86_REG_RAX) & ~0xFFFFFFFF)
    uc.reg_write(x86.UC_X86_REG_RIP, instr.near_branch_target)
    return None


def xtest(uc, address: int, size: int, instr) -> int | None:
    # ZF = 1 (not in a transaction); CF, OF, SF, PF and AF cleared (SDM Vol. 2, XTEST).
    uc.reg_write(x86.UC_X86_REG_RFLAGS, uc.reg_read(x86.UC_X86_REG_RFLAGS) & ~RFLAGS_ARITHMETIC | ZF)
    uc.reg_write(x86.UC_X86_REG_RIP, address + size)
    return None


def xabort(uc, address: int, size: int, instr) -> int | None:
    uc.reg_write(x86.UC_X86_REG_RIP, address + size)  # a NOP outside a transaction (SDM Vol. 2, XABORT)
    return None


def xend(uc, address: int, size: int, instr) -> int | None:
    return GP  # #GP(0) outside a transaction (SDM Vol. 2, XEND)


# Instructions with an emulation, for hosts that have them and engine models that do not.
EMULATED = {Mnemonic.RDTSCP: rdtscp, Mnemonic.CLFLUSHOPT: cache_hint, Mnemonic.CLWB: cache_hint,
            Mnemonic.LAHF: lahf, Mnemonic.SAHF: sahf}
# ...and for hosts that have them, where no engine model does.
TRANSACTIONAL = {Mnemonic.XBEGIN: xbegin, Mnemonic.XTEST: xtest, Mnemonic.XEND: xend, Mnemonic.XABORT: xabort}
