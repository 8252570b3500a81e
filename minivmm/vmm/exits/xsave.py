"""The XSAVE family (SDM Vol. 1, chapter 13), carried out by minivmm: the engine has no
XSAVEC, its XRSTOR refuses an area whose XCOMP_BV[63] is set (#GP), and its XSAVE,
XSAVEOPT and XRSTOR lose YMM's upper halves (the AVX component is never written, though
XSTATE_BV claims it). glibc's dynamic loader saves and restores the vector state this
way around every lazy symbol binding (XSAVEC where the view shows it, Skylake and
later; XSAVE before).

The components are those the engine holds: x87, SSE and AVX (YMM's upper halves), and
on an AVX-512 host the opmask registers (which the native executor holds), ZMM0-15's
upper halves and ZMM16-31; an RFBM asking for any other is left to the caller
(``unsupported``). A component in
its initial configuration (SDM Vol. 1, 13.6: x87 reset, XMM all zero, YMM's upper
halves zero) is not in use: XSAVEC neither writes it nor sets its XSTATE_BV bit. MXCSR
belongs to SSE: XSAVEC saves it with the XMM registers, and saves those, setting their
bit, when MXCSR is not 1F80H though they are zero (SDM Vol. 2, XSAVEC, Operation); the
compacted XRSTOR loads it with them and sets 1F80H where their bit is clear, while the
standard forms save and load it whenever RFBM asks for SSE or AVX (Vol. 1, 13.7, 13.8).
The compacted offsets and alignments come from the VM's CPUID leaf 0xD.

VLDMXCSR and VSTMXCSR, the AVX forms of LDMXCSR and STMXCSR, move the same register
here: a thunk's MXCSR is the context's (exceptions masked while it runs), not the guest's.
"""

from __future__ import annotations

import struct

import unicorn.x86_const as x86
from iced_x86 import Mnemonic

from ...cpu import xstate
from .emulate import memory_address
from .native import Fault, check_span

HELD = 0x7                       # x87 | SSE | AVX: what the engine's state has
AVX512 = 0xE0                    # opmask | ZMM_Hi256 | Hi16_ZMM: with a wide native executor
EXTENDED = (2, 5, 6, 7)          # the components past the legacy region minivmm carries
SAVES = {Mnemonic.XSAVE: "xsave", Mnemonic.XSAVE64: "xsave", Mnemonic.XSAVEOPT: "xsaveopt",
         Mnemonic.XSAVEOPT64: "xsaveopt", Mnemonic.XSAVEC: "xsavec", Mnemonic.XSAVEC64: "xsavec"}
CARRIED_OUT = frozenset(SAVES) | {Mnemonic.XRSTOR, Mnemonic.XRSTOR64, Mnemonic.VLDMXCSR, Mnemonic.VSTMXCSR}


class XsaveUnit:
    def __init__(self, ram, components: dict[int, tuple[int, int, bool]], read_xcr0):
        """``components``: the view's extended state components (xstate.layout);
        ``read_xcr0()``: the guest's XCR0 now."""
        self.ram, self.memory, self.components, self.read_xcr0 = ram, len(ram), components, read_xcr0
        self.protection = None   # a Linux program's page protections
        self.held = HELD
        self.opmasks = None      # the holder of K0-7 (the wide native executor) on an AVX-512 host

    def hold_avx512(self, opmasks) -> None:
        self.opmasks, self.held = opmasks, HELD | AVX512

    def carry_out(self, uc, rip: int, instr) -> bool:
        """The instruction (one of CARRIED_OUT); False when it asks for state the
        engine does not hold."""
        mnemonic = instr.mnemonic
        if mnemonic in SAVES:
            return self._save(uc, rip, instr, SAVES[mnemonic])
        if mnemonic in (Mnemonic.XRSTOR, Mnemonic.XRSTOR64):
            return self._restore(uc, rip, instr)
        if mnemonic == Mnemonic.VLDMXCSR:
            return self._load_mxcsr(uc, rip, instr)
        return self._store_mxcsr(uc, rip, instr)

    def _rfbm(self, uc) -> int:
        edx_eax = (uc.reg_read(x86.UC_X86_REG_EDX) & 0xFFFFFFFF) << 32 | uc.reg_read(x86.UC_X86_REG_EAX) & 0xFFFFFFFF
        return (self.read_xcr0() or 0) & edx_eax

    def _area(self, uc, instr, size: int, writes: bool) -> int:
        address = memory_address(uc, instr)
        if address % 64:
            raise Fault(13, 0, detail=f"XSAVE area at {address:#x} is not 64-byte aligned")
        check_span(self.memory, self.protection, address, size, writes, not writes)
        return address

    def _load_mxcsr(self, uc, rip: int, instr) -> bool:
        """VLDMXCSR m32: #GP(0) for a reserved bit (SDM Vol. 2, LDMXCSR)."""
        address = memory_address(uc, instr)
        check_span(self.memory, self.protection, address, 4, False)
        value = struct.unpack_from("<I", self.ram, address)[0]
        if value & ~xstate.MXCSR_MASK:
            raise Fault(13, 0, detail=f"VLDMXCSR of reserved bits ({value:#x})")
        uc.reg_write(x86.UC_X86_REG_MXCSR, value)
        uc.reg_write(x86.UC_X86_REG_RIP, rip + instr.len)
        return True

    def _store_mxcsr(self, uc, rip: int, instr) -> bool:
        """VSTMXCSR m32."""
        address = memory_address(uc, instr)
        check_span(self.memory, self.protection, address, 4, True, False)
        struct.pack_into("<I", self.ram, address, uc.reg_read(x86.UC_X86_REG_MXCSR) & 0xFFFFFFFF)
        uc.reg_write(x86.UC_X86_REG_RIP, rip + instr.len)
        return True

    # -- saving ---------------------------------------------------------------------------

    def _state(self, uc, rfbm: int) -> tuple[bytes, dict[int, bytes], int]:
        """The FXSAVE image, components 2 and up (their bytes), and XINUSE."""
        image = xstate.fxsave_image(uc)
        extended = {i: xstate.component(uc, i, self.opmasks) for i in EXTENDED if rfbm >> i & 1}
        x87_init = struct.unpack_from("<HHB", image, 0) == (xstate.X87_INIT_FCW, 0, 0) and not any(image[6:24]) \
            and not any(image[32:160])
        in_use = (0 if x87_init else 1) | (2 if any(image[160:416]) else 0)
        return image, extended, in_use | sum(1 << i for i, data in extended.items() if any(data))

    def _save(self, uc, rip: int, instr, form: str) -> bool:
        """XSAVE (every requested component), XSAVEOPT (those in use: the init
        optimization, SDM Vol. 1, 13.9) or XSAVEC (those in use, compacted, 13.10).
        False when RFBM asks for state the engine does not hold."""
        rfbm = self._rfbm(uc)
        if rfbm & ~self.held:
            return False
        compacted = form == "xsavec"
        offsets = xstate.compacted_offsets(self.components, rfbm) if compacted else \
            {i: self.components[i][0] for i in self.components if rfbm >> i & 1}
        size = max([xstate.LEGACY + xstate.HEADER] + [at + self.components[i][1] for i, at in offsets.items()])
        address = self._area(uc, instr, size, True)
        image, extended, in_use = self._state(uc, rfbm)
        if compacted and struct.unpack_from("<I", image, 24)[0] != xstate.MXCSR_INIT:
            in_use |= 2    # XSAVEC saves SSE, and sets its bit, for an MXCSR not 1F80H
        written = rfbm if form == "xsave" else rfbm & in_use
        legacy = bytearray(self.ram[address:address + xstate.LEGACY])
        if written & 1:    # x87: FCW .. FDP and ST0-7
            legacy[0:24], legacy[32:160] = image[0:24], image[32:160]
        if written & 2 if compacted else rfbm & 6:   # MXCSR: with SSE (XSAVEC); with SSE or AVX, in use or not
            legacy[24:32] = image[24:32]
        if written & 2:
            legacy[160:416] = image[160:416]
        self.ram[address:address + xstate.LEGACY] = legacy
        header = address + xstate.LEGACY
        if compacted:
            struct.pack_into("<QQ", self.ram, header, rfbm & in_use, xstate.COMPACTED | rfbm)  # XSTATE_BV, XCOMP_BV
        else:  # XSTATE_BV's bits of RFBM say what is in use; the others and XCOMP_BV stay
            old = struct.unpack_from("<Q", self.ram, header)[0]
            struct.pack_into("<Q", self.ram, header, old & ~rfbm | rfbm & in_use)
        for i, data in extended.items():
            if written >> i & 1:
                self.ram[address + offsets[i]:address + offsets[i] + len(data)] = data
        uc.reg_write(x86.UC_X86_REG_RIP, rip + instr.len)
        return True

    # -- restoring ----------------------------------------------------------------------------

    def _restore(self, uc, rip: int, instr) -> bool:
        """XRSTOR m of either form (:func:`minivmm.cpu.xstate.xrstor`); False when RFBM
        or the area holds state the engine does not."""
        def read(address: int, size: int) -> bytes:
            check_span(self.memory, self.protection, address, size, False)
            return bytes(self.ram[address:address + size])
        try:
            done = xstate.xrstor(uc, memory_address(uc, instr), read, self.read_xcr0() or 0, self._rfbm(uc),
                                 self.components, self.held, self.opmasks)
        except xstate.Refused as e:
            raise Fault(13, 0, detail=str(e)) from None
        if done:
            uc.reg_write(x86.UC_X86_REG_RIP, rip + instr.len)
        return done
