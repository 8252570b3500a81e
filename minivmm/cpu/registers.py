"""Registers moved between a unicorn engine and the VMM in one call of the C API.

The Python binding converts every register access through ctypes, several microseconds
each; on paths taken per system call or per signal (the arguments, a signal frame's
general registers, an FXSAVE image, the vector registers) that is most of the cost, so
they move in batches here.
"""

from __future__ import annotations

import ctypes

from unicorn.unicorn_py3.unicorn import uclib

_lib = ctypes.CDLL(uclib._name)
reg_read_batch = _lib.uc_reg_read_batch
reg_write_batch = _lib.uc_reg_write_batch


class RegisterBlock:
    """Preallocated 64-bit values and pointers for one batch register transfer."""

    def __init__(self, regs: tuple[int, ...], values: tuple[int, ...] | None = None):
        self.count = len(regs)
        self.initial = tuple(values or ())
        self.ids = (ctypes.c_int * self.count)(*regs)
        self.values = (ctypes.c_uint64 * self.count)(*(values or ()))
        base = ctypes.addressof(self.values)
        self.pointers = (ctypes.c_void_p * self.count)(*(base + 8 * i for i in range(self.count)))

    def read(self, uc) -> list[int]:
        reg_read_batch(uc._uch, self.ids, self.pointers, self.count)
        return self.values[:]

    def write(self, uc, values) -> None:
        self.values[:] = values
        reg_write_batch(uc._uch, self.ids, self.pointers, self.count)


class ImageBlock:
    """Registers of any width at byte offsets of one buffer, as a memory image holds
    them (an FXSAVE area, a run of vector registers): the engine writes each in its own
    format (little-endian; an x87 register as 8 bytes of mantissa and 2 of exponent)."""

    def __init__(self, layout: tuple[tuple[int, int], ...], size: int):
        """``layout``: (register, offset) pairs; ``size``: the buffer's bytes."""
        self.count, self.size = len(layout), size
        self.ids = (ctypes.c_int * self.count)(*(reg for reg, _ in layout))
        self.buffer = ctypes.create_string_buffer(size)
        base = ctypes.addressof(self.buffer)
        self.pointers = (ctypes.c_void_p * self.count)(*(base + at for _, at in layout))

    def read(self, uc) -> bytes:
        """The image, zero wherever no register lies."""
        ctypes.memset(self.buffer, 0, self.size)
        reg_read_batch(uc._uch, self.ids, self.pointers, self.count)
        return self.buffer.raw

    def write(self, uc, image) -> None:
        ctypes.memmove(self.buffer, bytes(image[:self.size]), min(len(image), self.size))
        reg_write_batch(uc._uch, self.ids, self.pointers, self.count)
