"""Thin access to unicorn's C API for the VMM's hot paths.

The Python binding wraps each hook call in three Python frames and each register
access in a ctypes conversion; on a path taken per CPUID that is most of the cost,
so the exits that are frequent register their callbacks and move registers here.
"""

from __future__ import annotations

import ctypes

from unicorn import UC_HOOK_BLOCK, UC_HOOK_CODE, UC_HOOK_INSN, UC_HOOK_INSN_INVALID, UC_HOOK_TLB_FILL
from unicorn.x86_const import UC_X86_REG_RIP
from unicorn.unicorn_py3.unicorn import uc_hook_h, uclib

from ..cpu.registers import RegisterBlock, reg_read_batch, reg_write_batch  # noqa: F401 (the exits' batches)

_lib = ctypes.CDLL(uclib._name)
# uc_reg_write(handle, id, pointer): unlike a batch, a write of RIP here ends the
# engine's block, so that it resumes at the new address
reg_write = _lib.uc_reg_write
INSN_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


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


CODE_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p)


def add_code_hook(uc, callback, begin: int, end: int, user_data: int | None = None) -> tuple:
    """Register ``callback(handle, address, size, user_data)`` (a Python function, or
    machine code through ctypes) on [begin, end] without the binding's per-call wrapper
    frames; returns (keep-alive objects, handle for hook_del)."""
    cfunc = callback if isinstance(callback, ctypes._CFuncPtr) else CODE_CALLBACK(callback)
    handle = uc_hook_h()
    err = _lib.uc_hook_add(uc._uch, ctypes.byref(handle), UC_HOOK_CODE, ctypes.cast(cfunc, ctypes.c_void_p),
                           ctypes.c_void_p(user_data), ctypes.c_uint64(begin), ctypes.c_uint64(end))
    if err:
        raise RuntimeError(f"uc_hook_add failed with error {err}")
    return cfunc, handle


INVALID_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_void_p)


def add_invalid_hook(uc, callback, user_data: int | None = None) -> tuple:
    """Register ``callback(handle, user_data) -> bool`` (a Python function, or machine
    code through ctypes) on the engine's invalid-opcode exit (True: handled, resume at
    RIP), without the binding's wrapper frames: on an AVX host every instruction the
    machine runs for the engine comes this way."""
    cfunc = callback if isinstance(callback, ctypes._CFuncPtr) else INVALID_CALLBACK(callback)
    handle = uc_hook_h()
    err = _lib.uc_hook_add(uc._uch, ctypes.byref(handle), UC_HOOK_INSN_INVALID, ctypes.cast(cfunc, ctypes.c_void_p),
                           ctypes.c_void_p(user_data), ctypes.c_uint64(1), ctypes.c_uint64(0))
    if err:
        raise RuntimeError(f"uc_hook_add failed with error {err}")
    return cfunc, handle


def read_rip(uc) -> int:
    """RIP through the C API (the binding's reg_read converts its id and type each call).
    The value's buffer is the call's own: VMs may run in threads, and ctypes lets go of
    the GIL during the C call."""
    value = ctypes.c_uint64()
    _lib.uc_reg_read(uc._uch, UC_X86_REG_RIP, ctypes.byref(value))
    return value.value


def write_rip(uc, address: int) -> None:
    """RIP through the C API: unlike a batch, the write ends the engine's block, so that
    it resumes at ``address``."""
    _lib.uc_reg_write(uc._uch, UC_X86_REG_RIP, ctypes.byref(ctypes.c_uint64(address)))


def del_hook(uc, handle) -> None:
    _lib.uc_hook_del(uc._uch, handle)


# ---- the work the guest has done, counted where the engine runs ---------------------------
# A block hook runs at the start of every translated block the engine executes. In Python
# it costs about 150 ns a block (a tight loop runs 10x slower); this callback, a few
# instructions of machine code, costs little (measured by bench.py's compute loop
# with and without it). It adds the block's size in bytes, shifted left by ``shift``,
# to counter[0], stores counter[0] + counter[5] (the time since boot) where counter[4]
# points (a Linux program's [vvar], linux/vdso.py; else counter[6]), and once counter[0]
# reaches counter[1] sets counter[3] and calls uc_emu_stop(uc)
# (the address in counter[2]): the engine then stops before the block's first
# instruction (the exit check at each block's start sees the request), a stop the run
# resumes from exactly, and counts the block again when it runs.
#   void counter(uc_engine *uc, uint64_t address, uint32_t size, uint64_t *counter)
BLOCK_COUNTER = (
    "89d2"          # mov edx, edx                (size, zero-extended)
    "48c1e2{shift}"  # shl rdx, shift
    "480311"        # add rdx, [rcx]
    "488911"        # mov [rcx], rdx
    "488b4128"      # mov rax, [rcx + 40]
    "4801d0"        # add rax, rdx
    "4c8b4120"      # mov r8, [rcx + 32]
    "498900"        # mov [r8], rax               (the time since boot)
    "483b5108"      # cmp rdx, [rcx + 8]
    "7301"          # jae stop
    "c3"            # ret
    "48895118"      # stop: mov [rcx + 24], rdx   (nonzero: the counter stopped the engine)
    "ff6110")       # jmp [rcx + 16]              (uc_emu_stop(uc), uc still in rdi)


def add_block_counter(uc, counter, begin: int, shift: int) -> tuple:
    """Count the bytes of every block the engine executes from ``begin`` on, times
    2**``shift``, into ``counter`` (seven uint64: the count, the count at which to stop,
    uc_emu_stop's address, filled in here, the flag of a stop, where to store the time
    since boot (set_time_store), the time since boot less the count, a word to store it
    in when nowhere else). The caller keeps the returned objects alive as long as the
    engine runs."""
    from ..cpu.native import executable
    function, page = executable(bytes.fromhex(BLOCK_COUNTER.format(shift=f"{shift:02x}")), None)
    counter[2] = ctypes.cast(_lib.uc_emu_stop, ctypes.c_void_p).value
    set_time_store(counter, None)
    handle = uc_hook_h()
    err = _lib.uc_hook_add(uc._uch, ctypes.byref(handle), UC_HOOK_BLOCK, ctypes.cast(function, ctypes.c_void_p),
                           counter, ctypes.c_uint64(begin), ctypes.c_uint64((1 << 64) - 1))
    if err:
        raise RuntimeError(f"uc_hook_add failed with error {err}")
    return function, page, counter, handle


def set_time_store(counter, store) -> None:
    """Where the block counter of ``counter`` stores the time since boot: a ctypes
    object that stays alive while it is there (None: the counter's own last word). The
    engines of a VM's processes share one counter: the engine about to run sets it."""
    counter[4] = ctypes.addressof(counter) + 48 if store is None else ctypes.addressof(store)


class TlbEntry(ctypes.Structure):
    """unicorn's uc_tlb_entry: what a TLB fill answers."""
    _fields_ = (("paddr", ctypes.c_uint64), ("perms", ctypes.c_uint32))


TLB_FILL_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                                     ctypes.POINTER(TlbEntry), ctypes.c_void_p)


def add_tlb_fill_hook(uc, callback) -> tuple:
    """Register ``callback(handle, vaddr, access, entry_pointer, user_data) -> bool`` as
    the virtual TLB's fill, without the binding's per-call wrapper frames. The caller
    keeps the returned objects alive and catches its own exceptions."""
    cfunc = TLB_FILL_CALLBACK(callback)
    handle = uc_hook_h()
    err = _lib.uc_hook_add(uc._uch, ctypes.byref(handle), UC_HOOK_TLB_FILL, cfunc, None,
                           ctypes.c_uint64(1), ctypes.c_uint64(0))
    if err:
        raise RuntimeError(f"uc_hook_add failed with error {err}")
    return cfunc, handle


# ---- the engine's stale exception state ------------------------------------------------
# QEMU remembers the last contributory exception in CPUX86State.old_exception and turns a
# second one into #DF (Intel SDM Vol. 3A, Table 6-5). It forgets it only when it delivers
# an interrupt itself, which unicorn never does: after minivmm has delivered a #DE to the
# guest's handler, the next #DE would arrive as #DF. The field is not exposed, so its
# offset in the saved context is found once by experiment and verified.

_OLD_EXCEPTION_OFFSET: int | None | bool = False  # False: not calibrated yet


def _calibrate() -> int | None:
    from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_64, Uc
    from unicorn.x86_const import UC_X86_REG_RIP
    code = bytes.fromhex("31c9" "f7f1" "f7f1" "f4")  # xor ecx, ecx; div ecx; div ecx; hlt
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x1000)
    uc.mem_write(0, code)
    before = bytes(uc.context_save())
    seen = []

    def first_fault(uc, intno, _ud):
        seen.append(intno)
        uc.reg_write(UC_X86_REG_RIP, uc.reg_read(UC_X86_REG_RIP) + 2)
        uc.emu_stop()

    handle = uc.hook_add(UC_HOOK_INTR, first_fault)
    uc.emu_start(0, len(code) - 1)
    after = bytes(uc.context_save())
    candidates = [i for i in range(0, len(before) - 3, 4)
                  if before[i:i + 4] == b"\xff\xff\xff\xff" and after[i:i + 4] == b"\0\0\0\0"]
    if seen != [0] or len(candidates) != 1:
        return None
    offset = candidates[0]
    _patch(uc, offset)
    uc.hook_del(handle)
    uc.hook_add(UC_HOOK_INTR, lambda uc, intno, _ud: (seen.append(intno), uc.emu_stop()))
    uc.emu_start(uc.reg_read(UC_X86_REG_RIP), len(code) - 1)
    return offset if seen == [0, 0] else None


def _patch(uc, offset: int) -> None:
    context = uc.context_save()
    raw = bytearray(bytes(context))
    raw[offset:offset + 4] = b"\xff\xff\xff\xff"
    context.__setstate__((bytes(raw), context.size, context.arch, context.mode))
    uc.context_restore(context)


def forget_exception(uc) -> bool:
    """Make the engine forget the last exception, as a real delivery would. False if this
    engine build could not be calibrated (repeated #DE/#GP then arrive as #DF)."""
    global _OLD_EXCEPTION_OFFSET
    if _OLD_EXCEPTION_OFFSET is False:
        _OLD_EXCEPTION_OFFSET = _calibrate()
    if _OLD_EXCEPTION_OFFSET is None:
        return False
    _patch(uc, _OLD_EXCEPTION_OFFSET)
    return True


# ---- XCR0 from inside an exit ------------------------------------------------------------
# XCR0 is reachable only through XGETBV, which cannot run from inside a hook. An exit that
# must know which state components the guest enabled (an AVX instruction raises #UD while
# XCR0[2:1] != 11b) reads it from the saved context, at an offset found by experiment.

_XCR0_OFFSET: int | None | bool = False


def _calibrate_xcr0() -> int | None:
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    from unicorn.x86_const import UC_X86_REG_CR4, UC_X86_REG_RAX

    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x1000)
    # xor ecx, ecx; xor edx, edx; xsetbv; mov eax, 0x55 (so RAX does not hold the value)
    code = bytes.fromhex("31c9" "31d2" "0f01d1" "b855000000")
    uc.mem_write(0, code)
    uc.reg_write(UC_X86_REG_CR4, uc.reg_read(UC_X86_REG_CR4) | 1 << 18 | 1 << 9)
    snapshots = []
    for value in (0x3, 0x7, 0x1):
        uc.reg_write(UC_X86_REG_RAX, value)
        try:
            uc.emu_start(0, len(code))
        except Exception:
            return None
        snapshots.append(bytes(uc.context_save()))
    candidates = [i for i in range(0, len(snapshots[0]) - 7, 8)
                  if tuple(int.from_bytes(s[i:i + 8], "little") for s in snapshots) == (0x3, 0x7, 0x1)]
    return candidates[0] if len(candidates) == 1 else None


def read_xcr0(uc) -> int | None:
    """The guest's XCR0, or None if this engine build could not be calibrated."""
    global _XCR0_OFFSET
    if _XCR0_OFFSET is False:
        _XCR0_OFFSET = _calibrate_xcr0()
    if _XCR0_OFFSET is None:
        return None
    raw = bytes(uc.context_save())
    return int.from_bytes(raw[_XCR0_OFFSET:_XCR0_OFFSET + 8], "little")


# ---- instructions executed by a counted start ------------------------------------------
# emu_start(count=N) counts instructions in the engine's own state (uc_struct), and a start
# that ends early (power-off, a checkpoint) says nowhere how far it got. The counter's
# offset is found by experiment, verified on two different stops, and read directly.

_COUNTER_OFFSET: int | None | bool = False


def _counter_trial(stop_after: int, count: int):
    from unicorn import UC_ARCH_X86, UC_HOOK_CODE, UC_MODE_64, Uc

    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x1000)
    uc.mem_write(0, b"\x90" * 256)
    uc.hook_add(UC_HOOK_CODE, lambda u, *_: u.emu_stop(), begin=stop_after, end=stop_after)
    uc.emu_start(0, 256, count=count)
    return uc, ctypes.string_at(uc._uch, 4096)


def _calibrate_counter() -> int | None:
    # A hook that stops at instruction k sees k instructions executed and the counter at k + 1.
    try:
        (_, a), (_, b) = _counter_trial(37, 0x7777777), _counter_trial(53, 0x6666666)
    except Exception:
        return None
    candidates = [i for i in range(0, len(a) - 7, 8)
                  if int.from_bytes(a[i:i + 8], "little") == 38 and int.from_bytes(b[i:i + 8], "little") == 54]
    return candidates[0] if len(candidates) == 1 else None


def counted_so_far(uc) -> int | None:
    """Instructions a counted ``emu_start`` has begun, the one it stopped at included;
    None if this engine build could not be calibrated."""
    global _COUNTER_OFFSET
    if _COUNTER_OFFSET is False:
        _COUNTER_OFFSET = _calibrate_counter()
    if _COUNTER_OFFSET is None:
        return None
    return ctypes.c_uint64.from_address(uc._uch.value + _COUNTER_OFFSET).value
