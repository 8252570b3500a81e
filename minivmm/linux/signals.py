"""Signals as Linux delivers them on x86-64 (arch/x86/kernel/signal.c, signal_64.c):
the handler runs on a real rt_sigframe (return address, ucontext with the saved
registers and the fpstate, siginfo), and rt_sigreturn restores from it, so a handler
can read and change the saved RIP, or leave by siglongjmp.

The fpstate is what the CPU's save instruction writes (arch/x86/kernel/fpu/signal.c):
FXSAVE's 512 bytes without XSAVE; with XSAVE, the standard (non-compacted) XSAVE
layout of what XCR0 enables (x87, SSE, the upper halves of YMM at CPUID.0xD.2's
offset), sw_reserved saying so (FP_XSTATE_MAGIC1, the sizes, the features) and
FP_XSTATE_MAGIC2 after it."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import unicorn.x86_const as x86

from ..cpu import xstate
from .errno import EFAULT, SyscallError

SIG_DFL, SIG_IGN = 0, 1
SA_SIGINFO, SA_ONSTACK, SA_RESTORER, SA_NODEFER, SA_RESETHAND = 0x4, 0x08000000, 0x04000000, 0x40000000, 0x80000000
SS_ONSTACK, SS_DISABLE = 1, 2
UC_SIGCONTEXT_SS, UC_STRICT_RESTORE_SS = 0x2, 0x4
FRAME_SIZE = 8 + 304 + 128      # pretcode, struct ucontext, struct siginfo
FPSTATE_SIZE = 512              # FXSAVE format
XSAVE_HEADER = 64               # XSTATE_BV, XCOMP_BV, reserved (SDM Vol. 1, 13.4.2)
FP_XSTATE_MAGIC1, FP_XSTATE_MAGIC2 = 0x46505853, 0x46505845
# sigcontext's general registers, in order (arch/x86/include/uapi/asm/sigcontext.h)
SIGCONTEXT = ("R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15", "RDI", "RSI", "RBP", "RBX", "RDX", "RAX",
              "RCX", "RSP", "RIP", "EFLAGS")
REG = {name: getattr(x86, f"UC_X86_REG_{'RFLAGS' if name == 'EFLAGS' else name}") for name in SIGCONTEXT}
# vector -> (signal, si_code) as the trap handlers set them (arch/x86/kernel/traps.c)
ILL_ILLOPN, FPE_INTDIV, SEGV_MAPERR, TRAP_BRKPT, SI_KERNEL = 2, 1, 1, 1, 0x80


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


def _xsave(uc, xcr0: int, layout: dict[int, tuple[int, int, bool]], opmasks=None) -> bytes:
    """The standard-format XSAVE image of x87, SSE, YMM and (AVX-512 hosts) the opmask
    and ZMM components: what the engine and the native executor hold."""
    components = [i for i in layout if xcr0 >> i & 1]
    size = max([FPSTATE_SIZE + XSAVE_HEADER] + [layout[i][0] + layout[i][1] for i in components])
    area = bytearray(size + 4)
    area[:FPSTATE_SIZE] = xstate.fxsave_image(uc)
    present = xcr0 & 0x3
    for i in _carried(opmasks):
        if i in components:
            data = xstate.component(uc, i, opmasks)
            area[layout[i][0]:layout[i][0] + len(data)] = data
            present |= 1 << i
    struct.pack_into("<Q", area, FPSTATE_SIZE, present)                               # XSTATE_BV
    struct.pack_into("<IIQI", area, 464, FP_XSTATE_MAGIC1, size + 4, xcr0, size)      # sw_reserved
    struct.pack_into("<I", area, size, FP_XSTATE_MAGIC2)
    return bytes(area)


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

    def deliver(self, uc, signo: int, code: int, address: int, trapno: int, error: int = 0) -> bool:
        """Run the program's handler for a synchronous signal; False when Linux would
        kill the process instead (no handler, SIG_IGN or the signal blocked: force_sig)."""
        action = self.actions.get(signo, Action())
        if action.handler in (SIG_DFL, SIG_IGN) or self.blocked >> (signo - 1) & 1:
            return False
        rsp = uc.reg_read(x86.UC_X86_REG_RSP)
        sp, flags, size = self.altstack
        on_alt = sp and not flags & SS_DISABLE and sp < rsp <= sp + size
        if action.flags & SA_ONSTACK and sp and not flags & SS_DISABLE and not on_alt:
            top = sp + size
        else:
            top = rsp - 128  # below the red zone
        xcr0 = self.read_xcr0() if self.layout else None
        image = _xsave(uc, xcr0, self.layout, self.opmasks) if xcr0 is not None else xstate.fxsave_image(uc)
        fpstate = (top - len(image)) & ~63
        frame = ((fpstate - FRAME_SIZE) & ~15) - 8  # at entry (RSP + 8) is 16-byte aligned
        try:
            self._write_frame(uc, frame, fpstate, image, signo, code, address, trapno, error, action)
        except SyscallError:
            return False  # no room for the frame: Linux kills the process (SIGSEGV)
        self.blocked |= action.mask
        if not action.flags & SA_NODEFER:
            self.blocked |= 1 << (signo - 1)
        if action.flags & SA_RESETHAND:
            self.actions[signo] = Action()
        uc.reg_write(x86.UC_X86_REG_RDI, signo)
        uc.reg_write(x86.UC_X86_REG_RSI, frame + 8 + 304)
        uc.reg_write(x86.UC_X86_REG_RDX, frame + 8)
        uc.reg_write(x86.UC_X86_REG_RAX, 0)
        uc.reg_write(x86.UC_X86_REG_RSP, frame)
        uc.reg_write(x86.UC_X86_REG_RFLAGS, uc.reg_read(x86.UC_X86_REG_RFLAGS) & ~((1 << 8) | (1 << 10)))  # TF, DF
        uc.reg_write(x86.UC_X86_REG_RIP, action.handler)
        return True

    def _write_frame(self, uc, frame, fpstate, image, signo, code, address, trapno, error, action) -> None:
        p = self.p
        p.write(fpstate, image)
        regs = [uc.reg_read(REG[name]) for name in SIGCONTEXT]
        segs = struct.pack("<HHHH", uc.reg_read(x86.UC_X86_REG_CS), 0, 0, uc.reg_read(x86.UC_X86_REG_SS))
        sigcontext = struct.pack("<18Q", *regs) + segs + struct.pack("<QQQQQ", error, trapno, self.blocked,
                                                                      address, fpstate) + bytes(64)
        sp, flags, size = self.altstack
        stack = struct.pack("<QiiQ", sp, flags, 0, size)
        ucontext = struct.pack("<QQ", UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS, 0) + stack + sigcontext \
            + struct.pack("<Q", self.blocked)
        siginfo = struct.pack("<iiiiQ", signo, 0, code, 0, address).ljust(128, b"\0")
        if not action.flags & SA_RESTORER:
            raise SyscallError(EFAULT)  # x86-64 Linux requires a restorer (glibc always sets one)
        p.write(frame, struct.pack("<Q", action.restorer) + ucontext + siginfo)

    def sigreturn(self, uc) -> None:
        """rt_sigreturn: the registers, mask and FPU state from the frame at RSP - 8."""
        frame = uc.reg_read(x86.UC_X86_REG_RSP) - 8
        data = self.p.read(frame, FRAME_SIZE)
        context = data[8 + 40:8 + 40 + 256]
        regs = struct.unpack_from("<18Q", context, 0)
        fpstate = struct.unpack_from("<Q", context, 184)[0]
        self.blocked = struct.unpack_from("<Q", data, 8 + 296)[0]
        for name, value in zip(SIGCONTEXT, regs):
            uc.reg_write(REG[name], value)
        if fpstate:
            legacy = self.p.read(fpstate, FPSTATE_SIZE)
            xstate.fxrstor_image(uc, legacy)
            magic, extended, features, size = struct.unpack_from("<IIQI", legacy, 464)
            if magic == FP_XSTATE_MAGIC1 and FPSTATE_SIZE + XSAVE_HEADER <= size <= 1 << 16:
                self._restore_extended(uc, self.p.read(fpstate, size), features)

    def _restore_extended(self, uc, area: bytes, features: int) -> None:
        """YMM's upper halves (and the AVX-512 components) from the frame, in order (ZMM
        after YMM), or their initial configuration where XSTATE_BV says so."""
        present = struct.unpack_from("<Q", area, FPSTATE_SIZE)[0]
        for i in _carried(self.opmasks):
            if i in self.layout and features >> i & 1:
                at, size = self.layout[i][0], self.layout[i][1]
                xstate.set_component(uc, i, area[at:at + size] if present >> i & 1 and at + size <= len(area)
                                     else None, self.opmasks)
