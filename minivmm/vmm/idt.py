"""Exception delivery through the guest's IDT, as a 64-bit CPU does it.

Intel SDM Vol. 3A, 6.14 "Exception and Interrupt Handling in 64-bit Mode": the gate is
16 bytes at IDTR.base + 16 * vector; the CPU aligns RSP down to 16 bytes, pushes SS,
RSP, RFLAGS, CS, RIP (and an error code for vectors 8, 10-14, 17, 21), loads CS:RIP
from the gate, and clears TF, NT, RF (and IF for an interrupt gate). ``iretq`` undoes it.
"""

from __future__ import annotations

import struct
import threading

import unicorn.x86_const as x86
from unicorn import UcError

from . import engine
from ..cpu.registers import ImageBlock, RegisterBlock

ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21})
CONTRIBUTORY = frozenset({0, 10, 11, 12, 13})
INTERRUPT_GATE, TRAP_GATE = 0xE, 0xF
RFLAGS_CLEARED_BY_GATE = (1 << 8) | (1 << 14) | (1 << 16) | (1 << 17)  # TF NT RF VM
RFLAGS_IF = 1 << 9


class DeliveryFailed(Exception):
    """The exception could not reach a handler: on hardware, #DF and then a triple fault."""


class GateFault(Exception):
    """The gate's code segment is unusable: the CPU raises this fault instead (#GP or
    #NP with the selector as error code, SDM Vol. 3A, 6.12.1.1 and 6.14)."""

    def __init__(self, vector: int, error_code: int, reason: str):
        super().__init__(reason)
        self.vector, self.error_code = vector, error_code


# One batch moves what a delivery reads (IDTR and GDTR as the engine's uc_x86_mmr:
# selector, base at 8, limit at 16; then SS, RSP, RFLAGS, CS) and one what it writes:
# through the binding, each register cost microseconds, most of a #UD's round trip.
# The batches are each thread's own: VMs may run in threads, and the C calls let go of
# the GIL.
_MMR = 24
_THREADS = threading.local()


def _batches() -> tuple:
    batches = getattr(_THREADS, "batches", None)
    if batches is None:
        batches = _THREADS.batches = (
            ImageBlock(((x86.UC_X86_REG_IDTR, 0), (x86.UC_X86_REG_GDTR, _MMR), (x86.UC_X86_REG_SS, 2 * _MMR),
                        (x86.UC_X86_REG_RSP, 2 * _MMR + 8), (x86.UC_X86_REG_RFLAGS, 2 * _MMR + 16),
                        (x86.UC_X86_REG_CS, 2 * _MMR + 24)), 2 * _MMR + 32),
            RegisterBlock((x86.UC_X86_REG_RFLAGS, x86.UC_X86_REG_RSP)))
    return batches


def check_code_segment(uc, selector: int, memory: int, external: bool, gdtr=None, ram=None) -> None:
    """The checks on an interrupt gate's selector, in the SDM's order: null, beyond the
    GDT (there is no LDT), not a code segment, DPL above CPL 0, not 64-bit, not present.
    ``gdtr`` is (base, limit) if already read; ``ram`` guest RAM as a host buffer."""
    ext = 1 if external else 0
    error = (selector & 0xFFFC) | ext
    if selector & 0xFFFC == 0:
        raise GateFault(13, ext, "null code segment selector")
    base, limit = gdtr or uc.reg_read(x86.UC_X86_REG_GDTR)[1:3]
    index = selector & 0xFFF8
    if selector & 4 or index + 7 > limit or base + index + 8 > memory:
        raise GateFault(13, error, f"selector {selector:#x} lies beyond the GDT")
    descriptor = struct.unpack("<Q", _read(uc, ram, base + index, 8))[0]
    code, dpl, present = descriptor >> 43 & 3 == 3, descriptor >> 45 & 3, descriptor >> 47 & 1
    long_mode = descriptor >> 53 & 1 and not descriptor >> 54 & 1
    if not code or dpl != 0 or not long_mode:
        raise GateFault(13, error, f"selector {selector:#x} is not a 64-bit ring-0 code segment")
    if not present:
        raise GateFault(11, error, f"code segment {selector:#x} is not present")


def _read(uc, ram, at: int, size: int) -> bytes:
    return uc.mem_read(at, size) if ram is None else ram[at:at + size]


def deliver(uc, vector: int, rip: int, memory: int, error_code: int | None = None, external: bool = True,
            ram=None, on_write=None) -> int:
    """Push the frame and enter the handler; return the handler's address. ``external``
    is false for INT n, whose gate faults carry EXT = 0. Where ``ram`` (guest RAM as a
    host buffer, identity-mapped) is given, the gate and the descriptor are read there
    and the frame written there, ``on_write(address, size)`` told (dirty pages, code)."""
    reads, writes = _batches()
    registers = reads.read(uc)
    base, limit = struct.unpack_from("<QI", registers, 8)
    gdtr = struct.unpack_from("<QI", registers, _MMR + 8)
    ss, rsp, rflags, cs = struct.unpack_from("<4Q", registers, 2 * _MMR)
    if limit == 0:
        raise DeliveryFailed("no IDT loaded")
    if vector * 16 + 15 > limit:
        raise DeliveryFailed(f"IDT limit {limit:#x} does not cover vector {vector}")
    if base + vector * 16 + 16 > memory:
        raise DeliveryFailed(f"IDT gate {vector} at {base + vector * 16:#x} lies outside guest RAM")
    low, high = struct.unpack("<QQ", _read(uc, ram, base + vector * 16, 16))
    kind, present, ist = low >> 40 & 0xF, low >> 47 & 1, low >> 32 & 7
    if not present:
        raise DeliveryFailed(f"IDT gate {vector} is not present")
    if kind not in (INTERRUPT_GATE, TRAP_GATE):
        raise DeliveryFailed(f"IDT gate {vector} has type {kind:#x}, not a 64-bit interrupt or trap gate")
    if ist:
        raise DeliveryFailed(f"IDT gate {vector} uses IST{ist}, but the VM has no TSS")
    handler = (low & 0xFFFF) | (low >> 48 & 0xFFFF) << 16 | (high & 0xFFFFFFFF) << 32
    if handler >= memory:
        raise DeliveryFailed(f"IDT gate {vector} points at {handler:#x}, outside guest RAM")
    selector = low >> 16 & 0xFFFF
    check_code_segment(uc, selector, memory, external, gdtr, ram)
    frame = [ss & 0xFFFF, rsp, rflags, cs & 0xFFFF, rip]
    if error_code is not None:
        frame.append(error_code)
    top = (rsp & ~0xF) - 8 * len(frame)
    if not 0 <= top or rsp > memory:
        raise DeliveryFailed(f"the stack at {rsp:#x} lies outside guest RAM")
    try:
        pushed = struct.pack(f"<{len(frame)}Q", *reversed(frame))
        if ram is None:
            uc.mem_write(top, pushed)
        else:
            ram[top:top + len(pushed)] = pushed
            on_write(top, len(pushed))
        if selector != frame[3]:
            uc.reg_write(x86.UC_X86_REG_CS, selector)
    except UcError as e:
        raise DeliveryFailed(f"cannot push the exception frame or load CS {selector:#x}: {e}") from None
    flags = rflags & ~RFLAGS_CLEARED_BY_GATE
    if kind == INTERRUPT_GATE:
        flags &= ~RFLAGS_IF
    writes.write(uc, (flags, top))
    engine.write_rip(uc, handler)
    return handler
