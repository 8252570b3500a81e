"""Guest RAM is an anonymous host mapping: pages the guest never touched cost the
machine nothing, and must not start costing when the VMM reads RAM as a whole."""

from __future__ import annotations

import ctypes
import hashlib

PAGE = 4096
CHUNK = 1 << 20
_ZERO = bytes(CHUNK)
# /proc/self/pagemap: one 64-bit entry per page; bit 63 present, bit 62 swapped.
_TOUCHED = bytes(1 if b & 0xC0 else 0 for b in range(256))


def digest(ram) -> str:
    """SHA-256 of all of ``ram``; chunks whose pages were never touched (neither present
    nor swapped, per the kernel's pagemap) are hashed as the zeros they are, unread."""
    h = hashlib.sha256()
    base = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    try:
        pagemap = open("/proc/self/pagemap", "rb", buffering=0)
    except OSError:
        pagemap = None
    view = memoryview(ram)
    try:
        for offset in range(0, len(ram), CHUNK):
            size = min(CHUNK, len(ram) - offset)
            if pagemap is not None and not _touched(pagemap, base + offset, size):
                h.update(_ZERO[:size])
            else:
                h.update(view[offset:offset + size])
    finally:
        view.release()
        if pagemap is not None:
            pagemap.close()
    return h.hexdigest()


def _touched(pagemap, address: int, size: int) -> bool:
    pagemap.seek(address // PAGE * 8)
    entries = pagemap.read(size // PAGE * 8)
    if len(entries) != size // PAGE * 8:
        return True  # cannot tell: read it
    return b"\1" in entries[7::8].translate(_TOUCHED)


def touched_pages(ram) -> list[int]:
    """The offsets of the pages of ``ram`` that were ever written (the others read as
    zeros): what a migration must send, as QEMU's and vMotion's zero-page detection
    sends nothing but a marker for the rest. Every page, if the pagemap cannot tell."""
    try:
        pagemap = open("/proc/self/pagemap", "rb", buffering=0)
    except OSError:
        return list(range(0, len(ram), PAGE))
    base = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    out = []
    with pagemap:
        for offset in range(0, len(ram), CHUNK):
            size = min(CHUNK, len(ram) - offset)
            pagemap.seek((base + offset) // PAGE * 8)
            entries = pagemap.read(size // PAGE * 8)
            if len(entries) != size // PAGE * 8:
                out.extend(range(offset, offset + size, PAGE))
                continue
            flags = entries[7::8].translate(_TOUCHED)
            out.extend(offset + i * PAGE for i, touched in enumerate(flags) if touched)
    return out
