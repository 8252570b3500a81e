"""Signal system calls (kernel/signal.c): dispositions, the blocked mask, the alternate
stack, rt_sigreturn, and signals a program sends itself. Delivery is
:mod:`minivmm.linux.signals`."""

from __future__ import annotations

import struct

import unicorn.x86_const as x86

from ..errno import EINVAL, ENOMEM, EPERM, ESRCH, SyscallError
from ..process import AT_MINSIGSTKSZ, XFEATURES_DYNAMIC
from ..signals import (SIG_DFL, SIG_IGN, SS_DISABLE, SS_ONSTACK, UNBLOCKABLE, Action, read_action,
                       write_action)
from .base import RETURNED, signed32

FATAL_BY_DEFAULT = frozenset(range(1, 32)) - {17, 18, 20, 21, 22, 23, 28}  # not SIGCHLD, SIGCONT, SIGTSTP ...
SIG_BLOCK, SIG_UNBLOCK, SIG_SETMASK = 0, 1, 2
MINSIGSTKSZ = 2048                     # arch/x86/include/uapi/asm/signal.h
SS_AUTODISARM = 1 << 31                # SS_FLAG_BITS: a mode's flag, not a mode
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
    """do_sigaltstack (kernel/signal.c): EPERM while running on the alternate stack,
    EINVAL for an unknown mode, ENOMEM below MINSIGSTKSZ, and, once the process may use
    AMX's tiles, for a stack no larger than their frame (sigaltstack_size_valid). The old
    one, as it was, says whether RSP is on it."""
    wanted = struct.unpack("<Qi4xQ", k.p.read(new, 24)) if new else None   # ss_flags signed, as uc_stack packs it
    sp, flags, size = k.signals.altstack
    rsp = uc.reg_read(x86.UC_X86_REG_RSP)
    on_it = not flags & SS_AUTODISARM and size and sp < rsp <= sp + size   # on_sig_stack
    if wanted:
        if on_it:
            raise SyscallError(EPERM)
        new_sp, new_flags, new_size = wanted
        mode = new_flags & 0xFFFFFFFF & ~SS_AUTODISARM
        if mode not in (0, SS_ONSTACK, SS_DISABLE):
            raise SyscallError(EINVAL)
        if wanted != (sp, flags, size):   # what is asked is what it has: nothing is checked
            if mode == SS_DISABLE:
                new_sp = new_size = 0
            elif new_size < MINSIGSTKSZ or k.p.xcomp_perm & XFEATURES_DYNAMIC and new_size <= k.p.aux(AT_MINSIGSTKSZ):
                raise SyscallError(ENOMEM)
            k.signals.altstack = (new_sp, new_flags, new_size)
    if old:
        k.p.write(old, struct.pack("<QI4xQ", sp, (SS_ONSTACK if on_it else 0 if size else SS_DISABLE)
                                   | flags & SS_AUTODISARM, size))
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
