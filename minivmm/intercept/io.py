"""Port I/O exits: the guest ABI's hypercalls (SPEC section 2).

0xE9 console (Bochs/QEMU debugcon), 0xF4 power off, 0xF5 checkpoint. Other ports
read as all ones, like an empty ISA bus, and writes to them are counted.
"""

from __future__ import annotations

from collections import Counter

from unicorn import UC_HOOK_INSN
from unicorn.x86_const import UC_X86_INS_IN, UC_X86_INS_OUT

CONSOLE_PORT = 0xE9
POWER_OFF_PORT = 0xF4
CHECKPOINT_PORT = 0xF5


class IoExitHandler:
    def __init__(self, console_sink, on_power_off, on_checkpoint):
        self.console = bytearray()
        self.checkpoints = 0
        self.unknown_writes: Counter[int] = Counter()
        self.halted_io = False  # set once the guest powered off: the rest of its block is void
        self._sink = console_sink
        self._on_power_off = on_power_off
        self._on_checkpoint = on_checkpoint

    def install(self, uc) -> None:
        uc.hook_add(UC_HOOK_INSN, self._out, None, 1, 0, UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INSN, self._in, None, 1, 0, UC_X86_INS_IN)

    def _out(self, uc, port, size, value, _ud):
        if self.halted_io:
            return
        if port == CONSOLE_PORT:
            byte = bytes([value & 0xFF])
            self.console += byte
            if self._sink:
                self._sink(byte)
        elif port == POWER_OFF_PORT:
            self.halted_io = True
            self._on_power_off(value & 0xFF)
        elif port == CHECKPOINT_PORT:
            self.checkpoints += 1
            self._on_checkpoint(self.checkpoints)
        else:
            self.unknown_writes[port] += 1

    def _in(self, uc, port, size, _ud):
        if port == CONSOLE_PORT:
            return CONSOLE_PORT  # debugcon's presence check: reading 0xE9 returns 0xE9
        return (1 << (8 * size)) - 1

