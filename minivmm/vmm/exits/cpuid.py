"""CPUID exits: every CPUID the guest executes lands here.

The answer comes from the VM's :class:`~minivmm.masking.view.GuestCpuidView`; this
handler only moves registers and records the exit. It runs once per guest CPUID,
so it uses the raw C calls and caches each answer in a ready-to-write buffer.
"""

from __future__ import annotations

from unicorn.x86_const import (UC_X86_INS_CPUID, UC_X86_REG_CR4, UC_X86_REG_EAX, UC_X86_REG_ECX, UC_X86_REG_RAX,
                               UC_X86_REG_RBX, UC_X86_REG_RCX, UC_X86_REG_RDX)

from .. import engine
from ..log import ExitLog

CACHE_LIMIT = 4096  # distinct (leaf, subleaf) answers kept ready; a guest may probe billions
OUTPUT_REGS = (UC_X86_REG_RAX, UC_X86_REG_RBX, UC_X86_REG_RCX, UC_X86_REG_RDX)


class CpuidExitHandler:
    """Answers CPUID from the guest view and logs ``((leaf, subleaf), (eax..edx), host)``."""

    def __init__(self, view, host_name: str, on_error, log: ExitLog | None = None):
        self.view = view
        self.host = host_name
        self.log = ExitLog(lambda entry: entry[0]) if log is None else log
        self._on_error = on_error
        self._cache: dict[tuple[int, int, int], tuple] = {}
        # CR4 rides along in the same call: leaves 1 and 7 mirror two of its bits.
        self._inputs = engine.RegisterBlock((UC_X86_REG_EAX, UC_X86_REG_ECX, UC_X86_REG_CR4))
        self._keep = None

    def install(self, uc) -> None:
        handle = uc._uch
        inputs = self._inputs
        values, in_ids, in_pointers = inputs.values, inputs.ids, inputs.pointers
        read, write = engine.reg_read_batch, engine.reg_write_batch
        cache, view, host = self._cache, self.view, self.host
        log = self.log
        sample, append, limit, count = log.entries, log.entries.append, log.limit, log.count
        indexed, live, live_bits = view.indexed_leaves, view.LIVE_LEAVES, view.LIVE_CR4_BITS

        # Per exit: one batch read, one dict lookup, one batch write, one log entry
        # (ExitLog.add, its sample inlined: this is the hot path).
        def on_cpuid(_h, _ud):
            try:
                read(handle, in_ids, in_pointers, 3)
                leaf = values[0] & 0xFFFFFFFF   # indexing: unpacking a ctypes array costs 6x more
                # Leaves that ignore ECX are logged and cached as subleaf 0.
                subleaf = values[1] & 0xFFFFFFFF if leaf in indexed else 0
                state = values[2] & live_bits if (leaf, subleaf) in live else 0
                entry = cache.get((leaf, subleaf, state))
                if entry is None:
                    entry = self._answer(leaf, subleaf, state)
                write(handle, entry[0], entry[1], 4)
                if len(sample) < limit:
                    append((entry[2], entry[3], host))
                else:
                    log.left_out += 1
                count(entry[2])
            except BaseException as e:  # never let an exception vanish inside ctypes
                self._on_error(e)
            return 1  # skip the engine's own CPUID

        self._keep = engine.add_insn_hook(uc, UC_X86_INS_CPUID, on_cpuid)

    def _answer(self, leaf: int, subleaf: int, state: int) -> tuple:
        """(register ids, value pointers, log key, answer, the block that owns the buffers),
        cached while there is room."""
        block = engine.RegisterBlock(OUTPUT_REGS, self.view.answer(leaf, subleaf, state))
        entry = (block.ids, block.pointers, (leaf, subleaf), block.initial, block)
        if len(self._cache) < CACHE_LIMIT:
            self._cache[(leaf, subleaf, state)] = entry
        return entry
