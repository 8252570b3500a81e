"""The x87, SSE and AVX register state in the memory images the CPU writes: FXSAVE's
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


def ymm_upper(uc) -> bytes:
    """YMM0-15's upper halves, the AVX component's 256 bytes."""
    return b"".join((uc.reg_read(getattr(x86, f"UC_X86_REG_YMM{i}")) >> 128).to_bytes(16, "little") for i in range(16))


def set_ymm_upper(uc, data: bytes | None) -> None:
    """YMM0-15's upper halves from ``data``, or zeros (the init state) for None."""
    for i in range(16):
        upper = int.from_bytes(data[16 * i:16 * i + 16], "little") if data else 0
        low = uc.reg_read(getattr(x86, f"UC_X86_REG_XMM{i}"))
        uc.reg_write(getattr(x86, f"UC_X86_REG_YMM{i}"), upper << 128 | low)


def zmm_hi256(uc) -> bytes:
    """ZMM0-15's upper halves (bits 511:256), the ZMM_Hi256 component's 512 bytes."""
    return b"".join((uc.reg_read(getattr(x86, f"UC_X86_REG_ZMM{i}")) >> 256).to_bytes(32, "little") for i in range(16))


def set_zmm_hi256(uc, data: bytes | None) -> None:
    for i in range(16):
        upper = int.from_bytes(data[32 * i:32 * i + 32], "little") if data else 0
        low = uc.reg_read(getattr(x86, f"UC_X86_REG_YMM{i}"))
        uc.reg_write(getattr(x86, f"UC_X86_REG_ZMM{i}"), upper << 256 | low)


def hi16_zmm(uc) -> bytes:
    """ZMM16-31 whole, the Hi16_ZMM component's 1024 bytes."""
    return b"".join(uc.reg_read(getattr(x86, f"UC_X86_REG_ZMM{i}")).to_bytes(64, "little") for i in range(16, 32))


def set_hi16_zmm(uc, data: bytes | None) -> None:
    for i in range(16):
        uc.reg_write(getattr(x86, f"UC_X86_REG_ZMM{16 + i}"), int.from_bytes(data[64 * i:64 * i + 64], "little")
                     if data else 0)


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
