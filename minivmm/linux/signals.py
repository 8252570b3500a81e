"""Signals as Linux delivers them on x86-64 (arch/x86/kernel/signal.c, signal_64.c):
the handler runs on a real rt_sigframe (return address, ucontext with the saved
registers and the fpstate, siginfo), and rt_sigreturn restores from it, so a handler
can read and change the saved RIP, or leave by siglongjmp.

The fpstate is what the CPU's save instruction writes (arch/x86/kernel/fpu/signal.c):
FXSAVE's 512 bytes without XSAVE; with XSAVE, the standard (non-compacted) XSAVE
layout of what XCR0 enables (x87, SSE, the upper halves of YMM at CPUID.0xD.2's
offset), sw_reserved saying so (FP_XSTATE_MAGIC1, the sizes, the features) and
FP_XSTATE_MAGIC2 after it.

What Linux refuses, minivmm refuses. A frame that cannot be written (no room on the
stack or the alternate stack, no restorer) is force_sigsegv (signal_setup_done). A
frame rt_sigreturn cannot read, or whose fpstate FXRSTOR or XRSTOR would refuse
(misaligned, reserved MXCSR bits, a bad XSAVE header), is signal_fault: force_sig
(SIGSEGV), the registers already restored. CS and SS come from the frame with RPL 3
(restore_sigcontext); what IRET then refuses (a selector that is no user segment, a
non-canonical RIP) is the #GP of the return to user mode, SIGSEGV with the frame's
registers. force_sig runs the program's SIGSEGV handler where it has one and has not
blocked it, and kills the process otherwise.

Signals sent rather than raised by a fault (kill, a timer) are pending until the
return to user mode finds one the mask lets through (kernel/signal.c get_signal): the
lowest-numbered first, every one then handled in turn, a blocked one kept until it is
unblocked. A standard signal pending already is not queued again (legacy_queue); an
ignored one that is not blocked is dropped when it is sent (sig_ignored)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from operator import attrgetter

import unicorn.x86_const as x86

from ..cpu import xstate
from ..cpu.registers import ImageBlock, RegisterBlock
from ..errors import MinivmmError
from .errno import EAGAIN, EINTR, SyscallError
from .process import USER_CS, USER_DS

SIG_DFL, SIG_IGN = 0, 1
SA_SIGINFO, SA_ONSTACK, SA_RESTORER, SA_NODEFER, SA_RESETHAND = 0x4, 0x08000000, 0x04000000, 0x40000000, 0x80000000
SS_ONSTACK, SS_DISABLE = 1, 2
SA_RESTART = 0x10000000
UC_FP_XSTATE, UC_SIGCONTEXT_SS, UC_STRICT_RESTORE_SS = 0x1, 0x2, 0x4
SIGSEGV = 11
# What a signal without a handler does (signal(7)): SIGCHLD, SIGCONT, SIGURG and SIGWINCH
# are ignored, and with no job control SIGTSTP, SIGTTIN and SIGTTOU too; every other one,
# the real-time signals included, ends the process.
FATAL_BY_DEFAULT = frozenset(range(1, 65)) - {17, 18, 20, 21, 22, 23, 28}
# A blocking call a signal interrupts (include/linux/errno.h): restarted when the
# handler has SA_RESTART (ERESTARTSYS), or EINTR whatever the handler says (ERESTARTNOHAND,
# ERESTART_RESTARTBLOCK: pause, sigsuspend, nanosleep) (arch/x86/kernel/signal.c handle_signal).
ERESTARTSYS, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 514, 516
MAX_QUEUED = 4096   # real-time signals a process sends itself pending at once (RLIMIT_SIGPENDING: EAGAIN)
UNBLOCKABLE = (1 << 8) | (1 << 18)  # SIGKILL, SIGSTOP
USER32_CS = 0x23                    # __USER32_CS: 32-bit compatibility mode
# what a frame may change of RFLAGS (arch/x86/kernel/signal.c FIX_EFLAGS): AC OF DF TF
# SF ZF AF PF CF RF, not IF, IOPL, NT or VM
FIX_EFLAGS = 0x40000 | 0x800 | 0x400 | 0x100 | 0x80 | 0x40 | 0x10 | 0x4 | 0x1 | 0x10000
# cleared for the handler (handle_signal): TF, DF, RF
HANDLER_CLEARS = 0x100 | 0x400 | 0x10000
FRAME_SIZE = 8 + 304 + 128      # pretcode, struct ucontext, struct siginfo
FPSTATE_SIZE = 512              # FXSAVE format
XSAVE_HEADER = 64               # XSTATE_BV, XCOMP_BV, reserved (SDM Vol. 1, 13.4.2)
FP_XSTATE_MAGIC1, FP_XSTATE_MAGIC2 = 0x46505853, 0x46505845
# sigcontext's general registers, in order (arch/x86/include/uapi/asm/sigcontext.h)
SIGCONTEXT = ("R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15", "RDI", "RSI", "RBP", "RBX", "RDX", "RAX",
              "RCX", "RSP", "RIP", "EFLAGS")
REG = {name: getattr(x86, f"UC_X86_REG_{'RFLAGS' if name == 'EFLAGS' else name}") for name in SIGCONTEXT}
RSP_AT, RIP_AT, FLAGS_AT = SIGCONTEXT.index("RSP"), SIGCONTEXT.index("RIP"), SIGCONTEXT.index("EFLAGS")
# vector -> (signal, si_code) as the trap handlers set them (arch/x86/kernel/traps.c)
ILL_ILLOPN, FPE_INTDIV, SEGV_MAPERR, TRAP_BRKPT, SI_KERNEL = 2, 1, 1, 1, 0x80
SI_TIMER = -2                    # a POSIX timer's (include/uapi/asm-generic/siginfo.h)


@dataclass
class Queued:
    """A pending signal: its siginfo's code and fields (the union after si_code), and the
    POSIX timer that sent it, whose fields are made when it is delivered (the overrun)."""
    signo: int
    code: int
    fields: bytes = b""
    timer: int | None = None
    tid: int | None = None       # a thread's own (tgkill), else the process's: the first thread not blocking it


SIGNO = attrgetter("signo")


def _ignores(signo: int, handler: int) -> bool:
    """What ``handler`` does with ``signo`` is nothing (sig_handler_ignored)."""
    return handler == SIG_IGN or handler == SIG_DFL and signo not in FATAL_BY_DEFAULT


@dataclass
class Action:
    handler: int = SIG_DFL
    flags: int = 0
    restorer: int = 0
    mask: int = 0


def read_action(process, address: int) -> Action:
    """struct kernel_sigaction: handler, flags, restorer, mask (8 bytes each)."""
    return Action(*struct.unpack("<QQQQ", process.read(address, 32)))


def write_action(process, address: int, action: Action) -> None:
    process.write(address, struct.pack("<QQQQ", action.handler, action.flags, action.restorer, action.mask))


def xsave_layout(view) -> dict[int, tuple[int, int, bool]]:
    """The view's XSAVE components (:func:`minivmm.cpu.xstate.layout`); empty without XSAVE."""
    if not view.table.in_range(0xD) or not view.answer(1, 0, 0)[2] >> 26 & 1:
        return {}
    return xstate.layout(lambda leaf, sub: view.answer(leaf, sub, 0))


# The extended components a frame holds: YMM's upper halves, and with the holder of
# the opmask registers (an AVX-512 host) K0-7, ZMM_Hi256 and Hi16_ZMM.
CARRIED = (2, 5, 6, 7)


def _carried(opmasks) -> list[int]:
    return [i for i in CARRIED if i == xstate.YMM_COMPONENT or opmasks is not None]


def _xsave_size(xcr0: int, layout: dict[int, tuple[int, int, bool]]) -> int:
    """The XSAVE area of XCR0's components (the kernel's fpstate->user_size)."""
    return max([FPSTATE_SIZE + XSAVE_HEADER] + [at + size for i, (at, size, _) in layout.items() if xcr0 >> i & 1])


def _xsave(uc, xcr0: int, layout: dict[int, tuple[int, int, bool]], opmasks=None) -> bytes:
    """The standard-format XSAVE image of x87, SSE, YMM and (AVX-512 hosts) the opmask
    and ZMM components: what the engine and the native executor hold."""
    size = _xsave_size(xcr0, layout)
    area = bytearray(size + 4)
    area[:FPSTATE_SIZE] = xstate.fxsave_image(uc)
    present = xcr0 & 0x3
    for i in _carried(opmasks):
        if i in layout and xcr0 >> i & 1:
            data = xstate.component(uc, i, opmasks)
            area[layout[i][0]:layout[i][0] + len(data)] = data
            present |= 1 << i
    struct.pack_into("<Q", area, FPSTATE_SIZE, present)                               # XSTATE_BV
    struct.pack_into("<IIQI", area, 464, FP_XSTATE_MAGIC1, size + 4, xcr0, size)      # sw_reserved
    struct.pack_into("<I", area, size, FP_XSTATE_MAGIC2)
    return bytes(area)


def _canonical(address: int) -> bool:
    return address >> 47 in (0, 0x1FFFF)


def _iret_refuses(cs: int, ss: int, rip: int) -> tuple[int, str] | None:
    """What IRETQ to CPL 3 refuses with #GP, and its error code, checking the return CS,
    then SS, then RIP (SDM Vol. 2A, IRET): Linux's GDT has the user code segments
    __USER32_CS and __USER_CS and one user data segment, __USER_DS."""
    if cs not in (USER_CS, USER32_CS):
        return cs & 0xFFFC, f"CS {cs:#x} is no user code segment"
    if ss != USER_DS:
        return ss & 0xFFFC, f"SS {ss:#x} is no user data segment"
    if not _canonical(rip):
        return 0, f"RIP {rip:#x} is not canonical"
    return None


class Signals:
    """The process's dispositions, blocked mask and alternate stack."""

    def __init__(self, process, layout: dict[int, tuple[int, int]] | None = None):
        """``layout``: the XSAVE components (:func:`xsave_layout`); empty or None: FXSAVE."""
        self.p = process
        self.actions: dict[int, Action] = {}
        self.blocked = 0
        self.altstack = (0, SS_DISABLE, 0)  # ss_sp, ss_flags, ss_size
        self.layout = layout or {}
        self.read_xcr0 = lambda: None     # the VMM's: XCR0 now, or None while CR4.OSXSAVE is clear
        self.opmasks = None               # the VMM's holder of K0-7 on an AVX-512 host (opmasks(), set_opmasks())
        self.xsaves = False               # the view has XSAVES: Linux's initial state is compacted (XRSTORS)
        self.fatal: tuple[int, str | None] | None = None   # the signal the process dies of, and why Linux forced it
        self.pending: list[Queued] = []   # in the order they were sent
        self.current: int | None = None   # the running thread's id (the kernel sets it)
        self.saved_mask: int | None = None   # sigsuspend's: what the first handler's frame saves (set_restore_sigmask)
        self.on_dequeue = lambda entry: entry.fields   # the timers': re-arm the timer whose signal is delivered
        registers = tuple(REG[name] for name in SIGCONTEXT)
        self._context = RegisterBlock(registers + (x86.UC_X86_REG_CS, x86.UC_X86_REG_SS))
        self._restored = RegisterBlock(registers[:RIP_AT] + registers[RIP_AT + 1:])
        self._entry = RegisterBlock((x86.UC_X86_REG_RDI, x86.UC_X86_REG_RSI, x86.UC_X86_REG_RDX, x86.UC_X86_REG_RAX,
                                     x86.UC_X86_REG_RSP, x86.UC_X86_REG_RFLAGS))
        self._stack = RegisterBlock((x86.UC_X86_REG_RSP, x86.UC_X86_REG_RFLAGS))
        self._fresh: dict[int, ImageBlock] = {}   # vector width -> the initial FPU state of a handler

    # -- delivery ---------------------------------------------------------------------------

    def deliver(self, uc, signo: int, code: int, address: int, trapno: int, error: int = 0,
                segments: tuple[int, int] | None = None, fields: bytes | None = None) -> bool:
        """Run the program's handler for a synchronous signal; False when the process
        dies of it instead: no handler, SIG_IGN or the signal blocked (force_sig), or a
        frame that cannot be written (force_sigsegv, ``fatal`` saying so). ``segments``:
        the CS and SS to save where they are not the engine's (a refused rt_sigreturn:
        the engine's stay Linux's user segments, as setup_rt_frame sets them for the
        handler). ``fields``: the siginfo's fields after si_code (default: si_addr)."""
        action = self.actions.get(signo, Action())
        if action.handler in (SIG_DFL, SIG_IGN) or self.blocked >> (signo - 1) & 1:
            return False
        context = self._context.read(uc)
        if segments:
            context[-2:] = segments
        xcr0 = self.read_xcr0() if self.layout else None
        image = _xsave(uc, xcr0, self.layout, self.opmasks) if xcr0 is not None else xstate.fxsave_image(uc)
        place = self._frame(context[RSP_AT], len(image), action)
        try:
            if place is None or not action.flags & SA_RESTORER:  # x86-64 Linux requires a restorer
                raise SyscallError(0)
            frame, fpstate = place
            self.p.write(fpstate, image)
            mask = self.blocked if self.saved_mask is None else self.saved_mask
            info = struct.pack("<iiii", signo, 0, code, 0) + (struct.pack("<Q", address) if fields is None else fields)
            self.p.write(frame, self._frame_bytes(context, fpstate, mask, info, trapno, error, address, action,
                                                  UC_FP_XSTATE if xcr0 is not None else 0))
        except SyscallError:
            where = f"at {place[0]:#x}" if place else "on its alternate stack"
            return self._force_sigsegv(uc, signo, trapno, error, f"no room for the frame of signal {signo} {where}")
        self._start_fpu(uc, xcr0)
        self.saved_mask = None
        self.blocked |= action.mask
        if not action.flags & SA_NODEFER:
            self.blocked |= 1 << (signo - 1)
        if action.flags & SA_RESETHAND:
            self.actions[signo] = Action()
        self._entry.write(uc, (signo, frame + 8 + 304, frame + 8, 0, frame, context[FLAGS_AT] & ~HANDLER_CLEARS))
        uc.reg_write(x86.UC_X86_REG_RIP, action.handler)  # a single write of RIP: the engine resumes there
        return True

    def _start_fpu(self, uc, xcr0: int | None) -> None:
        """A handler starts with the initial FPU state, its frame holding the program's
        (handle_signal's fpu__clear_user_states): FCW 0x37F, MXCSR 0x1F80, every tag
        empty, vectors and opmasks zero, as wide as the enabled state."""
        width, count = (64, 32) if self.opmasks is not None and xcr0 and xcr0 & 0xE0 else \
            (32, 16) if xcr0 and xcr0 & 4 else (16, 16)
        block = self._fresh.get(width)
        if block is None:
            name = {64: "ZMM", 32: "YMM", 16: "XMM"}[width]
            layout = ((x86.UC_X86_REG_FPCW, 0), (x86.UC_X86_REG_FPSW, 2), (x86.UC_X86_REG_FPTAG, 4),
                      (x86.UC_X86_REG_MXCSR, 8), *((getattr(x86, f"UC_X86_REG_{name}{i}"), 64 + width * i)
                                                  for i in range(count)))
            block = self._fresh[width] = ImageBlock(layout, 64 + width * count)
            block.image = struct.pack("<HHHxxI", 0x37F, 0, 0xFFFF, 0x1F80).ljust(block.size, b"\0")
        block.write(uc, block.image)
        if width == 64:
            self.opmasks.set_opmasks({})

    def _force_sigsegv(self, uc, signo: int, trapno: int, error: int, why: str) -> bool:
        """signal_setup_done of a frame that could not be written (kernel/signal.c
        force_sigsegv): SIGSEGV to its handler, fatal if SIGSEGV was the signal."""
        if signo != SIGSEGV and self.deliver(uc, SIGSEGV, SI_KERNEL, 0, trapno, error):
            return True
        self.fatal = (SIGSEGV, why)
        return False

    def _altstack(self) -> tuple[int, int] | None:
        sp, flags, size = self.altstack
        return None if flags & SS_DISABLE or not size else (sp, size)

    def _on_altstack(self, sp: int) -> bool:
        """__on_sig_stack (include/linux/sched/signal.h)."""
        stack = self._altstack()
        return stack is not None and stack[0] < sp <= stack[0] + stack[1]

    def _frame(self, rsp: int, fpstate_size: int, action: Action) -> tuple[int, int] | None:
        """Where get_sigframe (arch/x86/kernel/signal.c) puts the frame and its fpstate:
        below the red zone, or at the top of the alternate stack for SA_ONSTACK; the
        fpstate 64-byte aligned, the frame below it so that RSP + 8 is 16-byte aligned at
        the handler's entry. None where it would overflow the alternate stack."""
        sp = rsp - 128
        stack, nested = self._altstack(), self._on_altstack(rsp)
        entering = bool(action.flags & SA_ONSTACK) and stack is not None and not self._on_altstack(sp)
        if entering:
            sp = stack[0] + stack[1]
        fpstate = (sp - fpstate_size) & ~63
        frame = ((fpstate - FRAME_SIZE) & ~15) - 8
        return None if (nested or entering) and not self._on_altstack(frame) else (frame, fpstate)

    def _frame_bytes(self, context, fpstate, mask, info, trapno, error, address, action, fp_flag) -> bytes:
        """pretcode, the ucontext (flags, link, the alternate stack, the sigcontext, the
        mask to restore) and, for SA_SIGINFO, the siginfo ``info`` (setup_rt_frame)."""
        cs, ss = context[-2:]
        sigcontext = struct.pack("<18Q", *context[:-2]) + struct.pack("<HHHH", cs, 0, 0, ss) \
            + struct.pack("<QQQQQ", error, trapno, mask, address, fpstate) + bytes(64)
        sp, flags, size = self.altstack
        ucontext = struct.pack("<QQ", fp_flag | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS, 0) \
            + struct.pack("<QiiQ", sp, flags, 0, size) + sigcontext + struct.pack("<Q", mask)
        return struct.pack("<Q", action.restorer) + ucontext + (info.ljust(128, b"\0") if action.flags & SA_SIGINFO
                                                                 else b"")

    # -- signals sent: pending until the return to user mode -----------------------------------

    def handler(self, signo: int) -> int:
        action = self.actions.get(signo)
        return action.handler if action else SIG_DFL

    def ignored(self, signo: int) -> bool:
        return _ignores(signo, self.handler(signo))

    def _blocked(self, signo: int) -> bool:
        return bool(self.blocked >> (signo - 1) & 1)

    def send(self, signo: int, code: int, fields: bytes = b"", timer: int | None = None,
             tid: int | None = None) -> bool:
        """Make ``signo`` pending (kernel/signal.c __send_signal_locked); False where it is
        dropped, ignored and not blocked (a blocked signal may have a handler by the time
        it is unblocked). ``timer``: a POSIX timer's, queued whatever else is pending;
        ``tid``: for that thread alone (tgkill)."""
        if not self._blocked(signo) and self.ignored(signo):
            return False
        if timer is None and signo < 32 and any(q.signo == signo and q.tid == tid for q in self.pending):
            return True  # legacy_queue: a standard signal is pending once
        if timer is None and signo >= 32 and len(self.pending) >= MAX_QUEUED:
            raise SyscallError(EAGAIN)
        self.pending.append(Queued(signo, code, fields, timer, tid))
        return True

    def discard(self, keep) -> None:
        """Drop the pending signals ``keep(entry)`` refuses."""
        self.pending = [q for q in self.pending if keep(q)]

    def pending_mask(self) -> int:
        return sum({1 << (q.signo - 1) for q in self.pending})

    def _next(self) -> Queued | None:
        """The signal to take now (next_signal): the lowest-numbered the mask lets through,
        the first sent of that number."""
        return self.next_for(self.current, self.blocked)

    def next_for(self, tid: int | None, blocked: int) -> Queued | None:
        """The signal a thread with mask ``blocked`` would take now."""
        ready = [q for q in self.pending if not blocked >> (q.signo - 1) & 1 and q.tid in (None, tid)]
        return min(ready, key=SIGNO) if ready else None

    def forked(self, process) -> Signals:
        """A child's (copy_process): the dispositions, mask and alternate stack; nothing pending."""
        child = Signals.__new__(Signals)
        child.__dict__.update(self.__dict__)
        child.p, child.actions, child.pending, child.fatal = process, dict(self.actions), [], None
        return child

    # -- threads: the running thread's mask, alternate stack and sigsuspend mask are here --

    def save_to(self, thread) -> None:
        thread.blocked, thread.altstack, thread.saved_mask = self.blocked, self.altstack, self.saved_mask

    def load_from(self, thread) -> None:
        self.blocked, self.altstack, self.saved_mask = thread.blocked, thread.altstack, thread.saved_mask
        self.current = thread.tid

    def _take(self, entry: Queued) -> bytes:
        self.pending.remove(entry)
        return self.on_dequeue(entry)

    def interrupting(self) -> bool:
        """A pending signal ends a blocking call: one the mask lets through that is not
        ignored (those are taken and dropped here, as get_signal drops them)."""
        while (entry := self._next()) is not None and self.ignored(entry.signo):
            self._take(entry)
        return entry is not None

    def deliver_pending(self, uc, syscall: tuple[int, int, int] | None = None) -> None:
        """The return to user mode (arch_do_signal_or_restart): each pending signal the mask
        lets through runs its handler, each on the frame of the one before, or ends the
        process (``fatal``) where it has none. ``syscall``: the number, address and result
        of the system call returning; a result of ERESTART* becomes EINTR, or a restart
        of the call when the handler has SA_RESTART (handle_signal). Without a handler
        run, sigsuspend's mask comes back (restore_saved_sigmask)."""
        while (entry := self._next()) is not None:
            fields = self._take(entry)
            handler = self.handler(entry.signo)
            if _ignores(entry.signo, handler):
                continue
            if handler == SIG_DFL:
                self.fatal = (entry.signo, "its timer expired" if entry.code in (SI_KERNEL, SI_TIMER) else None)
                return
            if syscall is not None:
                number, at, result = syscall
                error = -(result - (1 << 64)) if result >> 63 else 0
                if error == ERESTARTSYS and self.actions[entry.signo].flags & SA_RESTART:
                    uc.reg_write(x86.UC_X86_REG_RAX, number)
                    uc.reg_write(x86.UC_X86_REG_RIP, at)
                elif error in (ERESTARTSYS, ERESTARTNOHAND, ERESTART_RESTARTBLOCK):
                    uc.reg_write(x86.UC_X86_REG_RAX, -EINTR & (1 << 64) - 1)
                syscall = None
            if not self.deliver(uc, entry.signo, entry.code, 0, 0, fields=fields):
                return  # a frame that could not be written: fatal says how the process ends
        if self.saved_mask is not None:
            self.blocked, self.saved_mask = self.saved_mask, None

    # -- rt_sigreturn ------------------------------------------------------------------------

    def sigreturn(self, uc) -> None:
        """rt_sigreturn (arch/x86/kernel/signal_64.c): the mask, the registers and the
        FPU state from the frame at RSP - 8, CS and SS with RPL 3; SIGSEGV for a frame
        Linux refuses (signal_fault) or for what the return to user mode then refuses."""
        rsp, rflags = self._stack.read(uc)
        frame = rsp - 8
        try:
            ucontext = self.p.read(frame + 8, 304)
        except SyscallError:
            return self._refused(uc, f"rt_sigreturn: its frame at {frame:#x} cannot be read")
        flags = struct.unpack_from("<Q", ucontext, 0)[0]
        self.blocked = struct.unpack_from("<Q", ucontext, 296)[0] & ~UNBLOCKABLE
        regs = list(struct.unpack_from("<18Q", ucontext, 40))
        cs, _, _, ss = (value | 3 for value in struct.unpack_from("<HHHH", ucontext, 40 + 144))
        fpstate = struct.unpack_from("<Q", ucontext, 40 + 184)[0]
        regs[FLAGS_AT] = rflags & ~FIX_EFLAGS | regs[FLAGS_AT] & FIX_EFLAGS
        self._restored.write(uc, regs[:RIP_AT] + regs[RIP_AT + 1:])
        uc.reg_write(x86.UC_X86_REG_RIP, regs[RIP_AT])
        if not flags & UC_STRICT_RESTORE_SS and cs == USER_CS:
            ss = USER_DS  # force_valid_ss: Linux has one user data segment
        why = self._restore_fpu(uc, fpstate)
        if why:
            return self._refused(uc, f"rt_sigreturn: {why}")
        refusal = _iret_refuses(cs, ss, regs[RIP_AT])
        if refusal:
            error, why = refusal
            return self._refused(uc, f"returning from a signal handler: {why} (IRET's #GP)", error, (cs, ss))
        if cs == USER32_CS:
            raise MinivmmError("rt_sigreturn to 32-bit compatibility mode (CS 0x23): minivmm runs 64-bit code only")
        return None

    def _refused(self, uc, why: str, error: int = 0, segments: tuple[int, int] | None = None) -> None:
        """force_sig(SIGSEGV) (signal_fault, or the #GP of a refused IRET): the program's
        handler with the registers restored so far, or death."""
        if not self.deliver(uc, SIGSEGV, SI_KERNEL, 0, 13, error, segments):
            self.fatal = (SIGSEGV, why)

    def _restore_fpu(self, uc, fpstate: int) -> str | None:
        """fpu__restore_sig (arch/x86/kernel/fpu/signal.c): FXRSTOR of the fpstate, or
        with XSAVE, XRSTOR of the features its sw_reserved names and the rest of XCR0 in
        its initial configuration; the legacy state alone where the magic numbers or sizes
        are wrong (check_xstate_in_sigframe). No fpstate is the initial configuration.
        Why it fails (the state then initial, as fpu__clear_user_states leaves it), or None."""
        xcr0 = self.read_xcr0() if self.layout else None
        held = 0x7 | (0xE0 if self.opmasks is not None else 0)   # what the engine and the native executor hold
        everything = xcr0 if xcr0 is not None else 0x3

        def initial(mask: int) -> None:   # fpu__clear_user_states, restore_fpregs_from_init_fpstate
            xstate.restore_initial(uc, mask, xcr0, self.layout, held, self.opmasks, self.xsaves)
        try:
            if not fpstate:
                initial(everything)
                return None
            features = self._xstate_features(fpstate, xcr0) if xcr0 is not None else None
            if features is None:
                xstate.fxrstor(uc, fpstate, self.p.read)
                rest = everything & ~0x3
            else:
                xstate.xrstor(uc, fpstate, self.p.read, xcr0, xcr0 & features & held, self.layout, held, self.opmasks)
                rest = everything & ~features
            if rest:
                initial(rest)
            return None
        except SyscallError:
            why = f"its fpstate at {fpstate:#x} cannot be read"
        except xstate.Refused as e:
            why = f"its fpstate at {fpstate:#x}: {e}"
        initial(everything)
        return why

    def _xstate_features(self, fpstate: int, xcr0: int) -> int | None:
        """check_xstate_in_sigframe: the features sw_reserved names, or None (the legacy
        state only) for a wrong FP_XSTATE_MAGIC1, sizes or FP_XSTATE_MAGIC2."""
        magic, extended, features, size = struct.unpack("<IIQI", self.p.read(fpstate + 464, 20))
        if magic != FP_XSTATE_MAGIC1 or not FPSTATE_SIZE + XSAVE_HEADER <= size <= min(
                _xsave_size(xcr0, self.layout), extended):
            return None
        return features if struct.unpack("<I", self.p.read(fpstate + size, 4))[0] == FP_XSTATE_MAGIC2 else None

    # -- execve -------------------------------------------------------------------------------

    def exec(self, uc) -> None:
        """What an execve does to signals and the FPU (fs/exec.c begin_new_exec): every
        handler back to SIG_DFL but ignored signals stay ignored, flags, restorers and
        masks cleared (flush_signal_handlers), no alternate stack (sas_ss_reset), the
        FPU in its initial state (fpu_flush_thread); the blocked mask and pending
        signals stay."""
        self.actions = {signo: Action(SIG_IGN) for signo, action in self.actions.items() if action.handler == SIG_IGN}
        self.altstack = (0, SS_DISABLE, 0)
        self._restore_fpu(uc, 0)
