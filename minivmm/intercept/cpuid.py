"""CPUID exits: every CPUID the guest executes lands here.

The answer comes from the VM's :class:`~minivmm.cpuidview.GuestCpuidView`; this
handler only moves registers and records the exit. It runs once per guest CPUID,
so it uses the raw C calls and caches each answer in a ready-to-write buffer.
"""

from __future__ import annotations

from unicorn.x86_const import (UC_X86_INS_CPUID, UC_X86_REG_CR4, UC_X86_REG_EAX,
                               UC_X86_REG_ECX, UC_X86_REG_RAX, UC_X86_REG_RBX,
                               UC_X86_REG_RCX, UC_X86_REG_RDX)

from .. import engine

CACHE_LIMIT = 4096  # distinct (leaf, subleaf) answers kept ready; a guest may probe billions
OUTPUT_REGS = (UC_X86_REG_RAX, UC_X86_REG_RBX, UC_X86_REG_RCX, UC_X86_REG_RDX)


class CpuidExitHandler:
    """Answers CPUID from the guest view and logs ``(leaf, subleaf, eax, ebx, ecx, edx, host)``."""

    def __init__(self, view, host_name: str, on_error):
        self.view = view
        self.host = host_name
        self.log: list[tuple] = []
        self._on_error = on_error
        self._live = view.live_leaves()
        self._cache: dict[tuple[int, int], engine.RegisterBlock] = {}
        self._inputs = engine.RegisterBlock((UC_X86_REG_EAX, UC_X86_REG_ECX))
        self._cr4 = engine.RegisterBlock((UC_X86_REG_CR4,))
        self._keep = None

    def install(self, uc) -> None:
        handle = uc._uch
        inputs, cr4 = self._inputs, self._cr4
        read, write = engine.reg_read_batch, engine.reg_write_batch
        cache, live, log, view = self._cache, self._live, self.log, self.view
        indexed = view.indexed_leaves

        def on_cpuid(_h, _ud):
            try:
                read(handle, inputs.ids, inputs.pointers, 2)
                leaf = inputs.values[0] & 0xFFFFFFFF
                # Leaves that ignore ECX are logged and cached as subleaf 0.
                key = (leaf, inputs.values[1] & 0xFFFFFFFF if leaf in indexed else 0)
                block = cache.get(key)
                if block is None:
                    if key in live:
                        read(handle, cr4.ids, cr4.pointers, 1)
                        block = engine.RegisterBlock(OUTPUT_REGS, view.answer(*key, cr4.values[0]))
                    else:
                        block = engine.RegisterBlock(OUTPUT_REGS, view.answer(*key, 0))
                        if len(cache) < CACHE_LIMIT:
                            cache[key] = block
                write(handle, block.ids, block.pointers, 4)
                log.append((*key, *block.values, self.host))
            except BaseException as e:  # never let an exception vanish inside ctypes
                self._on_error(e)
            return 1  # skip the engine's own CPUID

        self._keep = engine.add_insn_hook(uc, UC_X86_INS_CPUID, on_cpuid)

    def records(self) -> list[dict]:
        keys = ("leaf", "subleaf", "eax", "ebx", "ecx", "edx", "host")
        return [dict(zip(keys, entry)) for entry in self.log]
