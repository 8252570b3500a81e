"""Instructions the engine cannot execute, executed on the machine's own CPU.

A host profile's AVX, AVX2, FMA, F16C, SHA, VAES, GFNI ... instructions are planted
with an exit (the engine has none of them, and mis-executes VEX.128). Where the machine
minivmm runs on has the instruction too, the exit runs it natively, with the guest's
state, in a thunk compiled once per instruction and cached by its address and bytes:

    prologue   save the host's callee-saved registers and MXCSR; load the guest's
               YMM0-15 (ZMM0-31 and K0-7 on an AVX-512 host), MXCSR, arithmetic
               flags and general registers from a context
    scratch    a register the instruction does not use, holding the host address of
               its memory operand's base (guest RAM's host address + the guest's base,
               segment base folded in): guest RSP never becomes the host's stack
    the instruction, its memory operand rewritten to [scratch + index*scale + disp]
    epilogue   store everything back into the context, restore the host's state

Every byte a memory operand can touch is checked first, against RAM (and a Linux
program's page protections), canonical form and the alignment the instruction demands:
a guest fault is the guest's #PF or #GP, never a signal in the VMM's process. Masked
loads and stores (VMASKMOV, VPMASKMOV) and gathers (VSIB) check only the elements their
mask enables, as the SDM says they access. SIMD floating-point exceptions run masked
natively; one the guest's MXCSR unmasks is its #XM (or #UD with CR4.OSXMMEXCPT clear),
with nothing written back, as a fault leaves the destination untouched.

On an AVX-512 host the context is wide: ZMM0-31 from the engine (it keeps all 512 bits
and writes of YMM leave the rest), and the opmask registers K0-7, which the engine has
not: they live here, in the context, and snapshots take them from it. Every thunk is
wide there, since a VEX instruction zeroes its destination up to bit 511 (SDM Vol. 1,
15.5). An EVEX memory operand under an opmask touches only the elements the mask
enables (fault suppression, SDM Vol. 1, 15.7.1).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import struct

import unicorn.x86_const as x86
from iced_x86 import (Code, Decoder, EncodingKind, Encoder, FlowControl, Instruction, InstructionInfoFactory, MemoryOperand,
                      MemorySizeExt, Mnemonic, OpAccess, OpCodeOperandKind, OpKind, Register, RegisterExt)

from ...cpu.confined import address32, names_rsp, refusal
from ...cpu.isa import needed_features as isa_needs
from .. import engine

GPRS = ("RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI") + tuple(f"R{i}" for i in range(8, 16))
SLOT = {name: 8 * i for i, name in enumerate(GPRS)}
RFLAGS, MXCSR, HOST_MXCSR, HOST_FCW, FS_BASE, GS_BASE, RIP, YMM = 128, 136, 140, 144, 168, 176, 184, 192
SCRATCH = YMM + 32 * 16            # one slot per memory operand of a run (and one for a renamed RSP)
MAX_RUN = 16                       # instructions compiled into one thunk at most
ZMM = SCRATCH + 8 * (MAX_RUN + 1)       # the wide context: ZMM0-31, then K0-7
OPMASK = ZMM + 64 * 32
CONTEXT_SIZE = OPMASK + 8 * 8
ARITHMETIC_FLAGS = 0x8D5           # CF PF AF ZF SF OF: what the instruction may change
DF = 0x400
MXCSR_FLAGS, MXCSR_MASKS = 0x3F, 0x1F80
MXCSR_DEFINED = 0xFFFF             # a reserved bit would be #GP in the VMM's own LDMXCSR
CR4_OSXMMEXCPT = 1 << 10
CODE_ARENA = 1 << 20               # executable bytes for thunks (a new arena when full)
MAX_ARENAS = 16                    # at most this many: then every run is compiled afresh
MAX_INSN = 15
WRITES = frozenset((OpAccess.WRITE, OpAccess.READ_WRITE, OpAccess.COND_WRITE, OpAccess.READ_COND_WRITE))
SCRATCH_CHOICES = ("R11", "R10", "R9", "R8", "RBX", "RBP", "RSI", "RCX", "RDX", "RAX", "R12", "R13", "R14", "R15")

# Moves that demand natural alignment of their memory operand (#GP(0) otherwise; SDM
# Vol. 2, each instruction's "Protected Mode Exceptions").
ALIGNED = frozenset(getattr(Mnemonic, m) for m in (
    "VMOVAPS", "VMOVAPD", "VMOVDQA", "VMOVDQA32", "VMOVDQA64", "VMOVNTPS", "VMOVNTPD", "VMOVNTDQ", "VMOVNTDQA"))
# A legacy SSE instruction's 16-byte memory operand must be 16-byte aligned, but for the
# unaligned moves and the string compares (SDM Vol. 1, 10.4.1.1 and 12.1; Vol. 2, PCMPESTRI).
UNALIGNED_LEGACY = frozenset(getattr(Mnemonic, m) for m in (
    "MOVUPS", "MOVUPD", "MOVDQU", "LDDQU", "PCMPESTRI", "PCMPESTRI64", "PCMPESTRM", "PCMPESTRM64", "PCMPISTRI",
    "PCMPISTRM"))
MASKED = frozenset((Mnemonic.VMASKMOVPS, Mnemonic.VMASKMOVPD, Mnemonic.VPMASKMOVD, Mnemonic.VPMASKMOVQ))
# EVEX moves under an opmask touch only the elements it enables, element i by bit i
# (fault suppression, SDM Vol. 1, 15.7.1); other masked EVEX operands are checked whole.
SUPPRESSING = frozenset(getattr(Mnemonic, m) for m in (
    "VMOVDQU8", "VMOVDQU16", "VMOVDQU32", "VMOVDQU64", "VMOVDQA32", "VMOVDQA64", "VMOVUPS", "VMOVUPD", "VMOVAPS",
    "VMOVAPD", "VMOVSS", "VMOVSD", "VPMOVQB", "VPMOVQW", "VPMOVQD", "VPMOVDB", "VPMOVDW", "VPMOVWB"))


def _encoded(instructions) -> bytes:
    encoder = Encoder(64)
    for instr in instructions:
        encoder.encode(instr, 0)
    return encoder.take_buffer()


def _register_name(register: int) -> str:
    return next(k for k, v in vars(Register).items() if v == register)


def _full(register: int) -> int:
    return RegisterExt.full_register(register)


class _RewritesItself(Exception):
    """A store of a run overwrites the run's own code."""


class Fault(Exception):
    """The guest's exception instead of the instruction: vector, error code, CR2, and
    for a Linux program the page's protection byte (None for RAM that is absent)."""

    def __init__(self, vector: int, error: int | None = None, address: int | None = None,
                 detail: str = "", access: str = "read", allowed: int | None = None):
        super().__init__(detail)
        self.vector, self.error, self.address, self.detail = vector, error, address, detail
        self.access, self.allowed = access, allowed
        self.at = self.instr = None   # a later instruction of a native run: where the fault is


def check_span(memory: int, protection, at: int, size: int, writes: bool, reads: bool = True,
               stack: bool = False) -> None:
    """Raise the Fault the CPU would for an access to [at, at + size): non-canonical
    (#GP, or #SS through the stack segment: RSP or RBP as the base, SDM Vol. 3A, 6.15),
    beyond RAM or refused by a Linux program's page ``protection`` (#PF)."""
    end = at + size
    for address in (at, (end - 1) & (1 << 64) - 1):  # a wrap past 2^64 is a #PF at the first byte, as the CPU's
        if address >> 47 not in (0, 0x1FFFF):
            raise Fault(12 if stack else 13, 0, detail=f"non-canonical address {at:#x}")
    if end > memory:
        cr2 = max(at, memory)  # the first byte the CPU cannot reach
        raise Fault(14, 0x2 if writes else 0, cr2, f"access to {at:#x}-{end - 1:#x} reaches beyond guest RAM "
                    f"(CR2 {cr2:#x})", "write" if writes else "read")
    if protection is not None:
        need = (2 if writes else 0) | (1 if reads or not writes else 0)
        for page in range(at >> 12, ((end - 1) >> 12) + 1):
            allowed = protection[page]
            if allowed & need != need:
                raise Fault(14, None, max(at, page << 12), "", "write" if writes and allowed & 1 else "read", allowed)


@functools.cache
def _assembled() -> dict[str, bytes]:
    """The thunk's fixed parts, assembled once (keystone, from these lines; iced's
    encoder for the wide parts: keystone has no EVEX)."""
    from keystone import KS_ARCH_X86, KS_MODE_64, Ks
    ks = Ks(KS_ARCH_X86, KS_MODE_64)

    def asm(lines: list[str]) -> bytes:
        return bytes(ks.asm("; ".join(lines))[0])
    loads = [f"mov {name.lower()}, qword ptr [rdi+{SLOT[name]}]" for name in GPRS if name not in ("RSP", "RDI")]
    stores = [f"mov qword ptr [rdi+{SLOT[name]}], {name.lower()}" for name in GPRS if name not in ("RSP", "RDI")]
    enter = asm(["push rbx", "push rbp", "push r12", "push r13", "push r14", "push r15", "push rdi",
                 f"stmxcsr dword ptr [rdi+{HOST_MXCSR}]", f"fnstcw word ptr [rdi+{HOST_FCW}]",
                 f"ldmxcsr dword ptr [rdi+{MXCSR}]"])
    load_state = asm([f"push qword ptr [rdi+{RFLAGS}]", "popfq", *loads])
    save_state = asm(["pushfq", "cld", "xchg rdi, qword ptr [rsp+8]", *stores, "pop rax",
                      f"mov qword ptr [rdi+{RFLAGS}], rax", "pop rax", f"mov qword ptr [rdi+{SLOT['RDI']}], rax"])
    # the host's MXCSR and x87 control word come back whatever ran (neither is the guest's)
    leave = asm([f"stmxcsr dword ptr [rdi+{MXCSR}]", f"ldmxcsr dword ptr [rdi+{HOST_MXCSR}]",
                 f"fldcw word ptr [rdi+{HOST_FCW}]", "vzeroupper",
                 "pop r15", "pop r14", "pop r13", "pop r12", "pop rbp", "pop rbx", "ret"])
    narrow_loads = asm([f"vmovdqu ymm{i}, ymmword ptr [rdi+{YMM + 32 * i}]" for i in range(16)])
    narrow_stores = asm([f"vmovdqu ymmword ptr [rdi+{YMM + 32 * i}], ymm{i}" for i in range(16)])
    zmm = [(Register.ZMM0 + i, MemoryOperand(Register.RDI, displ=ZMM + 64 * i)) for i in range(32)]
    opmask = [(Register.K0 + i, MemoryOperand(Register.RDI, displ=OPMASK + 8 * i)) for i in range(8)]
    wide_loads = _encoded([Instruction.create_reg_mem(Code.EVEX_VMOVDQU64_ZMM_K1Z_ZMMM512, r, m) for r, m in zmm]
                          + [Instruction.create_reg_mem(Code.VEX_KMOVQ_KR_KM64, r, m) for r, m in opmask])
    wide_stores = _encoded([Instruction.create_mem_reg(Code.EVEX_VMOVDQU64_ZMMM512_K1Z_ZMM, m, r) for r, m in zmm]
                           + [Instruction.create_mem_reg(Code.VEX_KMOVQ_M64_KR, m, r) for r, m in opmask])
    parts = {"prologue": enter + narrow_loads + load_state, "epilogue": save_state + narrow_stores + leave,
             "wide prologue": enter + wide_loads + load_state, "wide epilogue": save_state + wide_stores + leave,
             "guest_rdi": asm([f"mov rdi, qword ptr [rdi+{SLOT['RDI']}]"])}
    for name in GPRS:
        for k in range(MAX_RUN + 1):
            if name not in ("RSP", "RDI"):
                parts[name, k] = asm([f"mov {name.lower()}, qword ptr [rdi+{SCRATCH + 8 * k}]"])
    return parts


class Thunk:
    """A compiled run of instructions: the native function, where the run ends, and per
    memory operand its description and the scratch register (and slot) holding its base."""

    def __init__(self, function, start: int, end: int, count: int, memory: list[tuple[dict, str]], transfer,
                 stack: str | None = None):
        self.function, self.start, self.end, self.count, self.memory = function, start, end, count, memory
        self.transfer = transfer   # (ids, pointers, count): the engine registers the run uses
        self.stack = stack         # the register standing for RSP (its slot follows the memory ones)


class NativeExecutor:
    """One per engine: the context, the code arena, the thunks."""

    def __init__(self, ram, machine_features: frozenset[str], exit_at=None, wide: bool = False):
        """``exit_at(address)``: the exit planted there, (action, audited, instr) or None:
        a run extends over the instructions after the first that exit as unsupported.
        ``wide``: the host has AVX-512 (and so must the machine)."""
        self.ram, self.machine, self.wide = ram, machine_features, wide
        self.exit_at = exit_at or (lambda address: None)
        self.ram_base = ctypes.addressof(ctypes.c_char.from_buffer(ram))
        self.memory = len(ram)
        self.context = (ctypes.c_uint8 * CONTEXT_SIZE)()
        self.context_address = ctypes.addressof(self.context)
        self._slots = (ctypes.c_uint64 * (CONTEXT_SIZE // 8)).from_buffer(self.context)   # 8-byte views
        self._words = (ctypes.c_uint32 * (CONTEXT_SIZE // 4)).from_buffer(self.context)   # 4-byte views
        self._rip = ctypes.c_void_p(self.context_address + RIP)
        self._runs: dict[tuple[int, int], Thunk] = {}      # (start, most instructions) -> its thunk
        self._refused: set[int] = set()                    # addresses whose instruction cannot run here
        self._arenas: list[mmap.mmap] = []
        self._used = CODE_ARENA
        self.protection = None   # a Linux program's page protections (see InstructionExits)
        self.on_write = lambda at, size: None   # guest RAM written natively (dirty pages, code there)
        self.on_forget = lambda first, last: None   # runs over [first, last) dropped

    def opmasks(self) -> dict[str, int]:
        """K0-7, which only the context holds (snapshot names)."""
        return {f"K{i}": int.from_bytes(self.context[OPMASK + 8 * i:OPMASK + 8 * i + 8], "little") for i in range(8)}

    def set_opmasks(self, regs: dict) -> None:
        """K0-7 from snapshot registers (zero where the snapshot has none: a host without AVX-512)."""
        for i in range(8):
            struct.pack_into("<Q", self.context, OPMASK + 8 * i, regs.get(f"K{i}", 0))

    # -- what it takes --------------------------------------------------------------------

    def can_run(self, instr, needs: frozenset[str]) -> bool:
        """The machine has what ``instr`` needs, and the context holds all it touches:
        general registers, flags, XMM/YMM 0-15 (ZMM 0-31 and K0-7 when wide) and memory:
        the allow-list of cpu/confined.py."""
        return needs <= self.machine and refusal(instr, self.wide) is None

    def runnable(self, address: int, instr) -> bool:
        """can_run, remembered for the address (compiled runs and refusals are cached)."""
        if (address, MAX_RUN) in self._runs or (address, 1) in self._runs:
            return True
        if address in self._refused:
            return False
        if self.can_run(instr, isa_needs(instr)):
            return True
        self._refused.add(address)
        return False

    # -- running --------------------------------------------------------------------------

    def run(self, uc, address: int, instr, cr4: int, single: bool = False, allowed=lambda instr: True,
            most: int = MAX_RUN) -> None:
        """Execute ``instr`` at ``address`` with the guest's state, and the instructions
        after it that ``allowed`` (the guest's control registers let them run) in one
        thunk of at most ``most``, one if ``single`` (a counted start counts one
        instruction an exit). A later instruction whose operand faults ends the run
        before it, and its fault is raised at its own address; a SIMD exception inside a
        run re-executes its first instruction alone, so that the one that raises it is
        found where it stands. Raises Fault."""
        if instr.mnemonic == Mnemonic.VMASKMOVDQU:
            return self._mask_move(uc, address, instr)
        most = 1 if single else most
        thunk = self._runs.get((address, most))
        if thunk is None:
            thunk = self._runs[address, most] = self._compile_run(address, instr, most, allowed)
        engine.reg_read_batch(uc._uch, *thunk.transfer)
        slots, words = self._slots, self._words
        guest_flags, guest_mxcsr = slots[RFLAGS >> 3], words[MXCSR >> 2]
        if thunk.count > 1 and ~(guest_mxcsr >> 7) & MXCSR_FLAGS:
            # a SIMD exception the guest unmasked could come after a store of the run,
            # which no context restore undoes: one instruction at a time
            return self.run(uc, address, instr, cr4, single=True)
        saved, written = {}, []
        if thunk.memory:
            saved = {scratch: slots[SLOT[scratch] >> 3] for _, scratch in thunk.memory}
            try:
                for k, (m, _) in enumerate(thunk.memory):  # noqa: B007 (m: the faulting one, below)
                    at, spans = self._check_memory(m, slots)
                    slots[(SCRATCH >> 3) + k] = (self.ram_base + at) & (1 << 64) - 1
                    if m["writes"]:
                        written += spans
                        if thunk.count > 1 and any(at < thunk.end and at + size > address for at, size in spans):
                            raise _RewritesItself
            except _RewritesItself:  # the later instructions were compiled from the old bytes
                return self.run(uc, address, instr, cr4, single=True)
            except Fault as fault:
                if m["member"]:  # a later instruction of the run: those before it run, then it faults
                    self.run(uc, address, instr, cr4, allowed=allowed, most=m["member"])
                    if uc.reg_read(x86.UC_X86_REG_RIP) != m["address"]:
                        return None  # a SIMD exception cut the run shorter still
                    fault.at, fault.instr = m["address"], m["instr"]
                raise
        if thunk.stack:  # the register standing for RSP holds the guest's RSP
            saved[thunk.stack] = slots[SLOT[thunk.stack] >> 3]
            slots[(SCRATCH >> 3) + len(thunk.memory)] = slots[SLOT["RSP"] >> 3]
        slots[RFLAGS >> 3] = guest_flags & (ARITHMETIC_FLAGS | DF) | 0x2
        # exceptions masked and flags clear: what the run raises shows in the flags
        words[MXCSR >> 2] = guest_mxcsr & MXCSR_DEFINED & ~MXCSR_FLAGS | MXCSR_MASKS
        unmasked = ~(guest_mxcsr >> 7) & MXCSR_FLAGS
        before = bytes(self.context) if unmasked else None
        thunk.function(self.context_address)
        raised = words[MXCSR >> 2] & MXCSR_FLAGS
        if raised & unmasked:
            ctypes.memmove(self.context_address, before, CONTEXT_SIZE)  # a fault writes nothing
            if thunk.count > 1:
                return self.run(uc, address, instr, cr4, single=True)
            if cr4 & CR4_OSXMMEXCPT:
                raise Fault(19, detail=f"unmasked SIMD floating-point exception (MXCSR flags {raised:#x})")
            raise Fault(6, detail="unmasked SIMD floating-point exception with CR4.OSXMMEXCPT clear")
        slots[RFLAGS >> 3] = guest_flags & ~ARITHMETIC_FLAGS | slots[RFLAGS >> 3] & ARITHMETIC_FLAGS
        words[MXCSR >> 2] = guest_mxcsr | raised
        if thunk.stack:
            slots[SLOT["RSP"] >> 3] = slots[SLOT[thunk.stack] >> 3]
        for scratch, value in saved.items():
            slots[SLOT[scratch] >> 3] = value
        slots[RIP >> 3] = thunk.end
        engine.reg_write_batch(uc._uch, *thunk.transfer)
        engine.reg_write(uc._uch, x86.UC_X86_REG_RIP, self._rip)  # resume past the run
        for at, size in written:  # pages dirty for migration, code on them translated anew
            self.on_write(at, size)

    def _mask_move(self, uc, address: int, instr) -> None:
        """VMASKMOVDQU xmm1, xmm2: the bytes of xmm1 whose byte in xmm2 has its top bit
        set, to [rdi] (its implicit operand, which no thunk could rebase)."""
        data, mask = (uc.reg_read(getattr(x86, f"UC_X86_REG_XMM{RegisterExt.number(r)}")).to_bytes(16, "little")
                      for r in (instr.op1_register, instr.op2_register))
        rdi = uc.reg_read(x86.UC_X86_REG_RDI) & (0xFFFFFFFF if instr.op0_kind == OpKind.MEMORY_SEG_EDI else (1 << 64) - 1)
        segment = {Register.FS: x86.UC_X86_REG_FS_BASE, Register.GS: x86.UC_X86_REG_GS_BASE}.get(instr.memory_segment)
        rdi = (rdi + (uc.reg_read(segment) if segment else 0)) & (1 << 64) - 1
        chosen = [i for i in range(16) if mask[i] & 0x80]
        for i in chosen:
            self._check_span((rdi + i) & (1 << 64) - 1, 1, True, False)
        for i in chosen:
            self.ram[(rdi + i) & (1 << 64) - 1] = data[i]
        if chosen:
            self.on_write(rdi + chosen[0], chosen[-1] - chosen[0] + 1)
        uc.reg_write(x86.UC_X86_REG_RIP, address + instr.len)

    def forget(self, first: int = 0, last: int = 1 << 64) -> None:
        """Drop the runs over [first, last) (their code or page protections changed;
        everything: the control registers that allowed their instructions changed)."""
        for key in [key for key, t in self._runs.items() if t.start < last and t.end > first]:
            del self._runs[key]
        self._refused = {a for a in self._refused if not first <= a < last}
        self.on_forget(first, last)

    def quick_run(self, address: int):
        """The compiled run at ``address`` if machine code may take it without Python
        (exits/quick.py): its memory operands only read, each whole (no mask, no vector
        index); no stack; else None."""
        thunk = self._runs.get((address, MAX_RUN))
        if thunk is None or thunk.stack or thunk.count < 1 or any(
                m["writes"] or m["vsib"] or m["masked"] or not m["reads"] or m["alignment"] & m["alignment"] - 1
                for m, _ in thunk.memory):
            return None
        return thunk

    def _check_memory(self, m: dict, slots) -> tuple[int, list[tuple[int, int]]]:
        """Where the scratch register points (guest linear: the operand's address, or
        for a vector index its base, segment included) and the spans the operand
        touches, once every byte is known to be the guest's to touch."""
        segment = slots[m["segment"] >> 3] if m["segment"] else 0
        base = slots[SLOT[m["base"]] >> 3] if m["base"] else 0
        if m["vsib"]:
            base = (base + segment) & (1 << 64) - 1
            spans = self._vsib_spans(m, base)
        else:
            index = slots[SLOT[m["index"]] >> 3] if m["index"] else 0
            effective = (base + index * m["scale"] + m["displacement"] + m["folded"]) & m["address_mask"]
            base = (effective + segment) & (1 << 64) - 1  # 67h: the effective address wraps at 32 bits
            spans = self._masked_spans(m, base) if m["masked"] else [(base, m["size"])]
        # the alignment #GP comes before any fault of the access itself (seen on the machine)
        if m["aligned"] and not m["vsib"] and base % m["alignment"]:
            raise Fault(13, 0, detail=f"{m['alignment']}-byte aligned access at {base:#x} is misaligned")
        for at, size in spans:
            check_span(self.memory, self.protection, at, size, m["writes"], m["reads"], m["stack"])
        return base, spans

    def _check_span(self, at: int, size: int, writes: bool, reads: bool) -> None:
        check_span(self.memory, self.protection, at, size, writes, reads)

    def _vector(self, register: int) -> bytes:
        i = RegisterExt.number(register)
        if self.wide:
            return bytes(self.context[ZMM + 64 * i:ZMM + 64 * i + 64])
        return bytes(self.context[YMM + 32 * i:YMM + 32 * i + 32])

    def _enabled(self, m, count: int) -> list[int]:
        """The elements of ``count`` a memory operand's mask enables: an opmask's bits,
        or a vector mask's element sign bits (VMASKMOV, VEX gathers)."""
        if m["opmask"] is not None:
            bits = int.from_bytes(self.context[OPMASK + 8 * m["opmask"]:OPMASK + 8 * m["opmask"] + 8], "little")
            return [i for i in range(count) if bits >> i & 1]
        if m["mask"] is None:
            return list(range(count))
        mask, width = self._vector(m["mask"]), m["element"]
        return [i for i in range(count) if mask[i * width + width - 1] & 0x80]

    def _masked_spans(self, m, start: int) -> list[tuple[int, int]]:
        width = m["element"]
        return [(start + i * width, width) for i in self._enabled(m, m["size"] // width)]

    def _vsib_spans(self, m, base: int) -> list[tuple[int, int]]:
        index, width, element = self._vector(m["index_vector"]), m["index_width"], m["element"]
        spans = []
        for i in self._enabled(m, m["lanes"]):  # a masked-off element is never touched
            offset = int.from_bytes(index[i * width:i * width + width], "little", signed=True)
            spans.append(((base + offset * m["scale"] + m["displacement"]) & (1 << 64) - 1, element))
        return spans

    # -- compiling --------------------------------------------------------------------------

    def _compile_run(self, address: int, instr, most: int, allowed) -> Thunk:
        """``instr`` and the unsupported instructions right after it, as long as each
        memory operand's address comes from registers no earlier one writes (the checks
        run before the thunk) and a scratch register is left that none of them uses.
        An instruction naming RSP runs alone, RSP renamed to a free register."""
        parts = _assembled()
        members, memory, bodies, written, used_all = [], [], [], set(), set()
        stack = None
        at = address
        while len(members) < most and stack is None:
            if members:
                if at >> 12 != address >> 12 or (at + MAX_INSN - 1) >> 12 != address >> 12:
                    break  # within the first page: the engine checked it may be fetched
                trap = self.exit_at(at)
                if trap is None:  # an instruction the engine runs: the machine may run it alike
                    instr = self._plain(at)
                    if instr is None:
                        break
                elif trap[0] != "unsupported" or trap[1]:
                    break
                else:
                    instr = trap[2]
                if not (self.can_run(instr, isa_needs(instr)) and allowed(instr)) or names_rsp(instr):
                    break
            info = InstructionInfoFactory().info(instr)
            used = {_full(r.register) for r in info.used_registers()}
            writes = {_full(r.register) for r in info.used_registers() if r.access in WRITES}
            taken = {getattr(Register, scratch) for _, scratch in memory}
            if members and (used & taken or instr.flow_control != FlowControl.NEXT
                            or instr.mnemonic == Mnemonic.VMASKMOVDQU):
                break
            code = instr.copy()
            free = [n for n in SCRATCH_CHOICES if getattr(Register, n) not in used | used_all | taken]
            if any(instr.op_kind(i) == OpKind.MEMORY for i in range(instr.op_count)) and \
                    not all(u.access == OpAccess.NO_MEM_ACCESS for u in info.used_memory()):
                m = self._memory_operand(instr, info)
                if members and m["registers"] & written or not free:
                    break
                m["member"], m["address"], m["instr"] = len(members), at, instr
                memory.append((m, free.pop(0)))
                _rebase(code, getattr(Register, memory[-1][1]), m["vsib"])
            elif instr.is_ip_rel_memory_operand:
                break  # RIP-relative without an access (LEA): the host's RIP would show
            if names_rsp(instr):
                if not free:
                    break
                stack = free[0]
                _rename_rsp(code, stack)
            encoder = Encoder(64)
            encoder.encode(code, 0)
            bodies.append(encoder.take_buffer())
            members.append(instr)
            written |= writes
            used_all |= used
            at += instr.len
        scratches = [scratch for _, scratch in memory] + ([stack] if stack else [])
        loads = b"".join(parts[scratch, k] for k, scratch in enumerate(scratches))
        wide = "wide " if self.wide else ""
        machine_code = parts[wide + "prologue"] + loads + parts["guest_rdi"] + b"".join(bodies) + parts[wide + "epilogue"]
        return Thunk(self._place(machine_code), address, at, len(members), memory, self._transfer(used_all, memory),
                     stack)

    def _transfer(self, used: set[int], memory) -> tuple:
        """The batch that moves what a run uses between the engine and the context:
        RFLAGS, MXCSR, its general and vector registers, FS/GS bases its memory operands
        add. The rest of the context is loaded stale and never written back."""
        pairs = [(x86.UC_X86_REG_RFLAGS, RFLAGS), (x86.UC_X86_REG_MXCSR, MXCSR)]
        for r in sorted(used):
            if RegisterExt.is_gpr64(r):
                name = _register_name(r)
                pairs.append((getattr(x86, f"UC_X86_REG_{name}"), SLOT[name]))
            elif RegisterExt.is_zmm(r):
                n = RegisterExt.number(r)
                pairs.append((getattr(x86, f"UC_X86_REG_ZMM{n}"), ZMM + 64 * n) if self.wide
                             else (getattr(x86, f"UC_X86_REG_YMM{n}"), YMM + 32 * n))
        segments = {m["segment"] for m, _ in memory if m["segment"]}
        pairs += [(x86.UC_X86_REG_FS_BASE, FS_BASE)] if FS_BASE in segments else []
        pairs += [(x86.UC_X86_REG_GS_BASE, GS_BASE)] if GS_BASE in segments else []
        ids = (ctypes.c_int * len(pairs))(*(i for i, _ in pairs))
        pointers = (ctypes.c_void_p * len(pairs))(*(self.context_address + o for _, o in pairs))
        return ids, pointers, len(pairs)

    def _plain(self, address: int):
        """The instruction at ``address`` if the machine runs it as the engine would, with
        the context's state alone: on the allow-list (cpu/confined.py), neither touching
        the stack nor RIP, with at most its one explicit memory operand."""
        if address + MAX_INSN > self.memory:
            return None
        instr = Decoder(64, bytes(self.ram[address:address + MAX_INSN]), ip=address).decode()
        if instr.code == Code.INVALID or instr.flow_control != FlowControl.NEXT or refusal(instr, self.wide) \
                or instr.has_rep_prefix or instr.has_repne_prefix or instr.is_string_instruction \
                or any(instr.op_code().op_kind(i) == OpCodeOperandKind.MEM_OFFS for i in range(instr.op_count)):
            return None   # (MOV's moffs form, a 64-bit absolute address, cannot be rebased)
        info = InstructionInfoFactory().info(instr)
        if {_full(r.register) for r in info.used_registers()} & {Register.RSP, Register.RIP}:
            return None
        accesses = [u for u in info.used_memory() if u.access != OpAccess.NO_MEM_ACCESS]
        explicit = any(instr.op_kind(i) == OpKind.MEMORY for i in range(instr.op_count))
        if len(accesses) > 1 or (accesses and not explicit):
            return None
        return instr

    def _memory_operand(self, instr, info) -> dict:
        used = next((u for u in info.used_memory() if u.access != OpAccess.NO_MEM_ACCESS), None)
        access = used.access if used else OpAccess.READ
        base = instr.memory_base
        segment = {Register.FS: FS_BASE, Register.GS: GS_BASE}.get(instr.memory_segment)
        rip_relative = instr.is_ip_rel_memory_operand
        m = {"base": None if base in (Register.NONE, Register.RIP, Register.EIP) else _register_name(_full(base)),
             "index": None, "scale": instr.memory_index_scale,
             # RIP-relative: the target goes into the scratch; else the CPU adds the displacement
             "folded": instr.ip_rel_memory_address if rip_relative else 0,
             "displacement": 0 if rip_relative else _signed(instr.memory_displacement),
             "segment": segment, "size": MemorySizeExt.size(instr.memory_size),
             "reads": access in (OpAccess.READ, OpAccess.READ_WRITE, OpAccess.COND_READ, OpAccess.READ_COND_WRITE),
             "writes": access in (OpAccess.WRITE, OpAccess.READ_WRITE, OpAccess.COND_WRITE, OpAccess.READ_COND_WRITE),
             "aligned": _aligned(instr), "vsib": instr.is_vsib,
             "address_mask": 0xFFFFFFFF if address32(instr) else (1 << 64) - 1,
             "stack": instr.memory_segment == Register.SS,
             "element": MemorySizeExt.element_size(instr.memory_size), "mask": None, "opmask": None}
        m["registers"] = {_full(r) for r in (base, instr.memory_index) if r not in (Register.NONE, Register.RIP)}
        if instr.op_mask != Register.NONE and (instr.is_vsib or instr.mnemonic in SUPPRESSING):
            m["opmask"] = instr.op_mask - Register.K0
            m["registers"].add(instr.op_mask)
        elif instr.mnemonic in MASKED:
            m["mask"] = instr.op1_register
        elif instr.is_vsib and instr.encoding == EncodingKind.VEX:
            m["mask"] = instr.op_register(instr.op_count - 1)
        if m["mask"] is not None:
            m["registers"].add(_full(m["mask"]))
        m["masked"] = m["mask"] is not None or m["opmask"] is not None
        m["alignment"] = m["size"]
        if instr.is_vsib:  # as many elements as both the data register and the index vector have
            data = next(instr.op_register(i) for i in range(instr.op_count)
                        if instr.op_kind(i) == OpKind.REGISTER and RegisterExt.is_vector_register(instr.op_register(i)))
            m["index_vector"] = instr.memory_index
            m["index_width"] = 4 if instr.is_vsib32 else 8
            m["lanes"] = min(RegisterExt.size(data) // m["element"], RegisterExt.size(instr.memory_index) // m["index_width"])
        elif instr.memory_index != Register.NONE:
            m["index"] = _register_name(_full(instr.memory_index))
        return m

    def _place(self, code: bytes):
        if self._used + len(code) > CODE_ARENA:
            if len(self._arenas) >= MAX_ARENAS:  # code rewritten again and again: start over, bounded
                self._runs.clear()
                self.on_forget(0, 1 << 64)   # before the code they call is unmapped
                self._arenas.clear()
            self._arenas.append(mmap.mmap(-1, CODE_ARENA, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC))
            self._used = 0
        arena, at = self._arenas[-1], self._used
        arena[at:at + len(code)] = code
        self._used = (at + len(code) + 15) & ~15
        address = ctypes.addressof(ctypes.c_char.from_buffer(arena)) + at
        return ctypes.CFUNCTYPE(None, ctypes.c_void_p)(address)


def _aligned(instr) -> bool:
    """The instruction demands natural alignment of its memory operand (#GP(0))."""
    if instr.mnemonic in ALIGNED:
        return True
    return instr.encoding == EncodingKind.LEGACY and MemorySizeExt.size(instr.memory_size) == 16 \
        and instr.mnemonic not in UNALIGNED_LEGACY and any(
            instr.op_kind(i) == OpKind.REGISTER and RegisterExt.is_xmm(instr.op_register(i)) for i in range(instr.op_count))


def _rebase(code, scratch: int, vsib: bool) -> None:
    """The memory operand as [scratch] (the whole address checked and computed before),
    or for a vector index [scratch + index*scale + displacement]."""
    code.memory_base = scratch
    code.segment_prefix = Register.NONE
    if not vsib:
        code.memory_index, code.memory_index_scale = Register.NONE, 1
        code.memory_displacement, code.memory_displ_size = 0, 0


def _sized(name: str) -> dict[int, int]:
    """A general register's names by operand size (R11: R11, R11D, R11W, R11L)."""
    if name[1].isdigit():
        return {8: getattr(Register, name), 4: getattr(Register, name + "D"), 2: getattr(Register, name + "W"),
                1: getattr(Register, name + "L")}
    low = name[1:]
    return {8: getattr(Register, name), 4: getattr(Register, "E" + low), 2: getattr(Register, low),
            1: getattr(Register, low[0] + "L" if low.endswith("X") else low + "L")}


def _rename_rsp(code, name: str) -> None:
    """RSP, ESP, SP or SPL as a register operand becomes register ``name`` of the same size."""
    sized = _sized(name)
    for i in range(code.op_count):
        if code.op_kind(i) == OpKind.REGISTER and _full(code.op_register(i)) == Register.RSP:
            code.set_op_register(i, sized[RegisterExt.size(code.op_register(i))])


def _signed(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value
