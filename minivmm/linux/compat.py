"""32-bit system calls made from 64-bit code, as a kernel with IA32 emulation takes them
(arch/x86/entry/entry_64_compat.S, arch/x86/entry/common.c): INT $0x80, and SYSENTER on
Intel (on AMD it is #UD in 64-bit mode, the CPU's answer). The number is EAX and the
arguments EBX, ECX, EDX, ESI, EDI and EBP, 32 bits each, numbered by
arch/x86/entry/syscalls/syscall_32.tbl. A call whose arguments a 64-bit handler takes
as they are (numbers, paths, byte buffers, structures laid out alike) runs through
that handler; the others (their structures differ: stat64, iovec, sigaction ...)
return ENOSYS."""

from __future__ import annotations

import unicorn.x86_const as x86

from ..cpu.registers import RegisterBlock
from .errno import EFAULT, SyscallError
from .process import USER_DS
from .signals import SIGSEGV, USER32_CS

# i386 number -> x86-64 number of the same call
COMPAT = {
    1: 60, 3: 0, 4: 1, 5: 2, 6: 3, 10: 87, 12: 80, 20: 39, 24: 102, 33: 21, 41: 32, 45: 12, 47: 104, 49: 107,
    50: 108, 60: 95, 63: 33, 64: 110, 65: 111, 66: 112, 85: 89, 91: 11, 122: 63, 125: 10, 133: 81, 158: 24,
    183: 79, 199: 102, 200: 104, 201: 107, 202: 108, 224: 186, 252: 231, 295: 257, 305: 267, 307: 269, 330: 292,
    355: 318,
}
M32 = 0xFFFFFFFF
# Where SYSENTER's call returns (do_fast_syscall_32): the 32-bit vDSO's int80 landing pad,
# mm->context.vdso + vdso_image_32.sym_int80_landing_pad. minivmm maps no 32-bit vDSO
# (only the 64-bit one, vdso.py), so it is the pad's offset alone (0x5e9 in a 6.x
# kernel's image): page zero, where nothing is ever mapped, so the fetch there faults in
# 32-bit code.
LANDING_PAD = 0x5E9
SEGV_MAPERR, PF_USER, PF_FETCH = 1, 1 << 2, 1 << 4
_CALL = RegisterBlock((x86.UC_X86_REG_RAX, x86.UC_X86_REG_RBX, x86.UC_X86_REG_RCX, x86.UC_X86_REG_RDX,
                       x86.UC_X86_REG_RSI, x86.UC_X86_REG_RDI, x86.UC_X86_REG_RBP))


def int80(kernel, uc) -> None:
    """INT $0x80 (do_int80_emulation): the result in RAX, every other register kept,
    RIP after the INT (the engine left it there); then the return to user mode delivers
    what is pending (a call a signal interrupted starts again at the INT, 2 bytes back)."""
    values = _CALL.read(uc)
    result = kernel.dispatch_compat(uc, values[0] & M32, tuple(v & M32 for v in values[1:]))
    uc.reg_write(x86.UC_X86_REG_RAX, result)
    if kernel.signals.pending:
        kernel.signals.deliver_pending(uc, (values[0] & M32, uc.reg_read(x86.UC_X86_REG_RIP) - 2, result))


def sysenter(kernel, uc) -> None:
    """SYSENTER (entry_SYSENTER_compat, do_SYSENTER_32, do_fast_syscall_32), which
    expects the vDSO's 32-bit caller: the user stack pointer is RBP, and the sixth
    argument the 32 bits at its low half (-EFAULT where they cannot be read; then
    the return is IRET's, which loads ESP). The call returns to the landing pad in 32-bit
    code (SYSRETL: RCX the pad, R11 RFLAGS, R8-R10 cleared), and the fetch there is a
    page fault: SIGSEGV, SEGV_MAPERR, with CS __USER32_CS in the frame."""
    values = _CALL.read(uc)
    sp = values[6]
    try:
        word = int.from_bytes(kernel.p.read(sp & M32, 4), "little")
    except SyscallError:
        uc.reg_write(x86.UC_X86_REG_RAX, -EFAULT & (1 << 64) - 1)
        uc.reg_write(x86.UC_X86_REG_RBP, sp & ~M32)      # get_user zeroes what it could not read
        uc.reg_write(x86.UC_X86_REG_RSP, sp & M32)
    else:
        uc.reg_write(x86.UC_X86_REG_RBP, sp & ~M32 | word)
        uc.reg_write(x86.UC_X86_REG_RAX, kernel.dispatch_compat(
            uc, values[0] & M32, tuple(v & M32 for v in values[1:6]) + (word,)))
        for reg, value in ((x86.UC_X86_REG_RSP, sp), (x86.UC_X86_REG_RCX, LANDING_PAD),
                           (x86.UC_X86_REG_R11, uc.reg_read(x86.UC_X86_REG_RFLAGS)),
                           (x86.UC_X86_REG_R8, 0), (x86.UC_X86_REG_R9, 0), (x86.UC_X86_REG_R10, 0)):
            uc.reg_write(reg, value)
    if kernel.p.exit_status is not None:
        return
    uc.reg_write(x86.UC_X86_REG_RIP, LANDING_PAD)
    uc.reg_write(x86.UC_X86_REG_CR2, LANDING_PAD)
    if not kernel.signals.deliver(uc, SIGSEGV, SEGV_MAPERR, LANDING_PAD, 14, PF_USER | PF_FETCH,
                                  (USER32_CS, USER_DS)):
        why = f"SYSENTER returned to 32-bit code at {LANDING_PAD:#x}, the landing pad of a 32-bit vDSO it has not (#PF)"
        kernel.signals.fatal = kernel.signals.fatal or (SIGSEGV, why)
