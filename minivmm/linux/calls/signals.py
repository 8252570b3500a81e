"""Signal system calls (kernel/signal.c): dispositions, the blocked mask, the alternate
stack, rt_sigreturn, and signals a program sends itself. Delivery is
:mod:`minivmm.linux.signals`."""

from __future__ import annotations

import struct

import unicorn.x86_const as x86

from ..errno import EINVAL, ESRCH, SyscallError
from ..signals import SIG_DFL, SIG_IGN, UNBLOCKABLE, Action, read_action, write_action
from .base import RETURNED, signed32

FATAL_BY_DEFAULT = frozenset(range(1, 32)) - {17, 18, 20, 21, 22, 23, 28}  # not SIGCHLD, SIGCONT, SIGTSTP ...
SIG_BLOCK, SIG_UNBLOCK, SIG_SETMASK = 0, 1, 2
SI_TKILL, SI_USER = -6, 0


def sys_rt_sigaction(k, uc, signo, act, old, size, *_):
    if not 1 <= signo <= 64 or size != 8 or (act and signo in (9, 19)):  # SIGKILL, SIGSTOP
        raise SyscallError(EINVAL)
    if old:
        write_action(k.p, old, k.signals.actions.get(signo, Action()))
    if act:
        k.signals.actions[signo] = read_action(k.p, act)
    return 0


def sys_rt_sigprocmask(k, uc, how, new, old, size, *_):
    if size != 8:
        raise SyscallError(EINVAL)
    if new:
        mask = struct.unpack("<Q", k.p.read(new, 8))[0] & ~UNBLOCKABLE
        if how not in (SIG_BLOCK, SIG_UNBLOCK, SIG_SETMASK):
            raise SyscallError(EINVAL)
    if old:
        k.p.write(old, struct.pack("<Q", k.signals.blocked))
    if new:
        blocked = k.signals.blocked
        k.signals.blocked = {SIG_BLOCK: blocked | mask, SIG_UNBLOCK: blocked & ~mask, SIG_SETMASK: mask}[how]
    return 0


def sys_sigaltstack(k, uc, new, old, *_):
    if old:
        sp, flags, size = k.signals.altstack
        k.p.write(old, struct.pack("<QiiQ", sp, flags, 0, size))
    if new:
        sp, flags, _, size = struct.unpack("<QiiQ", k.p.read(new, 24))
        k.signals.altstack = (sp, flags, size)
    return 0


def sys_rt_sigreturn(k, uc, *_):
    k.signals.sigreturn(uc)
    return RETURNED


def _raise(k, uc, target: int, signo: int, code: int):
    if not 0 <= signo <= 64:
        raise SyscallError(EINVAL)
    if signed32(target) not in (k.p.tid, 0, -1):
        raise SyscallError(ESRCH)  # no other process exists
    if signo == 0:
        return 0
    action = k.signals.actions.get(signo)
    handler = action.handler if action else SIG_DFL
    if handler == SIG_IGN or (handler == SIG_DFL and signo not in FATAL_BY_DEFAULT):
        return 0
    uc.reg_write(x86.UC_X86_REG_RAX, 0)
    if handler != SIG_DFL and k.signals.deliver(uc, signo, code, 0, 0):
        return RETURNED
    k.signals.fatal = k.signals.fatal or (signo, None)  # or the SIGSEGV its frame ended in
    return 0


def sys_kill(k, uc, pid, signo, *_):
    return _raise(k, uc, pid, signo, SI_USER)


def sys_tkill(k, uc, tid, signo, *_):
    return _raise(k, uc, tid, signo, SI_TKILL)


def sys_tgkill(k, uc, tgid, tid, signo, *_):
    return _raise(k, uc, tid, signo, SI_TKILL)


TABLE = {
    13: ("rt_sigaction", sys_rt_sigaction), 14: ("rt_sigprocmask", sys_rt_sigprocmask),
    15: ("rt_sigreturn", sys_rt_sigreturn), 62: ("kill", sys_kill), 131: ("sigaltstack", sys_sigaltstack),
    200: ("tkill", sys_tkill), 234: ("tgkill", sys_tgkill),
}
