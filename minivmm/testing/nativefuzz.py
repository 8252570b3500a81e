"""A differential fuzzer for the native executor: the machine's CPU against a guest.

Each case is a short random sequence of instructions (AVX, AVX2, AVX-512, BMI, SSE,
x87, general and system instructions) with random registers and memory operands based
on RSP, FS or GS, with an address-size prefix, misaligned, crossing a page or the end of
a mapping, or non-canonical. It is wrapped in a tiny static Linux program (no libc):
set FS/GS bases and every register, run the sequence twice (the second time, minivmm
takes in machine code what it compiled the first), dump the registers, flags, MXCSR,
x87 control word and the data pages to stdout, exit. The program runs natively (the
oracle) and as a Linux program under minivmm on the ``native`` host profile, in a worker
process, so that a VMM that dies is counted, not fatal. They must agree: the same
signal, or the same dump (flags the SDM leaves undefined masked). A differing guest
value that is an address of the worker's own mappings is a host value seen by the guest.

``python -m minivmm.testing.nativefuzz --cases N [--seed S]`` prints the table.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import random
import signal
import struct
import subprocess
import tempfile
import traceback
from collections import Counter
from dataclasses import dataclass, field

CODE, DATA, RESULT = 0x400000, 0x600000, 0x700000
DATA_PAGES = 3                       # nothing is mapped after them: the end of a mapping
FS_AT, GS_AT, STACK_AT = DATA + 0x1000, DATA + 0x800, DATA + 0x1800
GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi") + tuple(f"r{i}" for i in range(8, 16))
POINTERS = ("rsi", "rdi", "rbx", "rbp")       # into the data pages
VALUES = ("rax", "rcx", "rdx", "r10", "r11", "r12", "r13", "r15")
SMALL, WRAPPED, NONCANONICAL = "r9", "r8", "r14"   # a small offset; junk above bit 31 + DATA; a bad offset
FLAGS_AT, MXCSR_AT, FCW_AT, VECTORS_AT = 128, 136, 140, 256
FLAGS_PUSHED_AT = 0xEF8              # PUSHFQ's copy on the dump's stack
SLOT_AT = 0xFF0                      # where the run of the sequence goes next (it runs twice)
ARITHMETIC = 0x8D5
DUMP = 4096 + DATA_PAGES * 4096


# ---- the program -----------------------------------------------------------------------

def _elf(segments: list[tuple[int, bytes, int]], entry: int) -> bytes:
    """A static ELF64 executable of PT_LOAD ``segments`` (address, bytes, PF_* flags)."""
    header_size, count = 64 + 56 * len(segments), len(segments)
    offset, headers, body = (header_size + 0xFFF) & ~0xFFF, b"", b""
    for address, data, flags in segments:
        headers += struct.pack("<IIQQQQQQ", 1, flags, offset + len(body), address, address, len(data), len(data), 0x1000)
        body += data + bytes(-len(data) % 0x1000)
    ident = b"\x7fELF\x02\x01\x01" + bytes(9)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, 64, 0, 0, 64, 56, count, 0, 0, 0)
    return header + headers + bytes(offset - header_size) + body


@functools.cache
def _keystone():
    from keystone import KS_ARCH_X86, KS_MODE_64, Ks
    return Ks(KS_ARCH_X86, KS_MODE_64)


def _assemble(lines: list[str], address: int = CODE) -> bytes:
    return bytes(_keystone().asm("; ".join(lines), address)[0] or b"")


def _registers(rng: random.Random) -> dict[str, int]:
    values = {r: rng.getrandbits(64) for r in GPRS}
    for r in POINTERS:
        values[r] = DATA + rng.randrange(0, DATA_PAGES * 4096 - 256, 8)
    values["rsp"] = STACK_AT
    values[SMALL] = rng.randrange(0, 256)
    values[WRAPPED] = rng.getrandbits(32) << 32 | DATA + rng.randrange(0, 4096)
    values[NONCANONICAL] = 0x4000 << 48 | rng.getrandbits(32)
    return values


def program(sequence: list[str | bytes], rng: random.Random, wide: bool) -> bytes:
    """The static program around ``sequence``: assembly lines, or machine code (EVEX)."""
    start = ["mov eax, 158", "mov edi, 0x1002", f"mov rsi, {FS_AT:#x}", "syscall",   # arch_prctl(ARCH_SET_FS)
             "mov eax, 158", "mov edi, 0x1001", f"mov rsi, {GS_AT:#x}", "syscall",   # arch_prctl(ARCH_SET_GS)
             f"mov rax, {DATA + 0x2000:#x}"]
    start += [f"vmovdqu ymm{i}, ymmword ptr [rax + {32 * (i % 8)}]" for i in range(16)]
    start += [f"mov {r}, {v:#x}" for r, v in _registers(rng).items()]
    # The sequence runs twice, so that minivmm takes the second time in machine code what
    # it compiled the first: an indirect JMP through a slot of the result page leaves it
    # the first time, and moves and jumps that touch no flag and no register bring it back.
    code = bytearray(_assemble(start))
    code += _assemble([f"mov qword ptr [{RESULT + SLOT_AT:#x}], 0"], CODE + len(code))
    first_slot = len(code) - 4                      # the MOV's imm32: the slot's first target
    again = len(code)
    for part in sequence:
        code += part if isinstance(part, bytes) else _assemble([part], CODE + len(code))
    code += _assemble([f"jmp qword ptr [{RESULT + SLOT_AT:#x}]"], CODE + len(code))
    struct.pack_into("<i", code, first_slot, CODE + len(code))
    code += _assemble([f"mov qword ptr [{RESULT + SLOT_AT:#x}], 0"], CODE + len(code))
    second_slot = len(code) - 4
    code += b"\xe9" + struct.pack("<i", again - (len(code) + 5))
    struct.pack_into("<i", code, second_slot, CODE + len(code))
    code = bytes(code)
    stores = [f"mov qword ptr [{RESULT + 8 * i:#x}], {r}" for i, r in enumerate(GPRS)]
    stores += [f"mov rsp, {RESULT + 0xF00:#x}", "pushfq", "pop rax", f"mov qword ptr [{RESULT + FLAGS_AT:#x}], rax",
               f"stmxcsr dword ptr [{RESULT + MXCSR_AT:#x}]", f"fnstcw word ptr [{RESULT + FCW_AT:#x}]"]
    stores += [f"vmovdqu ymmword ptr [{RESULT + VECTORS_AT + 32 * i:#x}], ymm{i}" for i in range(16)]
    code += _assemble(stores, CODE + len(code))
    if wide:  # ZMM0-31 and K0-7 (keystone has no EVEX: iced's encoder)
        code += _wide_stores()
    code += _assemble(["mov eax, 1", "mov edi, 1", f"mov rsi, {RESULT:#x}", "mov edx, 4096", "syscall",
                       "mov eax, 1", "mov edi, 1", f"mov rsi, {DATA:#x}", f"mov edx, {DATA_PAGES * 4096}", "syscall",
                       "mov eax, 231", "xor edi, edi", "syscall"], CODE + len(code))
    data = rng.randbytes(DATA_PAGES * 4096)
    return _elf([(CODE, code, 5), (DATA, data, 6), (RESULT, bytes(4096), 6)], CODE)


def _wide_stores() -> bytes:
    from iced_x86 import Code, Encoder, Instruction, MemoryOperand, Register
    encoder = Encoder(64)
    for i in range(32):
        at = MemoryOperand(displ=RESULT + 1024 + 64 * i, displ_size=4)
        encoder.encode(Instruction.create_mem_reg(Code.EVEX_VMOVDQU64_ZMMM512_K1Z_ZMM, at, Register.ZMM0 + i), 0)
    for i in range(8):
        at = MemoryOperand(displ=RESULT + 3072 + 8 * i, displ_size=4)
        encoder.encode(Instruction.create_mem_reg(Code.VEX_KMOVQ_M64_KR, at, Register.K0 + i), 0)
    return encoder.take_buffer()


# ---- the sequences -----------------------------------------------------------------------

TEMPLATES = {
    "avx": ["vpaddd {y}, {y}, {y}", "vpaddd {y}, {y}, ymmword ptr {m}", "vmovdqu {y}, ymmword ptr {m}",
            "vmovdqu ymmword ptr {m}, {y}", "vmovdqa {y}, ymmword ptr {m}", "vpermd {y}, {y}, {y}",
            "vfmadd231ps {y}, {y}, {y}", "vmovq {x}, {g}", "vmovq {g}, {x}", "vpbroadcastd {y}, dword ptr {m}",
            "vpmaskmovd {y}, {y}, ymmword ptr {m}", "vpmaskmovd ymmword ptr {m}, {y}, {y}", "vptest {y}, {y}",
            "vpextrq {g}, {x}, 1", "vpinsrq {x}, {x}, {g}, 0", "vcvtps2ph xmmword ptr {m}, {y}, 0",
            "vpshufb {y}, {y}, {y}", "vpxor {x}, {x}, xmmword ptr {m}", "vzeroupper"],
    "bmi": ["bzhi {g}, {g}, {g}", "pdep {g}, {g}, {g}", "pext {g}, {g}, qword ptr {m}", "blsi {g}, {g}",
            "andn {g}, {g}, {g}", "shlx {g}, {g}, {g}", "rorx {g}, {g}, 5", "mulx {g}, {g}, {g}", "tzcnt {g}, {g}"],
    "sse": ["paddd {x}, {x}", "paddd {x}, xmmword ptr {m}", "movaps {x}, xmmword ptr {m}",
            "movups xmmword ptr {m}, {x}", "pshufb {x}, {x}", "movd {g32}, {x}", "addps {x}, xmmword ptr {m}",
            "pcmpeqb {x}, xmmword ptr {m}", "stmxcsr dword ptr {m}", "movdqu {x}, xmmword ptr {m}",
            "mpsadbw {x}, {x}, 5", "pshufd {x}, {x}, 0x1b", "punpcklbw {x}, {x}"],
    "x87": ["fld qword ptr {m}", "fstp qword ptr {m}", "fnstcw word ptr {m}", "fild dword ptr {m}",
            "fistp dword ptr {m}"],
    "general": ["add {g}, {g}", "imul {g}, {g}", "xchg {g}, {g}", "lea {g}, {m}", "mov {g}, qword ptr {m}",
                "mov qword ptr {m}, {g}", "cmp {g}, {g}", "cmovz {g}, {g}", "bswap {g}", "xor {g}, {g}",
                "lock add qword ptr {m}, {g}", "xadd qword ptr {m}, {g}", "shld {g}, {g}, 3", "neg {g}",
                "mov {g}, {g}"],
    "system": ["rdfsbase {g}", "rdgsbase {g}", "wrfsbase {p}", "wrgsbase {g}", "wbinvd", "swapgs", "invlpg {m}",
               "lgdt {m}", "rdmsr", "wrmsr", "cli", "hlt", b"\xf0\x89\xc0", "fldcw word ptr {m}",
               "fninit", "fnstenv {m}", "ldmxcsr dword ptr {m}"],
}
EVEX = ("vpaddd", "vmovdqu32 load", "vmovdqu32 store", "kmov", "vpcmpd")


def _memory(rng: random.Random) -> tuple[str, object]:
    """A memory operand: its text and, for iced's encoder, its MemoryOperand."""
    from iced_x86 import MemoryOperand, Register
    p = rng.choice(POINTERS)
    kind = rng.choice(("aligned", "misaligned", "crossing", "end", "stack", "fs", "gs", "wrapped", "noncanonical"))
    d = {"aligned": 32 * rng.randrange(0, 8), "misaligned": rng.randrange(1, 64), "crossing": rng.randrange(-64, 4096),
         "stack": rng.randrange(-128, 128)}.get(kind, rng.randrange(0, 64))
    reg = lambda name: getattr(Register, name.upper())  # noqa: E731
    if kind == "end":
        at = DATA + DATA_PAGES * 4096 - rng.randrange(1, 320)   # past the end, by SMALL (0..255) more
        return f"[{SMALL} + {at:#x}]", MemoryOperand(reg(SMALL), displ=at, displ_size=8)
    if kind == "stack":
        return f"[rsp + {d}]", MemoryOperand(Register.RSP, displ=d, displ_size=1)
    if kind in ("fs", "gs"):
        return f"{kind}:[{SMALL} + {d}]", MemoryOperand(reg(SMALL), displ=d, displ_size=1, seg=reg(kind))
    if kind == "wrapped":
        return f"[{WRAPPED}d + {d}]", MemoryOperand(Register.R8D, displ=d, displ_size=1)
    if kind == "noncanonical":
        return f"[{p} + {NONCANONICAL}]", MemoryOperand(reg(p), reg(NONCANONICAL))
    return f"[{p} + {d}]", MemoryOperand(reg(p), displ=d, displ_size=1 if -128 <= d < 128 else 8)


def _fill(template: str, rng: random.Random) -> str:
    """The template's operands, drawn at random. (ESP is no 32-bit destination: a random
    address below 4 GiB lands in minivmm's guest RAM or not, natively nowhere: a lottery
    of layouts, not of the executor.)"""
    def gpr() -> str:
        roll = rng.random()
        return "rsp" if roll < 0.08 else rng.choice(POINTERS) if roll < 0.15 else rng.choice(VALUES)
    out = template
    for key, make in (("{y}", lambda: f"ymm{rng.randrange(16)}"), ("{x}", lambda: f"xmm{rng.randrange(16)}"),
                      ("{g32}", lambda: rng.choice(("eax", "ecx", "edx", "r10d"))), ("{g}", gpr),
                      ("{p}", lambda: rng.choice(POINTERS)), ("{m}", lambda: _memory(rng)[0])):
        while key in out:
            out = out.replace(key, make(), 1)
    return out


def _evex(rng: random.Random) -> bytes:
    from iced_x86 import Code, Instruction, Register
    z = lambda: Register.ZMM0 + rng.randrange(32)  # noqa: E731
    k = Register.K1 + rng.randrange(7)
    which = rng.choice(EVEX)
    if which == "vpaddd":
        instr = Instruction.create_reg_reg_reg(Code.EVEX_VPADDD_ZMM_K1Z_ZMM_ZMMM512B32, z(), z(), z())
    elif which == "vmovdqu32 load":
        instr = Instruction.create_reg_mem(Code.EVEX_VMOVDQU32_ZMM_K1Z_ZMMM512, z(), _memory(rng)[1])
    elif which == "vmovdqu32 store":
        instr = Instruction.create_mem_reg(Code.EVEX_VMOVDQU32_ZMMM512_K1Z_ZMM, _memory(rng)[1], z())
    elif which == "kmov":
        return _encode(Instruction.create_reg_reg(Code.VEX_KMOVQ_KR_R64, k, Register.RAX + rng.randrange(16)))
    else:
        instr = Instruction.create_reg_reg_reg_u32(Code.EVEX_VPCMPD_KR_K1_ZMM_ZMMM512B32_IMM8, k, z(), z(), rng.randrange(8))
    if rng.random() < 0.6:
        instr.op_mask = Register.K1 + rng.randrange(7)
    return _encode(instr)


def _encode(instr) -> bytes:
    from iced_x86 import Encoder
    encoder = Encoder(64)
    encoder.encode(instr, 0)
    return encoder.take_buffer()


def sequence(rng: random.Random, wide: bool) -> list[str | bytes]:
    """2 to 6 instructions, most of them the kinds the native executor takes."""
    kinds = ["avx"] * 5 + ["bmi"] * 2 + ["sse"] * 2 + ["general"] * 3 + ["x87", "system"] + (["evex"] * 3 if wide else [])
    out = []
    while len(out) < rng.randrange(2, 7):
        kind = rng.choice(kinds)
        if kind == "evex":
            out.append(_evex(rng))
            continue
        template = rng.choice(TEMPLATES[kind])
        line = template if isinstance(template, bytes) else _fill(template, rng)
        if isinstance(line, str) and not _assemble([line], CODE):
            continue  # an operand combination keystone does not take
        out.append(line)
    return out


# ---- outcomes -----------------------------------------------------------------------------

@dataclass
class Outcome:
    signal: str | None      # the signal that ended the program, or None: it exited
    dump: bytes             # what it wrote: registers, then the data pages
    vmm: str = ""           # a guest run's trouble in the VMM: an exception, host state changed


def native(path: str) -> Outcome:
    done = subprocess.run([path], capture_output=True, timeout=10)
    return Outcome(signal.Signals(-done.returncode).name if done.returncode < 0 else None, done.stdout)


def _control(words: tuple[int, int]) -> tuple[int, int]:
    mxcsr, fcw = words
    return mxcsr & ~0x3F, fcw


def guest(path: str, host: str) -> Outcome:
    from ..cpu.native import control_words
    from ..vmm.vm import VM
    before = control_words()
    try:
        result = VM(path, host, linux=True).run(timeout=20)
    except Exception:
        return Outcome(None, b"", "VMM error: " + traceback.format_exc(limit=3).strip().splitlines()[-1])
    after = control_words()
    # MXCSR's sticky flags are status: the engine's softfloat runs some operations on the
    # host's FPU (QEMU's hardfloat), which sets them; the masks, rounding, DAZ and FTZ the
    # VMM computes with, and the x87 control word, are what no guest may change.
    trouble = "" if _control(after) == _control(before) else f"host MXCSR/FCW changed: {before} -> {after}"
    if result.stop.reason == "signaled":
        return Outcome(result.stop.signal, b"", trouble)
    if result.stop.reason != "exited":
        return Outcome(None, b"", trouble or f"stopped: {result.stop.message}")
    return Outcome(None, result.console.encode("latin-1"), trouble)


def _worker(connection, host: str) -> None:
    maps = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in open("/proc/self/maps")]
    connection.send(maps)
    while True:
        path = connection.recv()
        if path is None:
            return
        connection.send(guest(path, host))


# ---- the campaign -------------------------------------------------------------------------

@dataclass
class Tally:
    cases: int = 0
    agreed: int = 0
    vmm_deaths: int = 0          # the worker running minivmm died
    vmm_troubles: int = 0        # an exception in the VMM, or its MXCSR/x87 control word changed
    host_values: int = 0         # a differing guest value that is an address of the VMM's mappings
    explained: Counter = field(default_factory=Counter)   # documented differences, by reason
    unexplained: list = field(default_factory=list)       # (sequence, native, guest) of the first few

    def rows(self) -> list[tuple[str, int]]:
        return [("sequences", self.cases), ("agreed with the machine", self.agreed),
                ("VMM deaths", self.vmm_deaths), ("VMM errors or host state changed", self.vmm_troubles),
                ("host values seen by the guest", self.host_values),
                *((f"explained: {reason}", n) for reason, n in sorted(self.explained.items())),
                ("unexplained differences", len(self.unexplained))]


def describe(sequence: list[str | bytes]) -> str:
    from iced_x86 import Decoder, Formatter, FormatterSyntax
    formatter = Formatter(FormatterSyntax.INTEL)
    return "; ".join(part if isinstance(part, str) else formatter.format(Decoder(64, part).decode())
                     for part in sequence)


# iced-x86's RflagsBits -> RFLAGS bits: OF SF ZF AF CF PF
_RFLAGS = ((1, 1 << 11), (2, 1 << 7), (4, 1 << 6), (8, 1 << 4), (16, 1), (32, 1 << 2))


def _undefined_flags(sequence: list[str | bytes]) -> int:
    """The RFLAGS bits an instruction of the sequence leaves undefined (SDM Vol. 2, each
    instruction's "Flags Affected")."""
    from iced_x86 import Decoder
    flags = 0
    for part in sequence:
        code = part if isinstance(part, bytes) else _assemble([part])
        bits = Decoder(64, code).decode().rflags_undefined if code else 0
        flags |= sum(rflags for iced, rflags in _RFLAGS if bits & iced)
    return flags


# Differences that are the engine's, not the native executor's, each documented in the
# README's Limits: which instructions of a sequence explain a disagreement.
ENGINE_GAPS = {
    "the engine does not check legacy SSE alignment": ("movaps", "paddd", "addps", "pcmpeqb", "pshufb"),
    "the engine's x87 exceptions": ("fld", "fstp", "fild", "fistp", "fldcw", "fninit", "fnstenv"),
}


def _explain(text: str) -> str | None:
    words = {w.strip(",") for w in text.replace(";", " ").split()}
    return next((reason for reason, mnemonics in ENGINE_GAPS.items() if words & set(mnemonics)), None)


def _masked(dump: bytes, undefined: int) -> bytes:
    if len(dump) < FLAGS_PUSHED_AT + 8:
        return dump
    out = bytearray(dump)
    for at in (FLAGS_AT, FLAGS_PUSHED_AT):
        flags = int.from_bytes(dump[at:at + 8], "little") & ~undefined
        out[at:at + 8] = flags.to_bytes(8, "little")
    return bytes(out)


def _host_value(dump: bytes, expected: bytes, maps) -> bool:
    for at in range(0, min(len(dump), len(expected)) - 7, 8):
        value = int.from_bytes(dump[at:at + 8], "little")
        if dump[at:at + 8] != expected[at:at + 8] and value >= 0x10000 and any(low <= value < high for low, high in maps):
            return True
    return False


class _Worker:
    """minivmm in a child process: a death is counted, then a new one is started."""

    def __init__(self, host: str):
        self.host, self.process = host, None

    def start(self) -> None:
        context = multiprocessing.get_context("fork")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, self.host), daemon=True)
        self.process.start()
        self.maps = self.connection.recv()

    def run(self, path: str, timeout: float = 60) -> Outcome | None:
        """The guest's outcome, or None when the worker died (or hung and was killed)."""
        if self.process is None:
            self.start()
        self.connection.send(path)
        try:
            if self.connection.poll(timeout):
                return self.connection.recv()
        except EOFError:
            pass
        self.process.kill()
        self.process.join()
        self.process = None
        return None

    def stop(self) -> None:
        if self.process is not None:
            self.connection.send(None)
            self.process.join(5)


def campaign(cases: int, seed: int = 0, host: str = "native", keep: int = 20) -> Tally:
    """Run ``cases`` random sequences natively and under minivmm on ``host``."""
    from ..cpu.native import machine_features
    from ..cpu.profiles import load_profile
    wide = "avx512f" in machine_features() & load_profile(host).physical
    tally, worker = Tally(), _Worker(host)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "case")
        for i in range(cases):
            rng = random.Random(f"{seed}:{i}")
            steps = sequence(rng, wide)
            with open(path, "wb") as f:
                f.write(program(steps, rng, wide))
            os.chmod(path, 0o755)
            want, got = native(path), worker.run(path)
            tally.cases += 1
            text = describe(steps)
            if got is None:
                tally.vmm_deaths += 1
                tally.unexplained.append((text, want.signal or "exit", "the VMM died"))
                continue
            if got.vmm:
                tally.vmm_troubles += 1
                tally.unexplained.append((text, want.signal or "exit", got.vmm))
                continue
            undefined = _undefined_flags(steps)
            if got.signal == want.signal and _masked(got.dump, undefined) == _masked(want.dump, undefined):
                tally.agreed += 1
                continue
            if _host_value(got.dump, want.dump, worker.maps):
                tally.host_values += 1
                tally.unexplained.append((text, want.signal or "exit", "a host value"))
                continue
            reason = _explain(text)
            if reason:
                tally.explained[reason] += 1
            elif len(tally.unexplained) < keep:
                tally.unexplained.append((text, want.signal or "exit", got.signal or "exit"))
            else:
                tally.unexplained.append(None)
    worker.stop()
    return tally


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m minivmm.testing.nativefuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--host", default="native")
    options = parser.parse_args(argv)
    tally = campaign(options.cases, options.seed, options.host)
    print(f"| native executor fuzz ({options.host}, seed {options.seed}) | count |\n| --- | --- |")
    for name, count in tally.rows():
        print(f"| {name} | {count} |")
    for case in tally.unexplained:
        if case:
            print(f"  {case[0]}: native {case[1]}, minivmm {case[2]}")
    return 0 if not (tally.vmm_deaths or tally.vmm_troubles or tally.host_values or tally.unexplained) else 1


if __name__ == "__main__":
    raise SystemExit(main())
