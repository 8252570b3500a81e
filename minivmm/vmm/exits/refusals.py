"""Which instructions the engine refuses by itself.

An instruction the host lacks, or that the machine's CPU must run, needs the VMM
before it executes. Where the engine's CPU model refuses it anyway (every VEX.256 and
EVEX form, and what the model lacks: POPCNT on a Penryn model), its invalid-opcode
exit reaches the VMM at that instruction with nothing executed, so no exit needs
planting there. Planted exits are not free: the engine walks its whole list of them
for every instruction it translates, and for every exit that fires (thousands on a
dynamically linked program's pages made it several times slower).

Whether the engine refuses is measured, not assumed: the exact bytes are run on a
scratch engine of the same CPU model, with every control bit an OS sets for them on
(CR4.OSFXSR, OSXMMEXCPT, FSGSBASE, OSXSAVE), so that no guest state can make the
engine accept what the scratch engine refused. Only a #UD at the instruction itself
counts as a refusal; anything else (it ran, faulted, jumped) plants the exit.
"""

from __future__ import annotations

import os
import threading

import unicorn.x86_const as x86
from unicorn import UC_ARCH_X86, UC_ERR_INSN_INVALID, UC_MODE_64, Uc, UcError

CODE = 0x1000
SCRATCH = 0x4000                 # mapped and filled with HLT: whatever the probe reaches stops it
HLT = b"\xf4"
CR4_ON = (1 << 9) | (1 << 10) | (1 << 16) | (1 << 18)
MAX_REMEMBERED = 1 << 16          # windows remembered (a program's pages hold a few thousand)
SWITCH = "MINIVMM_FAST_PATHS"     # "0": plant every exit, as before the engine's refusals were used


def fast_paths() -> bool:
    """Whether the run's fast paths are on (the switch that turns them off, for comparison)."""
    return os.environ.get(SWITCH, "1") != "0"


class EngineRefusals:
    """``refuses(window)``: the instruction at the start of ``window`` (its bytes and
    those after it, up to 15) raises #UD on this engine model before anything runs."""

    def __init__(self, engine_model: str):
        uc = self._uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.ctl_set_cpu_model(getattr(x86, f"UC_CPU_X86_{engine_model}"))
        uc.mem_map(0, SCRATCH)
        uc.mem_write(0, HLT * SCRATCH)
        uc.reg_write(x86.UC_X86_REG_CR4, uc.reg_read(x86.UC_X86_REG_CR4) | CR4_ON)
        uc.reg_write(x86.UC_X86_REG_RSP, SCRATCH - 0x100)
        self._context = uc.context_save()
        self._known: dict[bytes, bool] = {}

    def refuses(self, window: bytes, length: int) -> bool:
        known = self._known.get(window)
        if known is None:
            known = self._probe(window, length)
            if len(self._known) >= MAX_REMEMBERED:
                self._known.clear()
            self._known[window] = known
        return known

    def _probe(self, window: bytes, length: int) -> bool:
        uc = self._uc
        uc.mem_write(CODE, window + HLT)
        uc.ctl_remove_cache(CODE, CODE + len(window) + 1)
        try:
            uc.emu_start(CODE, CODE + length)
            refused = False
        except UcError as e:
            refused = e.errno == UC_ERR_INSN_INVALID and uc.reg_read(x86.UC_X86_REG_RIP) == CODE
        if not refused:  # it ran: nothing it changed may shape the next probe
            uc.mem_write(0, HLT * SCRATCH)
            uc.ctl_remove_cache(0, SCRATCH)
            uc.context_restore(self._context)
        return refused


_THREADS = threading.local()


def refusals_for(engine_model: str) -> EngineRefusals:
    """This thread's scratch engine of ``engine_model``, with what it measured so far
    (a fork's new engine asks again about the same pages)."""
    known = _THREADS.__dict__.setdefault("engines", {})
    if engine_model not in known:
        known[engine_model] = EngineRefusals(engine_model)
    return known[engine_model]
