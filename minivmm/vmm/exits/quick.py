"""Refused instructions the machine runs, without Python: the engine's invalid-opcode
exit lands in a few dozen instructions of machine code (assembled once) that look up
RIP in a table of *plans*; a plan is a compiled run (exits/native.py) that touches no
memory and no stack, known to be allowed (CR4, XCR0) and unaudited. The dispatcher
moves the run's registers from the engine into the thunk's context in one batch, runs
the thunk with the guest's MXCSR exceptions masked and its flags clear (as
NativeExecutor.run does), merges the flags and MXCSR flags back, writes the registers
and RIP past the run. Anything else, and a guest MXCSR that unmasks an exception,
goes on to the Python handler, unchanged. An isolated AVX2 instruction costs about a
microsecond this way instead of five.

Plans are added by Python after a run was compiled and ran, and dropped with the runs
(NativeExecutor.forget: code changed, controls changed); the table is rebuilt then.

    bool dispatch(uc_engine *uc, uint64_t *table)
    void dispatch(uc_engine *uc, uint64_t address, uint32_t size, uint64_t *table)
    table: [0] the Python handler of the invalid-opcode exit, [1] uc_reg_read, [2]
           uc_reg_read_batch, [3] uc_reg_write_batch, [4] uc_reg_write, [5] slot
           mask, [6] RIP, [7] size (kept for the fallback), [8] the Python handler of
           planted exits, [9] guest RAM's size, [10] its host address, [11] a Linux
           program's page protections (0: none), then (RIP + 1, plan) slot pairs
    plan:  [0] thunk, [1] context, [2] ids, [3] pointers, [4] count, [5] RIP after
           the run, [6] the guest's RFLAGS, kept here while the thunk runs, [7] how
           many memory operands, then each: the context offsets of its base, index
           (NONE: none) and scale, displacement, address mask (67h), segment base's
           offset, size, alignment mask, the offset of the scratch slot that gets its
           host address

A memory operand is taken only if it is read, whole (no mask, no vector index): its
address is computed as NativeExecutor._check_memory does, and every byte must lie in
guest RAM and, for a Linux program, on readable pages, and be aligned as the
instruction demands; otherwise (a fault to raise) Python takes the exit.
"""

from __future__ import annotations

import ctypes
import functools

import unicorn.x86_const as x86

from .. import engine
from .native import ARITHMETIC_FLAGS, DF, MXCSR, MXCSR_DEFINED, MXCSR_FLAGS, MXCSR_MASKS, RFLAGS, SCRATCH

SLOTS = 4096          # table slots (a plan each, half of them at most): a program's hot runs
HEADER = 12
OPERAND = 9           # qwords describing a memory operand in a plan
NONE = (1 << 64) - 1  # no base, index or segment register

# The two entries: the engine's invalid-opcode exit (uc, table; RIP read here), and a
# planted exit's code hook (uc, address, size, table). Each falls back to its Python
# handler with its own arguments.
_INVALID_ENTRY = f"""
    mov r12, rdi
    mov r13, rsi
    mov esi, {x86.UC_X86_REG_RIP}
    lea rdx, [r13 + 48]
    call qword ptr [r13 + 8]
    mov rax, qword ptr [r13 + 48]
"""
_INVALID_FALLBACK = """
    mov rdi, r12
    mov rsi, r13
    mov rax, qword ptr [r13]
"""
_CODE_ENTRY = """
    mov r12, rdi
    mov r13, rcx
    mov qword ptr [r13 + 48], rsi
    mov qword ptr [r13 + 56], rdx
    mov rax, rsi
"""
_CODE_FALLBACK = """
    mov rdi, r12
    mov rsi, qword ptr [r13 + 48]
    mov rdx, qword ptr [r13 + 56]
    mov rcx, r13
    mov rax, qword ptr [r13 + 64]
"""
_DISPATCH = f"""
    push rbx; push r12; push r13; push r14; push r15
    {{entry}}
    lea rdx, [rax + 1]
    mov rcx, rax
    shr rcx, 12
    xor rcx, rax
    and rcx, qword ptr [r13 + 40]
probe:
    mov r8, rcx
    shl r8, 4
    mov r9, qword ptr [r13 + r8 + {8 * HEADER}]
    test r9, r9
    jz python
    cmp r9, rdx
    je found
    inc rcx
    and rcx, qword ptr [r13 + 40]
    jmp probe
found:
    mov rbx, qword ptr [r13 + r8 + {8 * HEADER + 8}]
    mov rdi, r12
    mov rsi, qword ptr [rbx + 16]
    mov rdx, qword ptr [rbx + 24]
    mov ecx, dword ptr [rbx + 32]
    call qword ptr [r13 + 16]
    mov r14, qword ptr [rbx + 8]
    mov rcx, qword ptr [rbx + 56]
    lea rdi, [rbx + 64]
operand:
    test rcx, rcx
    jz checked
    xor eax, eax
    mov r8, qword ptr [rdi]
    test r8, r8
    js no_base
    mov rax, qword ptr [r14 + r8]
no_base:
    mov r8, qword ptr [rdi + 8]
    test r8, r8
    js no_index
    mov r9, qword ptr [r14 + r8]
    imul r9, qword ptr [rdi + 16]
    add rax, r9
no_index:
    add rax, qword ptr [rdi + 24]
    and rax, qword ptr [rdi + 32]
    mov r8, qword ptr [rdi + 40]
    test r8, r8
    js no_segment
    add rax, qword ptr [r14 + r8]
no_segment:
    test rax, qword ptr [rdi + 56]
    jnz python
    mov r9, rax
    add r9, qword ptr [rdi + 48]
    jc python
    cmp r9, qword ptr [r13 + 72]
    ja python
    mov r10, qword ptr [r13 + 88]
    test r10, r10
    jz readable
    mov r11, rax
    shr r11, 12
    test byte ptr [r10 + r11], 1
    jz python
    lea r11, [r9 - 1]
    shr r11, 12
    test byte ptr [r10 + r11], 1
    jz python
readable:
    add rax, qword ptr [r13 + 80]
    mov r8, qword ptr [rdi + 64]
    mov qword ptr [r14 + r8], rax
    add rdi, {8 * OPERAND}
    dec rcx
    jmp operand
checked:
    mov r15d, dword ptr [r14 + {MXCSR}]
    mov eax, r15d
    shr eax, 7
    and eax, {MXCSR_FLAGS}
    cmp eax, {MXCSR_FLAGS}
    jne python
    mov rax, qword ptr [r14 + {RFLAGS}]
    mov qword ptr [rbx + 48], rax
    and rax, {ARITHMETIC_FLAGS | DF}
    or rax, 2
    mov qword ptr [r14 + {RFLAGS}], rax
    mov eax, r15d
    and eax, {MXCSR_DEFINED & ~MXCSR_FLAGS}
    or eax, {MXCSR_MASKS}
    mov dword ptr [r14 + {MXCSR}], eax
    mov rdi, r14
    call qword ptr [rbx]
    mov eax, dword ptr [r14 + {MXCSR}]
    and eax, {MXCSR_FLAGS}
    or eax, r15d
    mov dword ptr [r14 + {MXCSR}], eax
    mov rax, qword ptr [rbx + 48]
    and rax, {-(ARITHMETIC_FLAGS + 1)}
    mov rcx, qword ptr [r14 + {RFLAGS}]
    and rcx, {ARITHMETIC_FLAGS}
    or rax, rcx
    mov qword ptr [r14 + {RFLAGS}], rax
    mov rdi, r12
    mov rsi, qword ptr [rbx + 16]
    mov rdx, qword ptr [rbx + 24]
    mov ecx, dword ptr [rbx + 32]
    call qword ptr [r13 + 24]
    mov rdi, r12
    mov esi, {x86.UC_X86_REG_RIP}
    lea rdx, [rbx + 40]
    call qword ptr [r13 + 32]
    mov eax, 1
    pop r15; pop r14; pop r13; pop r12; pop rbx
    ret
python:
    {{fallback}}
    pop r15; pop r14; pop r13; pop r12; pop rbx
    jmp rax
"""


@functools.cache
def _dispatchers() -> tuple:
    """(the invalid-opcode entry, the code-hook entry, their pages)."""
    from keystone import KS_ARCH_X86, KS_MODE_64, Ks

    from ...cpu.native import executable
    ks = Ks(KS_ARCH_X86, KS_MODE_64)
    invalid, invalid_page = executable(bytes(ks.asm(_DISPATCH.format(entry=_INVALID_ENTRY,
                                                                      fallback=_INVALID_FALLBACK))[0]),
                                       ctypes.c_bool, ctypes.c_void_p, ctypes.c_void_p)
    code, code_page = executable(bytes(ks.asm(_DISPATCH.format(entry=_CODE_ENTRY, fallback=_CODE_FALLBACK))[0]),
                                 None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p)
    return invalid, code, (invalid_page, code_page)


class QuickExits:
    """The engine's invalid-opcode exit and planted exits' hooks, with plans taken in
    machine code. ``on_invalid`` is the Python handler of the first (``(handle,
    user_data) -> bool``), ``on_planted`` that of the second (``(handle, address, size,
    user_data)``)."""

    def __init__(self, uc, on_invalid, on_planted):
        invalid, self.code_hook, _pages = _dispatchers()
        self._python = engine.INVALID_CALLBACK(on_invalid), engine.CODE_CALLBACK(on_planted)
        self.table = (ctypes.c_uint64 * (HEADER + 2 * SLOTS))()
        lib = engine._lib
        for i, pointer in ((0, self._python[0]), (1, lib.uc_reg_read), (2, lib.uc_reg_read_batch),
                           (3, lib.uc_reg_write_batch), (4, lib.uc_reg_write), (8, self._python[1])):
            self.table[i] = ctypes.cast(pointer, ctypes.c_void_p).value
        self.table[5] = SLOTS - 1
        self.user_data = ctypes.addressof(self.table)
        self.plans: dict[int, object] = {}     # RIP -> its plan (kept alive here)
        self._protection = self._view = None
        self._hook = engine.add_invalid_hook(uc, invalid, self.user_data)

    def add(self, address: int, thunk, native) -> None:
        """Take the run at ``address`` in machine code from now on (``native`` its
        NativeExecutor; the caller checked the run: NativeExecutor.quick_run)."""
        if address in self.plans or len(self.plans) >= SLOTS // 2:
            return
        self._memory(native)
        ids, pointers, count = thunk.transfer
        operands = [_operand(m, SCRATCH + 8 * k) for k, (m, _) in enumerate(thunk.memory)]
        plan = (ctypes.c_uint64 * (8 + OPERAND * len(operands)))(
            ctypes.cast(thunk.function, ctypes.c_void_p).value, native.context_address, ctypes.addressof(ids),
            ctypes.addressof(pointers), count, thunk.end, 0, len(operands), *(v for o in operands for v in o))
        self.plans[address] = (plan, thunk)
        self._place(address, plan)

    def _memory(self, native) -> None:
        """Guest RAM and the page protections the plans check against (all plans go
        when the protections are another process's)."""
        if self._protection is not native.protection:
            self.forget()
            self._protection = native.protection
            self._view = None if native.protection is None else \
                (ctypes.c_char * len(native.protection)).from_buffer(native.protection)
            self.table[11] = 0 if self._view is None else ctypes.addressof(self._view)
        self.table[9], self.table[10] = native.memory, native.ram_base

    def _place(self, address: int, plan) -> None:
        slot = (address ^ address >> 12) & (SLOTS - 1)
        while self.table[HEADER + 2 * slot]:
            slot = (slot + 1) & (SLOTS - 1)
        self.table[HEADER + 2 * slot + 1] = ctypes.addressof(plan)
        self.table[HEADER + 2 * slot] = address + 1

    def forget(self, first: int = 0, last: int = 1 << 64) -> None:
        """Drop the plans of runs over [first, last) (their code or controls changed)."""
        gone = [a for a, (_, thunk) in self.plans.items() if thunk.start < last and thunk.end > first]
        if not gone:
            return
        for address in gone:
            del self.plans[address]
        ctypes.memset(ctypes.byref(self.table, 8 * HEADER), 0, 16 * SLOTS)
        for address, (plan, _) in self.plans.items():
            self._place(address, plan)


def _operand(m: dict, scratch: int) -> tuple:
    """A plan's description of a memory operand (see the module)."""
    from .native import SLOT
    offset = lambda name: SLOT[name] if name else NONE  # noqa: E731
    return (offset(m["base"]), offset(m["index"]), m["scale"], (m["displacement"] + m["folded"]) & NONE,
            m["address_mask"], m["segment"] or NONE, m["size"], m["alignment"] - 1 if m["aligned"] else 0, scratch)
