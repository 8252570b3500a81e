"""What every table of system calls shares."""

from __future__ import annotations

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
