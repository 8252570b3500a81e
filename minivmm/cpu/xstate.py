"""The x87, SSE, AVX and AVX-512 register state in the memory images the CPU writes: FXSAVE's
512 bytes (SDM Vol. 1, 10.5.1), and the XSAVE area's extended components, at the
offsets and sizes CPUID leaf 0xD gives (standard form) or packed in RFBM order
(compacted form, SDM Vol. 1, 13.4.3). Read from and written to a unicorn engine."""

from __future__ import annotations

import struct

import unicorn.x86_const as x86

LEGACY, HEADER = 512, 64
YMM_COMPONENT = 2


def fxsave_image(uc) -> bytes:
    fcw, fsw, ftw = (uc.reg_read(getattr(x86, f"UC_X86_REG_{r}")) for r in ("FPCW", "FPSW", "FPTAG"))
    abridged = sum(1 << i for i in range(8) if (ftw >> (2 * i)) & 3 != 3)
    out = struct.pack("<HHBBHQQII", fcw, fsw, abridged, 0, 0, 0, 0, uc.reg_read(x86.UC_X86_REG_MXCSR), 0xFFFF)
    for i in range(8):
        mantissa, exponent = uc.reg_read(getattr(x86, f"UC_X86_REG_FP{i}"))
        out += struct.pack("<QH6x", mantissa, exponent)
    for i in range(16):
        out += uc.reg_read(getattr(x86, f"UC_X86_REG_XMM{i}")).to_bytes(16, "little")
    return out + bytes(LEGACY - len(out))


def fxrstor_image(uc, data: bytes, x87: bool = True, sse: bool = True) -> None:
    if x87:
        fcw, fsw = struct.unpack_from("<HH", data, 0)
        uc.reg_write(x86.UC_X86_REG_FPCW, fcw)
        uc.reg_write(x86.UC_X86_REG_FPSW, fsw)
        for i in range(8):
            mantissa, exponent = struct.unpack_from("<QH", data, 32 + 16 * i)
            uc.reg_write(getattr(x86, f"UC_X86_REG_FP{i}"), (mantissa, exponent))
    if sse:
        uc.reg_write(x86.UC_X86_REG_MXCSR, struct.unpack_from("<I", data, 24)[0] & 0xFFFF)
        for i in range(16):
            uc.reg_write(getattr(x86, f"UC_X86_REG_XMM{i}"), int.from_bytes(data[160 + 16 * i:176 + 16 * i], "little"))


OPMASK_COMPONENT = 5
# component -> (register, the first of its 16, the lowest bit it holds, bytes of each):
# YMM's upper halves, ZMM0-15's upper halves (ZMM_Hi256), ZMM16-31 whole (Hi16_ZMM)
VECTOR_COMPONENTS = {YMM_COMPONENT: ("YMM", 0, 128, 16), 6: ("ZMM", 0, 256, 32), 7: ("ZMM", 16, 0, 64)}


def component(uc, i: int, opmasks=None) -> bytes:
    """Extended state component ``i`` (2, 5, 6 or 7) as an XSAVE area holds it. The
    opmask registers come from ``opmasks`` (``opmasks()``: the engine has none)."""
    if i == OPMASK_COMPONENT:
        masks = opmasks.opmasks()
        return b"".join(masks[f"K{k}"].to_bytes(8, "little") for k in range(8))
    register, first, shift, size = VECTOR_COMPONENTS[i]
    return b"".join((uc.reg_read(getattr(x86, f"UC_X86_REG_{register}{first + k}")) >> shift
                     & (1 << 8 * size) - 1).to_bytes(size, "little") for k in range(16))


def set_component(uc, i: int, data: bytes | None, opmasks=None) -> None:
    """Component ``i`` from an area's bytes, or its initial configuration (zeros) for
    None; the bits of each register below the component's stay."""
    if i == OPMASK_COMPONENT:
        opmasks.set_opmasks({f"K{k}": int.from_bytes(data[8 * k:8 * k + 8], "little") for k in range(8)}
                            if data else {})
        return
    register, first, shift, size = VECTOR_COMPONENTS[i]
    for k in range(16):
        name = getattr(x86, f"UC_X86_REG_{register}{first + k}")
        upper = int.from_bytes(data[size * k:size * (k + 1)], "little") if data else 0
        uc.reg_write(name, upper << shift | (uc.reg_read(name) & (1 << shift) - 1 if shift else 0))


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
