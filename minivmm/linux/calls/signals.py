"""Signal system calls (kernel/signal.c): dispositions, the blocked mask, the alternate
stack, rt_sigreturn, signals a program sends itself, and waiting for one (pause,
rt_sigsuspend). Delivery is :mod:`minivmm.linux.signals`."""

from __future__ import annotations

import struct

import unicorn.x86_const as x86

from ..errno import EINVAL, ENOMEM, EPERM, ESRCH, SyscallError
from ..process import AT_MINSIGSTKSZ, XFEATURES_DYNAMIC
from ..signals import ERESTARTNOHAND, SS_DISABLE, SS_ONSTACK, UNBLOCKABLE, Action, read_action, write_action
from .base import RETURNED, signed32
from .process import UID

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
        if k.signals.ignored(signo):  # POSIX: a pending signal set to be ignored is discarded
            k.signals.discard(lambda q: q.signo != signo)
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


def _raise(k, uc, target: int, signo: int, code: int, thread: bool = False):
    """The signal is pending, the return to user mode delivers it; si_pid and si_uid
    say who sent it (kill_pid_info): the process itself. ``thread``: ``target`` is one
    of its threads (tkill, tgkill)."""
    if not 0 <= signo <= 64:
        raise SyscallError(EINVAL)
    target = signed32(target)
    if thread and target not in k.threads.all or not thread and target not in (k.p.tid, 0, -1):
        raise SyscallError(ESRCH)  # no other process exists
    if signo:
        k.signals.send(signo, code, struct.pack("<iI", k.p.tid, UID), tid=target if thread else None)
    return 0


def sys_rt_sigpending(k, uc, out, size, *_):
    """The pending signals the mask blocks (do_sigpending)."""
    if size > 8:
        raise SyscallError(EINVAL)
    k.p.write(out, struct.pack("<Q", k.signals.pending_mask() & k.signals.blocked)[:size])
    return 0


def sys_pause(k, uc, *_):
    k.wait(None)
    raise SyscallError(ERESTARTNOHAND)


def sys_rt_sigsuspend(k, uc, mask, size, *_):
    """The mask for the wait; the handler's frame saves the program's own, which
    rt_sigreturn brings back (set_restore_sigmask)."""
    if size != 8:
        raise SyscallError(EINVAL)
    wanted = struct.unpack("<Q", k.p.read(mask, 8))[0] & ~UNBLOCKABLE
    k.signals.saved_mask, k.signals.blocked = k.signals.blocked, wanted
    k.wait(None)
    raise SyscallError(ERESTARTNOHAND)


def sys_tkill(k, uc, tid, signo, *_):
    return _raise(k, uc, tid, signo, SI_TKILL, thread=True)


def sys_tgkill(k, uc, tgid, tid, signo, *_):
    if signed32(tgid) != k.p.tid:
        raise SyscallError(ESRCH)
    return _raise(k, uc, tid, signo, SI_TKILL, thread=True)


TABLE = {
    13: ("rt_sigaction", sys_rt_sigaction), 14: ("rt_sigprocmask", sys_rt_sigprocmask),
    15: ("rt_sigreturn", sys_rt_sigreturn), 131: ("sigaltstack", sys_sigaltstack),
    34: ("pause", sys_pause), 127: ("rt_sigpending", sys_rt_sigpending), 130: ("rt_sigsuspend", sys_rt_sigsuspend),
    200: ("tkill", sys_tkill), 234: ("tgkill", sys_tgkill),
}
