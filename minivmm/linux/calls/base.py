"""What every table of system calls shares."""

from __future__ import annotations

import dis

from ..errno import ENOSYS, SyscallError

RETURNED = object()  # a handler that set every register itself (rt_sigreturn, a signal)


def signed(value: int) -> int:
    """A register as the C ``long`` (or ``int``, with ``bits``) the kernel reads."""
    return value - (1 << 64) if value >> 63 else value


def signed32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >> 31 else value


def sys_enosys(k, uc, *_):
    raise SyscallError(ENOSYS)


def sys_zero(k, uc, *_):
    return 0


def reads_cpu(handler) -> bool:
    """Whether a handler touches the engine it is given (its second parameter): reads or
    saves registers, writes RIP. One that never names it cannot (the kernel keeps no
    engine of its own), so the VMM need not move RIP past the SYSCALL before it runs."""
    name = handler.__code__.co_varnames[1]
    return any(instr.argval == name for instr in dis.get_instructions(handler)
               if instr.opname.startswith(("LOAD_", "STORE_", "DELETE_")))
