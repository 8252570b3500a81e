"""Exception delivery through the guest's IDT, as a 64-bit CPU does it.

Intel SDM Vol. 3A, 6.14 "Exception and Interrupt Handling in 64-bit Mode": the gate is
16 bytes at IDTR.base + 16 * vector; the CPU aligns RSP down to 16 bytes, pushes SS,
RSP, RFLAGS, CS, RIP (and an error code for vectors 8, 10-14, 17, 21), loads CS:RIP
from the gate, and clears TF, NT, RF (and IF for an interrupt gate). ``iretq`` undoes it.
"""

from __future__ import annotations

import struct

import unicorn.x86_const as x86
from unicorn import UcError

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


def check_code_segment(uc, selector: int, memory: int, external: bool) -> None:
    """The checks on an interrupt gate's selector, in the SDM's order: null, beyond the
    GDT (there is no LDT), not a code segment, DPL above CPL 0, not 64-bit, not present."""
    ext = 1 if external else 0
    error = (selector & 0xFFFC) | ext
    if selector & 0xFFFC == 0:
        raise GateFault(13, ext, "null code segment selector")
    _, base, limit, _ = uc.reg_read(x86.UC_X86_REG_GDTR)
    index = selector & 0xFFF8
    if selector & 4 or index + 7 > limit or base + index + 8 > memory:
        raise GateFault(13, error, f"selector {selector:#x} lies beyond the GDT")
    descriptor = struct.unpack("<Q", uc.mem_read(base + index, 8))[0]
    code, dpl, present = descriptor >> 43 & 3 == 3, descriptor >> 45 & 3, descriptor >> 47 & 1
    long_mode = descriptor >> 53 & 1 and not descriptor >> 54 & 1
    if not code or dpl != 0 or not long_mode:
        raise GateFault(13, error, f"selector {selector:#x} is not a 64-bit ring-0 code segment")
    if not present:
        raise GateFault(11, error, f"code segment {selector:#x} is not present")


def deliver(uc, vector: int, rip: int, memory: int, error_code: int | None = None, external: bool = True) -> int:
    """Push the frame and enter the handler; return the handler's address. ``external``
    is false for INT n, whose gate faults carry EXT = 0."""
    _, base, limit, _ = uc.reg_read(x86.UC_X86_REG_IDTR)
    if limit == 0:
        raise DeliveryFailed("no IDT loaded")
    if vector * 16 + 15 > limit:
        raise DeliveryFailed(f"IDT limit {limit:#x} does not cover vector {vector}")
    if base + vector * 16 + 16 > memory:
        raise DeliveryFailed(f"IDT gate {vector} at {base + vector * 16:#x} lies outside guest RAM")
    low, high = struct.unpack("<QQ", uc.mem_read(base + vector * 16, 16))
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
    check_code_segment(uc, selector, memory, external)
    rsp, rflags = uc.reg_read(x86.UC_X86_REG_RSP), uc.reg_read(x86.UC_X86_REG_RFLAGS)
    frame = [uc.reg_read(x86.UC_X86_REG_SS), rsp, rflags, uc.reg_read(x86.UC_X86_REG_CS), rip]
    if error_code is not None:
        frame.append(error_code)
    top = (rsp & ~0xF) - 8 * len(frame)
    if not 0 <= top or rsp > memory:
        raise DeliveryFailed(f"the stack at {rsp:#x} lies outside guest RAM")
    try:
        uc.mem_write(top, struct.pack(f"<{len(frame)}Q", *reversed(frame)))
        if selector != frame[3]:
            uc.reg_write(x86.UC_X86_REG_CS, selector)
    except UcError as e:
        raise DeliveryFailed(f"cannot push the exception frame or load CS {selector:#x}: {e}") from None
    flags = rflags & ~RFLAGS_CLEARED_BY_GATE
    if kind == INTERRUPT_GATE:
        flags &= ~RFLAGS_IF
    uc.reg_write(x86.UC_X86_REG_RFLAGS, flags)
    uc.reg_write(x86.UC_X86_REG_RSP, top)
    uc.reg_write(x86.UC_X86_REG_RIP, handler)
    return handler
