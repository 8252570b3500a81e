"""Port I/O exits: the guest ABI's hypercalls (docs/abi.md).

0xE9 console (Bochs/QEMU debugcon), 0xF4 power off, 0xF5 checkpoint. Other ports
read as all ones, like an empty ISA bus, and writes to them are counted.

OUT is an instruction exit (planted where the page is decoded), so power-off and
checkpoints stop the guest exactly after the OUT; the engine's own OUT hook only
serves the string form (OUTS).
"""

from __future__ import annotations

from collections import Counter

import unicorn.x86_const as x86
from iced_x86 import OpKind, Register
from unicorn import UC_HOOK_INSN
from unicorn.x86_const import UC_X86_INS_IN, UC_X86_INS_OUT

CONSOLE_PORT = 0xE9
POWER_OFF_PORT = 0xF4
CHECKPOINT_PORT = 0xF5
CONSOLE_KEPT = 16 << 20           # console bytes the report keeps
VALUE_REGS = {1: x86.UC_X86_REG_AL, 2: x86.UC_X86_REG_AX, 4: x86.UC_X86_REG_EAX}


class IoExits:
    def __init__(self, console_sink, on_power_off, on_checkpoint):
        """``on_power_off(status)``; ``on_checkpoint(n) -> bool``: True stops the guest there."""
        self.console = bytearray()
        self.console_left_out = 0
        self.checkpoints = 0
        self.unknown_writes: Counter[int] = Counter()
        self._sink = console_sink
        self._on_power_off = on_power_off
        self._on_checkpoint = on_checkpoint
        self.linux = False   # a Linux program: no port reaches the ABI's devices (traps.SWEPT)

    def install(self, uc) -> None:
        uc.hook_add(UC_HOOK_INSN, self._engine_out, None, 1, 0, UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INSN, self._in, None, 1, 0, UC_X86_INS_IN)

    def on_out_exit(self, uc, address: int, size: int, instr) -> None:
        """An OUT instruction, before it executes: do its I/O, step over it."""
        width = _operand_width(instr)
        port = instr.immediate8 if instr.op0_kind == OpKind.IMMEDIATE8 else uc.reg_read(x86.UC_X86_REG_DX)
        value = uc.reg_read(VALUE_REGS[width])
        uc.reg_write(x86.UC_X86_REG_RIP, address + size)
        if self.write(port, width, value):
            uc.emu_stop()

    def console_write(self, data: bytes) -> None:
        """Console output: the sink gets all of it as it comes; the report keeps the
        first CONSOLE_KEPT bytes and counts the rest (a guest may print forever)."""
        room = CONSOLE_KEPT - len(self.console)
        self.console += data[:max(room, 0)]
        self.console_left_out += max(len(data) - max(room, 0), 0)
        if self._sink:
            self._sink(data)

    def write(self, port: int, width: int, value: int) -> bool:
        """One port write; True when the guest must stop right after it."""
        if port == CONSOLE_PORT:
            self.console_write(bytes([value & 0xFF]))
        elif port == POWER_OFF_PORT:
            self._on_power_off(value & 0xFF)
            return True
        elif port == CHECKPOINT_PORT:
            self.checkpoints += 1
            return bool(self._on_checkpoint(self.checkpoints))
        else:
            self.unknown_writes[port] += 1
        return False

    def _engine_out(self, uc, port, size, value, _ud):
        if not self.linux and self.write(port, size, value):
            uc.emu_stop()

    def _in(self, uc, port, size, _ud):
        return (1 << (8 * size)) - 1 if self.linux else self.read(port, size)

    @staticmethod
    def read(port: int, size: int) -> int:
        if port == CONSOLE_PORT:
            return CONSOLE_PORT  # debugcon's presence check: reading 0xE9 returns 0xE9
        return (1 << (8 * size)) - 1


def _operand_width(instr) -> int:
    """OUT's data operand is AL, AX or EAX: its size is the access width."""
    return {Register.AL: 1, Register.AX: 2, Register.EAX: 4}[instr.op1_register]
