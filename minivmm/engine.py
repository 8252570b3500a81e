"""Thin access to unicorn's C API for the VMM's hot paths.

The Python binding wraps each hook call in three Python frames and each register
access in a ctypes conversion; on a path taken per CPUID that is most of the cost,
so the exits that are frequent register their callbacks and move registers here.
"""

from __future__ import annotations

import ctypes

from unicorn import UC_HOOK_INSN
from unicorn.unicorn_py3.unicorn import uc_hook_h, uclib

_lib = ctypes.CDLL(uclib._name)
reg_read_batch = _lib.uc_reg_read_batch
reg_write_batch = _lib.uc_reg_write_batch
INSN_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


class RegisterBlock:
    """Preallocated values and pointers for one batch register transfer."""

    def __init__(self, regs: tuple[int, ...], values: tuple[int, ...] | None = None):
        self.count = len(regs)
        self.initial = tuple(values or ())
        self.ids = (ctypes.c_int * self.count)(*regs)
        self.values = (ctypes.c_uint64 * self.count)(*(values or ()))
        base = ctypes.addressof(self.values)
        self.pointers = (ctypes.c_void_p * self.count)(*(base + 8 * i for i in range(self.count)))


def add_insn_hook(uc, insn: int, callback) -> tuple:
    """Register ``callback(handle, user_data) -> int`` on one instruction.

    The caller keeps the returned objects alive as long as the engine runs."""
    cfunc = INSN_CALLBACK(callback)
    handle = uc_hook_h()
    err = _lib.uc_hook_add(uc._uch, ctypes.byref(handle), UC_HOOK_INSN, cfunc, None,
                           ctypes.c_uint64(1), ctypes.c_uint64(0), ctypes.c_int(insn))
    if err:
        raise RuntimeError(f"uc_hook_add failed with error {err}")
    return cfunc, handle
