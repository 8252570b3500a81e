"""The x87, SSE, AVX and AVX-512 register state in the memory images the CPU writes: FXSAVE's
512 bytes (SDM Vol. 1, 10.5.1), and the XSAVE area's extended components, at the
offsets and sizes CPUID leaf 0xD gives (standard form) or packed in RFBM order
(compacted form, SDM Vol. 1, 13.4.3). Read from and written to a unicorn engine, in
batches (:mod:`minivmm.cpu.registers`); FXRSTOR and XRSTOR with the checks that make
them fault, for the XSAVE unit's instructions and for rt_sigreturn's fpstate alike."""

from __future__ import annotations

import struct

import unicorn.x86_const as x86

from .registers import ImageBlock

LEGACY, HEADER = 512, 64
YMM_COMPONENT = 2
OPMASK_COMPONENT = 5
COMPACTED = 1 << 63             # XCOMP_BV[63]: the compacted form
MXCSR_MASK = 0xFFFF             # FXSAVE's MXCSR_MASK with DAZ: bits 31:16 are reserved
MXCSR_INIT = 0x1F80             # every SIMD exception masked (SDM Vol. 1, 10.2.3)
X87_INIT_FCW = 0x37F

# The FXSAVE image: FCW, FSW, MXCSR, the x87 registers (read physical, then put in stack
# order: _rotate), XMM0-15 where the image holds them; the tag word goes past its end
# (the image holds the abridged form).
TAGS_AT, ST_AT = LEGACY, 32
_X87 = ((x86.UC_X86_REG_FPCW, 0), (x86.UC_X86_REG_FPSW, 2), (x86.UC_X86_REG_FPTAG, TAGS_AT),
        *((getattr(x86, f"UC_X86_REG_FP{i}"), ST_AT + 16 * i) for i in range(8)))
_SSE = ((x86.UC_X86_REG_MXCSR, 24), *((getattr(x86, f"UC_X86_REG_XMM{i}"), 160 + 16 * i) for i in range(16)))
_IMAGE, _X87_IMAGE, _SSE_IMAGE = ImageBlock(_X87 + _SSE, LEGACY + 2), ImageBlock(_X87, LEGACY + 2), \
    ImageBlock(_SSE, LEGACY)
# The initial configuration (SDM Vol. 1, 13.6), as Linux's init_fpstate holds it: x87
# reset with every register empty, XMM zero, MXCSR's default; XSTATE_BV 0.
INIT_AREA = struct.pack("<H22xI", X87_INIT_FCW, MXCSR_INIT).ljust(LEGACY + HEADER, b"\0")


class Refused(Exception):
    """What makes FXRSTOR or XRSTOR raise #GP(0) instead of loading the area."""


def _rotate(image: bytearray, by: int) -> None:
    """Move the eight x87 register slots ``by`` places: the engine's FP0-7 are the
    physical registers R0-R7, the image's slots ST(0)-ST(7), ST(i) being R((TOP + i) mod
    8) (SDM Vol. 1, 8.1.2; Table 10-2, FXSAVE's layout). The tag word stays physical."""
    slots = [bytes(image[ST_AT + 16 * i:ST_AT + 16 * i + 16]) for i in range(8)]
    image[ST_AT:ST_AT + 128] = b"".join(slots[(i + by) & 7] for i in range(8))


def _top(image) -> int:
    return struct.unpack_from("<H", image, 2)[0] >> 11 & 7


def fxsave_image(uc) -> bytes:
    image = bytearray(_IMAGE.read(uc))
    _rotate(image, _top(image))
    tags = struct.unpack_from("<H", image, TAGS_AT)[0]
    image[4] = sum(1 << i for i in range(8) if tags >> 2 * i & 3 != 3)  # the abridged tag word
    struct.pack_into("<I", image, 28, MXCSR_MASK)
    return bytes(image[:LEGACY])


def fxrstor_image(uc, data: bytes, x87: bool = True, sse: bool = True) -> None:
    if x87:
        image = bytearray(data[:LEGACY].ljust(LEGACY + 2, b"\0"))
        _rotate(image, -_top(image))
        struct.pack_into("<H", image, TAGS_AT, sum(3 << 2 * i for i in range(8) if not data[4] >> i & 1))
        _X87_IMAGE.write(uc, image)
    if sse:
        _SSE_IMAGE.write(uc, data)


def fxrstor(uc, address: int, read) -> None:
    """FXRSTOR of the area at ``address``, read by ``read(address, size)``: #GP(0) for an
    area not 16-byte aligned or reserved MXCSR bits (SDM Vol. 2A, FXRSTOR)."""
    if address % 16:
        raise Refused(f"FXRSTOR area at {address:#x} is not 16-byte aligned")
    image = read(address, LEGACY)
    if struct.unpack_from("<I", image, 24)[0] & ~MXCSR_MASK:
        raise Refused("FXRSTOR of reserved MXCSR bits")
    fxrstor_image(uc, image)


# component -> (register, the first of its 16, the byte of each where it starts, its
# bytes in each, the register's bytes): YMM's upper halves, ZMM0-15's upper halves
# (ZMM_Hi256), ZMM16-31 whole (Hi16_ZMM)
VECTOR_COMPONENTS = {YMM_COMPONENT: ("YMM", 0, 16, 16, 32), 6: ("ZMM", 0, 32, 32, 64), 7: ("ZMM", 16, 0, 64, 64)}
_VECTORS = {i: ImageBlock(tuple((getattr(x86, f"UC_X86_REG_{register}{first + k}"), width * k) for k in range(16)),
                          16 * width) for i, (register, first, _, _, width) in VECTOR_COMPONENTS.items()}


def component(uc, i: int, opmasks=None) -> bytes:
    """Extended state component ``i`` (2, 5, 6 or 7) as an XSAVE area holds it. The
    opmask registers come from ``opmasks`` (``opmasks()``: the engine has none)."""
    if i == OPMASK_COMPONENT:
        masks = opmasks.opmasks()
        return b"".join(masks[f"K{k}"].to_bytes(8, "little") for k in range(8))
    _, _, at, size, width = VECTOR_COMPONENTS[i]
    registers = _VECTORS[i].read(uc)
    return b"".join(registers[width * k + at:width * k + at + size] for k in range(16))


def set_component(uc, i: int, data: bytes | None, opmasks=None) -> None:
    """Component ``i`` from an area's bytes, or its initial configuration (zeros) for
    None; the bytes of each register below the component's stay."""
    if i == OPMASK_COMPONENT:
        opmasks.set_opmasks({f"K{k}": int.from_bytes(data[8 * k:8 * k + 8], "little") for k in range(8)}
                            if data else {})
        return
    _, _, at, size, width = VECTOR_COMPONENTS[i]
    registers = bytearray(_VECTORS[i].read(uc)) if at else bytearray(16 * width)
    for k in range(16):
        registers[width * k + at:width * k + at + size] = data[size * k:size * (k + 1)] if data else bytes(size)
    _VECTORS[i].write(uc, registers)


def xrstor(uc, address: int, read, xcr0: int, rfbm: int, components: dict[int, tuple[int, int, bool]],
           held: int, opmasks=None) -> bool:
    """XRSTOR of either form (SDM Vol. 1, 13.8) from the area at ``address``, read by
    ``read(address, size)``, with XCR0 and RFBM given; ``held``: the components there is
    somewhere to load. Raises Refused where the instruction raises #GP(0); False, with
    nothing loaded, when RFBM or the area holds a component beyond ``held``."""
    if address % 64:
        raise Refused(f"XSAVE area at {address:#x} is not 64-byte aligned")
    head = read(address, LEGACY + HEADER)
    xstate_bv, xcomp_bv = struct.unpack_from("<QQ", head, LEGACY)
    if xcomp_bv & COMPACTED:
        if xcomp_bv & ~COMPACTED & ~xcr0 or xstate_bv & ~xcomp_bv & ~COMPACTED or any(head[LEGACY + 16:]):
            raise Refused("XRSTOR of a compacted area with a bad header (SDM Vol. 1, 13.8.2)")
        present = xcomp_bv & ~COMPACTED
        offsets = compacted_offsets(components, present)
    else:
        if xstate_bv & ~xcr0 or any(head[LEGACY + 8:LEGACY + 24]):
            raise Refused("XRSTOR of a standard area with a bad header (SDM Vol. 1, 13.8.1)")
        present = rfbm
        offsets = {i: components[i][0] for i in components if rfbm >> i & 1}
    if rfbm & ~held or xstate_bv & rfbm & ~held:
        return False
    area = read(address, max([LEGACY + HEADER] + [at + components[i][1] for i, at in offsets.items()]))
    # MXCSR: the compacted form loads it with SSE, or initializes it with SSE; the
    # standard form loads it whenever RFBM asks for SSE or AVX (SDM Vol. 1, 13.8)
    mxcsr = struct.unpack_from("<I", area, 24)[0]
    if xcomp_bv & COMPACTED:
        mxcsr = (mxcsr if xstate_bv & 2 else MXCSR_INIT) if rfbm & 2 else None
    elif not rfbm & 6:
        mxcsr = None
    if mxcsr is not None and mxcsr & ~MXCSR_MASK:
        raise Refused("XRSTOR of reserved MXCSR bits")
    if rfbm & 1:
        fxrstor_image(uc, area if xstate_bv & 1 else INIT_AREA, sse=False)
    if rfbm & 2:
        fxrstor_image(uc, area if xstate_bv & 2 else INIT_AREA, x87=False)
    if mxcsr is not None:
        uc.reg_write(x86.UC_X86_REG_MXCSR, mxcsr)
    for i in (2, 5, 6, 7):  # in order: ZMM_Hi256 after YMM, whose bytes it keeps
        if rfbm >> i & 1:
            loaded = xstate_bv >> i & 1 and present >> i & 1
            set_component(uc, i, area[offsets[i]:offsets[i] + components[i][1]] if loaded else None, opmasks)
    return True


def restore_initial(uc, mask: int, xcr0: int | None, components, held: int, opmasks=None,
                    compacted: bool = False) -> None:
    """The initial configuration of the components in ``mask`` that ``held`` has: XRSTOR
    from an area whose XSTATE_BV is 0, as Linux restores its init_fpstate (os_xrstor), in
    the compacted form where the CPU has XSAVES (XRSTORS then; MXCSR goes with SSE only);
    FXRSTOR of it where XCR0 is None (no XSAVE)."""
    if xcr0 is None:
        fxrstor_image(uc, INIT_AREA)
        return
    mask &= xcr0 & held
    area = INIT_AREA[:LEGACY] + struct.pack("<QQ", 0, COMPACTED | mask) + bytes(HEADER - 16) if compacted \
        else INIT_AREA
    xrstor(uc, 0, lambda at, size: area.ljust(at + size, b"\0")[at:at + size], xcr0, mask, components, held, opmasks)


def layout(answer) -> dict[int, tuple[int, int, bool]]:
    """Extended state component -> (standard offset, size, 64-byte aligned when
    compacted), from ``answer(leaf, subleaf) -> (eax, ebx, ecx, edx)`` of leaf 0xD."""
    supported = answer(0xD, 0)[0] | answer(0xD, 0)[3] << 32
    out = {}
    for i in range(2, 63):
        if supported >> i & 1:
            eax, ebx, ecx, _ = answer(0xD, i)
            out[i] = (ebx, eax, bool(ecx & 2))
    return out


def compacted_offsets(components: dict[int, tuple[int, int, bool]], rfbm: int) -> dict[int, int]:
    """Where each component of RFBM goes in the compacted form (SDM Vol. 1, 13.4.3)."""
    offsets, at = {}, LEGACY + HEADER
    for i in sorted(components):
        if rfbm >> i & 1:
            _, size, aligned = components[i]
            at = (at + 63) & ~63 if aligned else at
            offsets[i] = at
            at += size
    return offsets
