"""Every instruction form iced-x86 knows for the AVX era, the machine's CPU against a guest.

For each form (an iced ``Code``) of AVX, AVX2, FMA, F16C, BMI1/2, SHA, AES and PCLMULQDQ
in VEX, VAES, VPCLMULQDQ, GFNI and AVX-512 (F, BW, DQ, VL, CD, VBMI, VBMI2, IFMA, VNNI,
BITALG, VPOPCNTDQ): one instance with register operands and one with a memory operand
where the form has either, random registers (opmask, zeroing, broadcast, rounding
where the form takes them), run once natively and once as a guest instruction on the
first built-in profile that has the form. Each form is a block: load a register file,
run the instruction, store it back; a group of forms is one guest and one native
function. Registers, arithmetic flags (those the SDM defines), MXCSR and memory must
come out identical. Forms the machine or every profile lacks are skipped, saying so.
"""

import ctypes
import functools
import mmap
import random
import struct

import iced_x86 as iced
import pytest
from iced_x86 import Code, Decoder, EncodingKind, Encoder, Instruction, MemoryOperand, OpCodeInfo, Register, RoundingControl

from minivmm.cpu import isa
from minivmm.cpu.native import machine_features
from minivmm.cpu.profiles import builtin_profiles
from minivmm.guests.loader import GuestImage
from minivmm.vmm.vm import VM

KIND = {v: k for k, v in vars(iced.OpCodeOperandKind).items() if k.isupper()}
# The register file: vector i at 64*i (32 bytes of it without AVX-512), K0-7, the
# general registers the forms may name, RFLAGS, MXCSR.
GPR = ("RAX", "RBX", "RCX", "RDX", "RDI", "RBP", "R8", "R9", "R10", "R11", "R12", "R13", "R14")
VECTORS, OPMASKS, GPRS_AT = 0, 2048, 2112
FLAGS_AT, MXCSR_AT = GPRS_AT + 8 * len(GPR), GPRS_AT + 8 * len(GPR) + 8
REGFILE, BUFFER = 2240, 3072                 # bytes per form: the register file, its memory (an XSAVE area)
CODE, REGS, BUFFERS, RAM = 0x100000, 0x800000, 0x1000000, "64M"
ARITHMETIC = 0x8D5                           # CF PF AF ZF SF OF
INDEX_MASKS = 0x7FF000                       # guest: a VSIB index is ANDed with these (0..63)
FEATURES = {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "sha_ni", "aes", "pclmulqdq", "vaes", "vpclmulqdq", "gfni"}
AVX512 = "avx512"


def _wanted(needs: frozenset[str]) -> bool:
    return bool(needs) and all(n in FEATURES or n.startswith(AVX512) for n in needs)


@functools.cache
def forms() -> dict[str, list[int]]:
    """iced Codes by the features they need ("avx512f,avx512vl"), VEX/EVEX and the
    legacy SHA and GFNI forms, in 64-bit mode."""
    groups: dict[str, list[int]] = {}
    for name, code in vars(Code).items():
        if not name.isupper() or code == Code.INVALID:
            continue
        info = OpCodeInfo(code)
        if not info.mode64 or info.encoding not in (EncodingKind.LEGACY, EncodingKind.VEX, EncodingKind.EVEX):
            continue
        needs = isa.needed_features(Instruction.create(code))
        if info.encoding == EncodingKind.LEGACY and not needs & {"sha_ni", "gfni"} or not _wanted(needs):
            continue
        groups.setdefault(",".join(sorted(needs)), []).append(code)
    return groups


def host_for(needs: set[str]) -> str | None:
    return next((p.name for p in builtin_profiles() if needs <= p.physical), None)


# ---- one instance of a form ---------------------------------------------------------

def _register(kind: str, number: int) -> int:
    prefix = kind.split("_")[0]
    return {"XMM": Register.XMM0, "YMM": Register.YMM0, "ZMM": Register.ZMM0, "K": Register.K0,
            "R32": Register.EAX, "R64": Register.RAX, "R16": Register.AX}[prefix] + number


GPR_NUMBERS = [("RAX RCX RDX RBX RSP RBP RSI RDI R8 R9 R10 R11 R12 R13 R14 R15".split()).index(r) for r in GPR]


def instance(code: int, memory: bool, rng: random.Random) -> tuple[bytes, dict] | None:
    """A random encoding of ``code``: its bytes and what the block must arrange
    (``vsib``: the index register and its width; ``rdi``: the implicit [rdi];
    ``mxcsr``: the displacement of a VLDMXCSR operand). None when the form has no
    operand of that kind (``memory`` asks for one)."""
    info = OpCodeInfo(code)
    evex = info.encoding == EncodingKind.EVEX
    kinds = [KIND[info.op_kind(i)] for i in range(info.op_count)]
    optional = any(k.endswith("_OR_MEM") for k in kinds)
    mandatory = any(k == "MEM" or k.startswith("MEM_VSIB") for k in kinds)
    if (memory and not optional and not mandatory) or (not memory and mandatory):
        return None
    vectors = list(range(32 if evex else 16))
    rng.shuffle(vectors)  # distinct vector registers: gathers demand it, the rest do not mind
    displacement = 64 * rng.randrange(0, 5)
    operands, pattern, arrange = [], [], {}
    for kind in kinds:
        if kind in ("MEM",) or kind.endswith("_OR_MEM") and memory:
            operands.append(MemoryOperand(Register.RSI, displ=displacement, displ_size=1 if displacement else 0,
                                          is_broadcast=bool(evex and info.can_broadcast and rng.random() < 0.3)))
            pattern.append("mem")
            if code in (Code.VEX_VLDMXCSR_M32,):
                arrange["mxcsr"] = displacement
        elif kind.startswith("MEM_VSIB"):
            width, vector = (4 if "32" in kind else 8), {"X": Register.XMM0, "Y": Register.YMM0, "Z": Register.ZMM0}[kind[-1]]
            index = vector + vectors.pop()
            operands.append(MemoryOperand(Register.RSI, index, rng.choice((1, 2, 4, 8)), displacement,
                                          1 if displacement else 0))
            pattern.append("mem")
            arrange["vsib"] = (index, width)
        elif kind == "SEG_RDI":
            arrange["rdi"] = True
        elif kind == "IMM8":
            operands.append(rng.randrange(256))
            pattern.append("u32")
        elif kind.startswith(("XMM", "YMM", "ZMM")):
            number = vectors.pop() if not kind.endswith("IS4") else vectors.pop() % 16
            operands.append(_register(kind, number))
            pattern.append("reg")
        elif kind.startswith("K"):
            operands.append(_register(kind, rng.randrange(8)))
            pattern.append("reg")
        elif kind.startswith(("R32", "R64", "R16")):
            operands.append(_register(kind, rng.choice(GPR_NUMBERS)))
            pattern.append("reg")
        else:
            raise AssertionError(f"{code}: operand kind {kind} has no generator")
    if "rdi" in arrange and len(pattern) == 2:
        instr = Instruction.create_vmaskmovdqu(64, *operands)
    else:
        instr = getattr(Instruction, "create_" + "_".join(pattern) if pattern else "create")(code, *operands)
    if evex:
        if info.can_use_op_mask_register and (info.require_op_mask_register or rng.random() < 0.6):
            instr.op_mask = Register.K1 + rng.randrange(7)
            instr.zeroing_masking = info.can_use_zeroing_masking and instr.op0_kind == iced.OpKind.REGISTER \
                and rng.random() < 0.5
        if not memory and info.can_use_rounding_control and rng.random() < 0.5:
            instr.rounding_control = rng.choice((RoundingControl.ROUND_TO_NEAREST, RoundingControl.ROUND_DOWN,
                                                 RoundingControl.ROUND_UP, RoundingControl.ROUND_TOWARD_ZERO))
        elif not memory and info.can_suppress_all_exceptions and rng.random() < 0.5:
            instr.suppress_all_exceptions = True
    encoder = Encoder(64)
    encoder.encode(instr, 0)
    data = encoder.take_buffer()
    decoded = Decoder(64, data).decode()
    assert decoded.code == code and decoded.len == len(data), f"{code}: encoded as {decoded.code}"
    return data, arrange


# ---- blocks -----------------------------------------------------------------------------

def _encode(instructions) -> bytes:
    encoder = Encoder(64)
    for instr in instructions:
        encoder.encode(instr, 0)
    return encoder.take_buffer()


def _mem(displ: int, base=Register.R15) -> MemoryOperand:
    return MemoryOperand(base, displ=displ, displ_size=8)


@functools.cache
def _moves(wide: bool) -> tuple[bytes, bytes]:
    """Loading and storing the register file at r15 (all but RSI, RSP, R15)."""
    create, C = Instruction, Code
    if wide:
        vectors = [(Register.ZMM0 + i, _mem(VECTORS + 64 * i)) for i in range(32)]
        load = [create.create_reg_mem(C.EVEX_VMOVDQU64_ZMM_K1Z_ZMMM512, r, m) for r, m in vectors]
        store = [create.create_mem_reg(C.EVEX_VMOVDQU64_ZMMM512_K1Z_ZMM, m, r) for r, m in vectors]
        masks = [(Register.K0 + i, _mem(OPMASKS + 8 * i)) for i in range(8)]
        load += [create.create_reg_mem(C.VEX_KMOVQ_KR_KM64, r, m) for r, m in masks]
        store += [create.create_mem_reg(C.VEX_KMOVQ_M64_KR, m, r) for r, m in masks]
    else:
        vectors = [(Register.YMM0 + i, _mem(VECTORS + 64 * i)) for i in range(16)]
        load = [create.create_reg_mem(C.VEX_VMOVDQU_YMM_YMMM256, r, m) for r, m in vectors]
        store = [create.create_mem_reg(C.VEX_VMOVDQU_YMMM256_YMM, m, r) for r, m in vectors]
    gprs = [(getattr(Register, r), _mem(GPRS_AT + 8 * k)) for k, r in enumerate(GPR)]
    load += [create.create_reg_mem(C.MOV_R64_RM64, r, m) for r, m in gprs]
    load += [create.create_mem(C.PUSH_RM64, _mem(FLAGS_AT)), create.create(C.POPFQ),
             create.create_mem(C.LDMXCSR_M32, _mem(MXCSR_AT))]
    stored = [create.create(C.PUSHFQ), create.create_mem(C.POP_RM64, _mem(FLAGS_AT)),
              create.create_mem(C.STMXCSR_M32, _mem(MXCSR_AT))]
    stored += store + [create.create_mem_reg(C.MOV_RM64_R64, m, r) for r, m in gprs]
    return _encode(load), _encode(stored)


def block(body: bytes, arrange: dict, regfile: int, buffer: int, masks: int, wide: bool) -> bytes:
    load, store = _moves(wide)
    pre = [Instruction.create_reg_u64(Code.MOV_R64_IMM64, Register.R15, regfile),
           Instruction.create_reg_u64(Code.MOV_R64_IMM64, Register.RSI, buffer)]
    fix = []
    if "rdi" in arrange:
        fix.append(Instruction.create_reg_reg(Code.MOV_R64_RM64, Register.RDI, Register.RSI))
    if "vsib" in arrange:  # indices 0..63: every element inside the buffer
        index, width = arrange["vsib"]
        at = masks + (0 if width == 4 else 64)
        fix.append(Instruction.create_reg_u64(Code.MOV_R64_IMM64, Register.R15, at))
        if Register.ZMM0 <= index <= Register.ZMM31 or Register.XMM16 <= index <= Register.XMM31 \
                or Register.YMM16 <= index <= Register.YMM31:
            size = {Register.ZMM0: Code.EVEX_VPANDQ_ZMM_K1Z_ZMM_ZMMM512B64, Register.YMM0: Code.EVEX_VPANDQ_YMM_K1Z_YMM_YMMM256B64,
                    Register.XMM0: Code.EVEX_VPANDQ_XMM_K1Z_XMM_XMMM128B64}
            first = max(r for r in size if r <= index)
            fix.append(Instruction.create_reg_reg_mem(size[first], index, index, _mem(0)))
        else:
            code = Code.VEX_VPAND_YMM_YMM_YMMM256 if index >= Register.YMM0 else Code.VEX_VPAND_XMM_XMM_XMMM128
            fix.append(Instruction.create_reg_reg_mem(code, index, index, _mem(0)))
        fix.append(Instruction.create_reg_u64(Code.MOV_R64_IMM64, Register.R15, regfile))
    after = [Instruction.create_reg_mem(Code.MOV_R64_RM64, Register.RDI, _mem(GPRS_AT + 8 * GPR.index("RDI")))] \
        if "rdi" in arrange else []  # the buffer's address differs between guest and machine
    return _encode(pre) + load + _encode(fix) + body + _encode(after) + store


def index_masks() -> bytes:
    return struct.pack("<I", 63) * 16 + struct.pack("<Q", 63) * 8


def random_regfile(rng: random.Random) -> bytearray:
    regs = bytearray(rng.randbytes(REGFILE))
    struct.pack_into("<Q", regs, GPRS_AT + 8 * GPR.index("RCX"), rng.randrange(64))   # a count, a shift
    struct.pack_into("<Q", regs, FLAGS_AT, rng.getrandbits(64) & ARITHMETIC | 0x2)
    # every exception masked; random rounding, DAZ, FTZ and sticky flags
    struct.pack_into("<Q", regs, MXCSR_AT, 0x1F80 | rng.getrandbits(16) & 0xE07F)
    return regs


# ---- one group: a guest and a native function ----------------------------------------------

def build(codes: list[int], seed: str, wide: bool) -> list[tuple[str, bytes, dict, bytes, bytes]]:
    """(name, instruction bytes, arrangement, register file, buffer) per instance."""
    rng, cases = random.Random(seed), []
    names = {v: k for k, v in vars(Code).items() if k.isupper()}
    for code in codes:
        for memory in (False, True):
            made = instance(code, memory, rng)
            if made is None:
                continue
            body, arrange = made
            regs, buffer = random_regfile(rng), bytearray(rng.randbytes(BUFFER))
            if "mxcsr" in arrange:
                struct.pack_into("<I", buffer, arrange["mxcsr"], 0x1F80 | rng.getrandbits(16) & 0xE07F)
            cases.append((names[code] + (" (memory)" if memory else ""), body, arrange, bytes(regs), bytes(buffer)))
    return cases


def guest_result(cases, host: str, wide: bool) -> bytes:
    # the OS's part: XCR0 enables the YMM (and ZMM, opmask) state
    enable = bytes.fromhex("31c9" "0f01d0" "0d" + ("e7" if wide else "07") + "000000" "0f01d1")
    code = enable + b"".join(block(body, arrange, REGS + k * REGFILE, BUFFERS + k * BUFFER, INDEX_MASKS, wide)
                             for k, (_, body, arrange, _, _) in enumerate(cases)) + bytes.fromhex("31c0e6f4")
    regions = [(CODE, code), (INDEX_MASKS, index_masks()), (REGS, b"".join(c[3] for c in cases)),
               (BUFFERS, b"".join(c[4] for c in cases))]
    assert CODE + len(code) < INDEX_MASKS and REGS + len(cases) * REGFILE <= BUFFERS
    result = VM(GuestImage("forms", "asm", tuple(regions), CODE), host, memory=RAM).run(timeout=600)
    assert result.stop.reason == "exited", f"on {host}: {result.stop.message}"
    ram = result.ram
    return bytes(ram[REGS:REGS + len(cases) * REGFILE]) + bytes(ram[BUFFERS:BUFFERS + len(cases) * BUFFER])


def native_result(cases, wide: bool) -> bytes:
    size = BUFFERS - REGS + len(cases) * BUFFER
    data = mmap.mmap(-1, size + 4096)
    base = ctypes.addressof(ctypes.c_char.from_buffer(data))
    host = lambda guest: base + guest - REGS  # noqa: E731
    masks = ctypes.create_string_buffer(index_masks())
    for k, (_, _, _, regs, buffer) in enumerate(cases):
        data[REGS - REGS + k * REGFILE:REGS - REGS + (k + 1) * REGFILE] = regs
        data[BUFFERS - REGS + k * BUFFER:BUFFERS - REGS + (k + 1) * BUFFER] = buffer
    save = bytes.fromhex("53 55 4154 4155 4156 4157 4883ec08 0fae1c24")     # push callee-saved; stmxcsr [rsp]
    restore = bytes.fromhex("0fae1424 4883c408 415f 415e 415d 415c 5d 5b c5f877 fc c3")
    code = save + b"".join(block(body, arrange, host(REGS + k * REGFILE), host(BUFFERS + k * BUFFER),
                                 ctypes.addressof(masks), wide)
                           for k, (_, body, arrange, _, _) in enumerate(cases)) + restore
    page = mmap.mmap(-1, len(code) + 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    ctypes.CFUNCTYPE(None)(ctypes.addressof(ctypes.c_char.from_buffer(page)))()
    return bytes(data[0:len(cases) * REGFILE]) + bytes(data[BUFFERS - REGS:BUFFERS - REGS + len(cases) * BUFFER])


def differences(cases, guest: bytes, native: bytes, wide: bool) -> list[str]:
    found, vector = [], 64 if wide else 32
    for k, (name, body, *_rest) in enumerate(cases):
        g, n = (r[k * REGFILE:(k + 1) * REGFILE] for r in (guest, native))
        at = len(cases) * REGFILE + k * BUFFER
        instr = Decoder(64, body).decode()
        defined = ARITHMETIC & ~_undefined(instr)
        parts = {"vector registers": all(g[64 * i:64 * i + vector] == n[64 * i:64 * i + vector]
                                         for i in range(32 if wide else 16)),
                 "opmask registers": not wide or g[OPMASKS:GPRS_AT] == n[OPMASKS:GPRS_AT],
                 "general registers": g[GPRS_AT:FLAGS_AT] == n[GPRS_AT:FLAGS_AT],
                 "flags": struct.unpack_from("<Q", g, FLAGS_AT)[0] & defined == struct.unpack_from("<Q", n, FLAGS_AT)[0] & defined,
                 "MXCSR": g[MXCSR_AT:MXCSR_AT + 4] == n[MXCSR_AT:MXCSR_AT + 4],
                 "memory": guest[at:at + BUFFER] == native[at:at + BUFFER]}
        wrong = [what for what, same in parts.items() if not same]
        if wrong:
            found.append(f"{name} ({instr}): {', '.join(wrong)} differ")
    return found


def _undefined(instr) -> int:
    bits = {iced.RflagsBits.OF: 0x800, iced.RflagsBits.SF: 0x80, iced.RflagsBits.ZF: 0x40, iced.RflagsBits.AF: 0x10,
            iced.RflagsBits.CF: 0x1, iced.RflagsBits.PF: 0x4}
    return sum(flag for bit, flag in bits.items() if instr.rflags_undefined & bit)


def run_group(needs: str, seed: str = "forms"):
    features = set(needs.split(","))
    lacking = sorted(features - machine_features())
    if lacking:
        pytest.skip(f"this machine has no {', '.join(lacking)}: these forms cannot be compared")
    host = host_for(features)
    if host is None:
        pytest.skip(f"no built-in profile has {needs}")
    wide = "avx512f" in machine_features() and "avx512f" in next(p for p in builtin_profiles() if p.name == host).physical
    cases = build(forms()[needs], f"{seed}/{needs}", wide)
    return cases, host, wide


@pytest.mark.parametrize("needs", sorted(forms()))
def test_every_form_computes_on_the_guest_what_it_computes_on_the_machine(needs):
    cases, host, wide = run_group(needs)
    found = differences(cases, guest_result(cases, host, wide), native_result(cases, wide), wide)
    assert not found, f"{len(found)} of {len(cases)} forms on {host} differ:\n" + "\n".join(found[:40])


def test_the_comparison_catches_a_wrong_result_negative_control():
    """The guest computes one thing, the machine another (vaddps against vsubps): the
    comparison above names the form and what differs."""
    cases, host, wide = run_group("avx")
    add = next(c for c in cases if c[0] == "VEX_VADDPS_YMM_YMM_YMMM256")
    sub = next(c for c in cases if c[0] == "VEX_VSUBPS_YMM_YMM_YMMM256")
    native_cases = [(add[0], sub[1], sub[2], add[3], add[4])]
    found = differences([add], guest_result([add], host, wide), native_result(native_cases, wide), wide)
    assert len(found) == 1 and "vector registers differ" in found[0] and "VEX_VADDPS" in found[0]


def test_the_forms_cover_what_the_issue_names():
    """Not a sample: every group is there, with every form iced knows in it."""
    groups = forms()
    for needs in ("avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "sha_ni", "vaes", "vpclmulqdq", "gfni", "avx512f",
                  "avx512bw", "avx512dq", "avx512f,avx512vl"):
        assert needs in groups, needs
    assert len(groups["avx"]) > 300 and len(groups["avx512f"]) > 300


def _xsave_offsets(table, rfbm: int, compacted: bool) -> dict[int, tuple[int, int]]:
    """Component -> (offset, size) in an area, from a CPUID table's leaf 0xD."""
    from minivmm.cpu import xstate
    layout = xstate.layout(lambda leaf, sub: table.query(leaf, sub))
    offsets = xstate.compacted_offsets(layout, rfbm) if compacted else \
        {i: layout[i][0] for i in layout if rfbm >> i & 1}
    return {i: (at, layout[i][1]) for i, at in offsets.items()}


# ---- the XSAVE family against the machine ----------------------------------------------
#
# Two correct processors can write different images of the same state. A save sets
# XSTATE_BV[i] to XINUSE[i] for each component i of RFBM (SDM Vol. 1, 13.7 XSAVE, 13.9
# XSAVEOPT, 13.10 XSAVEC), and XINUSE[i] may be 1 while component i is in its initial
# configuration (13.6): a Sapphire Rapids Xeon keeps x87 in use after FNINIT, minivmm
# derives XINUSE from the content. XRSTOR reads a clear bit as the initial configuration (13.8), so
# what an image says of component i is its bytes where the bit is set and the initial
# configuration where it is clear, and that must be the same in both images: a bit may
# differ only where the component is in its initial configuration in both. Which bytes a
# clear bit leaves is the form's rule: XSAVE writes every component of RFBM whatever its
# bit (13.7); XSAVEOPT and XSAVEC write component i only when XSTATE_BV[i] = 1 (13.9,
# 13.10), so with the bit clear the area keeps what it held. XSAVEOPT's modified
# optimization (13.6, 13.9) does not arise here: it skips only a component unmodified
# since an XRSTOR from the same area, and the block writes every component (FLDZ,
# FNINIT, the register file's loads) after any XRSTOR.

COMPACTED = 1 << 63
MXCSR_INIT = 0x1F80
MXCSR_FIELD, XMM_FIELD = (24, 28), (160, 416)
# x87's fields in the format without REX.W (13.5.1): FCW, FSW, the abridged FTW; FOP,
# FIP[31:0], FCS; FDP[31:0], FDS; ST0-7 (80 bits each). The bytes between them are
# reserved or unused: the SDM says nothing of what a save writes there.
X87_FIELDS = ((0, 5), (6, 14), (16, 22)) + tuple((32 + 16 * k, 42 + 16 * k) for k in range(8))
WHO = ("minivmm", "the machine")


def _fields(i: int, form: str, offsets: dict[int, tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Where component ``i`` lies in an area. XSAVEC saves MXCSR with the XMM registers
    or not at all (Vol. 2, XSAVEC: SSE state is saved if RFBM[1] = 1 and (XINUSE[1] = 1
    or MXCSR != 1F80H)); the standard forms save it whenever RFBM[1] or RFBM[2] is set,
    whatever XINUSE says (13.7, 13.9), so it is no part of their SSE component here."""
    if i == 0:
        return X87_FIELDS
    if i == 1:
        return (MXCSR_FIELD, XMM_FIELD) if form == "xsavec" else (XMM_FIELD,)
    at, size = offsets[i]
    return ((at, at + size),)


def _initial(i: int, form: str, fields) -> bytes:
    """Component ``i``'s initial configuration (13.6) in its fields: x87 with FCW 037FH
    and everything else zero (every tag empty, abridged 0); SSE with zero XMM registers
    (and MXCSR 1F80H where it belongs to the component: a compacted XRSTOR initializes
    it so, 13.8.2); every other component all zero."""
    size = sum(end - start for start, end in fields)
    if i == 0:
        return struct.pack("<H", 0x37F) + bytes(size - 2)
    if i == 1 and form == "xsavec":
        return struct.pack("<I", MXCSR_INIT) + bytes(size - 4)
    return bytes(size)


def xsave_violations(form: str, rfbm: int, prior: bytes, images, offsets, must_set: int, mxcsr: int) -> list[str]:
    """Where two images of one save of the same state (minivmm's, the machine's; each
    component at its own CPUID's ``offsets``), made by FORM into an area that held
    ``prior`` (header zero), differ beyond what the SDM leaves to the processor (the
    rules above). ``must_set``: the components whose bits the state forces (not in
    their initial configuration, or XSAVEC's SSE with MXCSR != 1F80H); ``mxcsr``: the
    MXCSR saved."""
    found = []
    headers = [struct.unpack_from("<QQ", image, 512) for image in images]
    xcomp_bv = COMPACTED | rfbm if form == "xsavec" else 0   # XSAVE and XSAVEOPT leave XCOMP_BV (13.7, 13.9)
    for who, image, (xstate_bv, xcomp) in zip(WHO, images, headers):
        if xcomp != xcomp_bv:
            found.append(f"{who}: XCOMP_BV {xcomp:#x}, not {xcomp_bv:#x}")
        if xstate_bv & ~rfbm:   # the standard forms keep these bits (zero before), XSAVEC clears them
            found.append(f"{who}: XSTATE_BV {xstate_bv:#x} has bits outside RFBM {rfbm:#x}")
        if must_set & ~xstate_bv:
            found.append(f"{who}: XSTATE_BV {xstate_bv:#x} clears {must_set & ~xstate_bv:#x}, whose state is in use")
        if form != "xsavec" and image[slice(*MXCSR_FIELD)] != struct.pack("<I", mxcsr):
            found.append(f"{who}: MXCSR not saved ({image[slice(*MXCSR_FIELD)].hex()}, not {mxcsr:#x})")
    for i in sorted({0, 1} | set(offsets[0]) | set(offsets[1])):
        if not rfbm >> i & 1:
            continue
        said = []
        for who, image, (xstate_bv, _), where in zip(WHO, images, headers, offsets):
            fields = _fields(i, form, where)
            data, held = (b"".join(area[start:end] for start, end in fields) for area in (image, prior))
            initial = _initial(i, form, fields)
            said.append(data if xstate_bv >> i & 1 else initial)
            if xstate_bv >> i & 1:
                continue
            if form == "xsave" and data != initial:
                found.append(f"{who}: component {i} (XSTATE_BV[{i}] = 0) saved as {data[:16].hex()}..., not in its "
                             f"initial configuration, though XSAVE writes every component of RFBM")
            elif form != "xsave" and data != held:
                found.append(f"{who}: component {i} written though XSTATE_BV[{i}] = 0 ({form} writes only "
                             f"components whose bit it sets)")
        if said[0] != said[1]:
            bits = [xstate_bv >> i & 1 for xstate_bv, _ in headers]
            found.append(f"component {i} differs (XSTATE_BV[{i}]: minivmm {bits[0]}, the machine {bits[1]})")
    return found


SAVES = [(form, host) for host in ("haswell", "skylake-client", "epyc", "skylake-server")
         for form in ("xsave", "xsaveopt", "xsavec") if not (form == "xsavec" and host == "haswell")]
X87_INITIAL = "fninit; " + "fldz; " * 8 + "fninit; "   # every data register zero, FCW 037FH, tags empty
MXCSR_CLOBBER = BUFFER - 4                             # where the area's neighbour holds MXCSR 1F80H


def _xsave_setup(form: str, host: str, initial: bool):
    """FORM on HOST: (the case, rfbm, the loaded register file, the area's prior bytes,
    minivmm's and the machine's offsets, wide); skipped where the machine or the host
    lacks FORM. The state: x87 in its initial configuration; SSE, AVX (and the AVX-512
    components on an AVX-512 host) random, or with ``initial`` zero; MXCSR never 1F80H
    (FTZ set). The area holds random bytes (header zero) before the save."""
    from keystone import KS_ARCH_X86, KS_MODE_64, Ks

    from minivmm.cpu.profiles import load_profile
    profile = load_profile(host)
    wide = "avx512f" in profile.physical
    needs = {"xsave", form} | ({"avx512f"} if wide else set())
    if not needs <= machine_features() or form not in profile.physical:
        pytest.skip(f"this machine or {host} lacks {', '.join(sorted(needs - machine_features())) or form}")
    rfbm = 0xE7 if wide else 0x7
    ks = Ks(KS_ARCH_X86, KS_MODE_64)
    clobber = _encode([Instruction.create_reg_reg_reg_u32(Code.EVEX_VPTERNLOGD_ZMM_K1Z_ZMM_ZMMM512B32_IMM8,
                                                          Register.ZMM17, Register.ZMM17, Register.ZMM17, 0xFF),
                       Instruction.create_reg_reg_reg(Code.VEX_KXNORQ_KR_KR_KR, Register.K3, Register.K3, Register.K3)]
                      ) if wide else b""
    body = bytes(ks.asm(f"{X87_INITIAL}mov eax, {rfbm}; xor edx, edx; {form} [rsi]; vpxor ymm1, ymm1, ymm1; "
                        f"vpcmpeqd ymm2, ymm2, ymm2; ldmxcsr [rsi + {MXCSR_CLOBBER}]")[0]) + clobber \
        + bytes(ks.asm("xrstor [rsi]")[0])
    rng = random.Random(f"{form}/{host}" + ("/initial" if initial else ""))
    regs = random_regfile(rng)
    struct.pack_into("<Q", regs, FLAGS_AT, 0x2)
    struct.pack_into("<Q", regs, MXCSR_AT, struct.unpack_from("<Q", regs, MXCSR_AT)[0] | 0x8000)
    if initial:
        regs[VECTORS:GPRS_AT] = bytes(GPRS_AT - VECTORS)   # vector and opmask registers zero
    prior = bytearray(rng.randbytes(BUFFER))
    prior[512:576] = bytes(64)                             # XRSTOR faults on a header with reserved bits set
    struct.pack_into("<I", prior, MXCSR_CLOBBER, MXCSR_INIT)
    offsets = [_xsave_offsets(table, rfbm, form == "xsavec") for table in (profile.cpuid, load_profile("native").cpuid)]
    assert all(at + size <= MXCSR_CLOBBER for where in offsets for at, size in where.values())
    return (form, body, {}, bytes(regs), bytes(prior)), rfbm, bytes(regs), bytes(prior), offsets, wide


def _in_use(regs: bytes, rfbm: int, form: str) -> int:
    """The components of RFBM the register file puts out of their initial configuration
    (13.6: XINUSE[i] is 1 for those), and SSE for XSAVEC where MXCSR is not 1F80H."""
    vectors = [regs[64 * i:64 * i + 64] for i in range(32)]
    nonzero = lambda parts: any(b"".join(parts))  # noqa: E731
    held = {1: nonzero(v[:16] for v in vectors[:16]), 2: nonzero(v[16:32] for v in vectors[:16]),
            5: any(regs[OPMASKS:GPRS_AT]), 6: nonzero(v[32:] for v in vectors[:16]), 7: nonzero(vectors[16:])}
    mxcsr = struct.unpack_from("<I", regs, MXCSR_AT)[0]
    held[1] |= form == "xsavec" and mxcsr != MXCSR_INIT
    return sum(1 << i for i, used in held.items() if used and rfbm >> i & 1)


def _xsave_compared(form: str, host: str, initial: bool) -> None:
    case, rfbm, regs, prior, offsets, wide = _xsave_setup(form, host, initial)
    guest, native = guest_result([case], host, wide), native_result([case], wide)
    vector = 64 if wide else 32
    assert all(guest[64 * i:64 * i + vector] == native[64 * i:64 * i + vector] == regs[64 * i:64 * i + vector]
               for i in range(32 if wide else 16)), "registers not restored as saved"
    assert not wide or guest[OPMASKS:GPRS_AT] == native[OPMASKS:GPRS_AT] == regs[OPMASKS:GPRS_AT]
    assert guest[MXCSR_AT:MXCSR_AT + 4] == native[MXCSR_AT:MXCSR_AT + 4] == regs[MXCSR_AT:MXCSR_AT + 4], \
        "MXCSR not restored as saved"
    images = [r[REGFILE:REGFILE + BUFFER] for r in (guest, native)]
    found = xsave_violations(form, rfbm, prior, images, offsets, _in_use(regs, rfbm, form),
                             struct.unpack_from("<I", regs, MXCSR_AT)[0])
    assert not found, f"{form} on {host}:\n" + "\n".join(found)


@pytest.mark.parametrize("form, host", SAVES, ids=[f"{f}-{h}" for f, h in SAVES])
def test_the_xsave_family_saves_and_restores_what_the_machine_does(form, host):
    """x87 in its initial configuration, SSE, AVX (and the opmask and ZMM components on
    an AVX-512 host) holding random values, saved by FORM into an area of random bytes,
    the registers and MXCSR clobbered, XRSTOR: the registers and MXCSR come back as
    loaded, and minivmm's image says what the machine's does of every component, each
    where the host's CPUID leaf 0xD puts it (the machine's own leaf for its run: AMD and
    Intel lay AVX-512 state out differently), compared by the SDM's rules
    (xsave_violations): the components in use must have their XSTATE_BV bits set (Vol. 1,
    13.6) and the same bytes; x87's bit is the processor's choice (13.6: XINUSE[0] may be
    1 for x87 in its initial configuration, as a Sapphire Rapids keeps it after FNINIT), and
    where it is clear XSAVE still writes x87's initial configuration (13.7) while
    XSAVEOPT and XSAVEC leave the area's bytes (13.9, 13.10). The engine's own XSAVE,
    XSAVEOPT and XRSTOR would lose YMM's upper halves."""
    _xsave_compared(form, host, initial=False)


@pytest.mark.parametrize("form, host", SAVES, ids=[f"{f}-{h}" for f, h in SAVES])
def test_the_xsave_family_saves_components_in_their_initial_configuration_as_the_sdm_allows(form, host):
    """Every component in its initial configuration (x87 after FLDZ and FNINIT; the XMM,
    YMM, ZMM and opmask registers zero), MXCSR not 1F80H: each XSTATE_BV bit is the
    processor's choice (SDM Vol. 1, 13.6), except XSAVEC's SSE bit, which MXCSR != 1F80H
    sets (Vol. 2, XSAVEC, Operation: SSE state is saved, MXCSR with it, if RFBM[1] = 1 and
    (XINUSE[1] = 1 or MXCSR != 1F80H)); a component with its bit clear is written in its
    initial configuration by XSAVE (13.7) and not written by XSAVEOPT and XSAVEC (13.9,
    13.10); the standard forms save MXCSR whatever XINUSE says (13.7, 13.9); XRSTOR
    brings back the same registers and MXCSR (13.8)."""
    _xsave_compared(form, host, initial=True)


@pytest.mark.parametrize("compacted", [False, True], ids=["standard", "compacted"])
def test_xrstor_takes_mxcsr_from_the_area_as_its_form_says(compacted):
    """XRSTOR (RFBM x87, SSE, AVX) of an area whose XSTATE_BV is clear and whose MXCSR
    field holds 3F80H: the standard form loads MXCSR from the area whenever RFBM[1] or
    RFBM[2] is set, the compacted form initializes SSE state, MXCSR 1F80H with it (SDM
    Vol. 1, 13.8.1, 13.8.2; Vol. 2, XRSTOR, Operation); the XMM registers and YMM's upper
    halves come out zero either way, as the machine's."""
    from keystone import KS_ARCH_X86, KS_MODE_64, Ks
    host, needs = "skylake-client", {"xsave", "xsavec"} if compacted else {"xsave"}
    if not needs <= machine_features():
        pytest.skip(f"this machine lacks {', '.join(sorted(needs - machine_features()))}")
    rng = random.Random(f"xrstor-mxcsr/{compacted}")
    regs = random_regfile(rng)
    struct.pack_into("<Q", regs, FLAGS_AT, 0x2)
    area = bytearray(rng.randbytes(BUFFER))
    area[512:576] = struct.pack("<QQ", 0, COMPACTED | 0x7 if compacted else 0) + bytes(48)
    struct.pack_into("<I", area, MXCSR_FIELD[0], 0x3F80)
    body = bytes(Ks(KS_ARCH_X86, KS_MODE_64).asm("mov eax, 7; xor edx, edx; xrstor [rsi]")[0])
    case = ("xrstor", body, {}, bytes(regs), bytes(area))
    guest, native = guest_result([case], host, False), native_result([case], False)
    assert all(guest[64 * i:64 * i + 32] == native[64 * i:64 * i + 32] == bytes(32) for i in range(16))
    mxcsr = [struct.unpack_from("<I", r, MXCSR_AT)[0] for r in (guest, native)]
    assert mxcsr == [MXCSR_INIT if compacted else 0x3F80] * 2, \
        f"MXCSR: minivmm {mxcsr[0]:#x}, the machine {mxcsr[1]:#x}"


def test_negative_control_the_engines_own_xsave_loses_ymm(monkeypatch):
    """With XSAVE and XRSTOR left to the engine, the comparison above fails."""
    from iced_x86 import Mnemonic

    from minivmm.cpu import isa
    own = (Mnemonic.XSAVE, Mnemonic.XSAVE64, Mnemonic.XRSTOR, Mnemonic.XRSTOR64)
    monkeypatch.setattr(isa, "ENGINE_WRONG", {k: v for k, v in isa.ENGINE_WRONG.items() if k not in own})
    with pytest.raises(AssertionError, match="registers not restored"):
        test_the_xsave_family_saves_and_restores_what_the_machine_does("xsave", "haswell")


def test_negative_control_the_xsave_comparison_refuses_what_the_sdm_does_not_allow():
    """The machine's own images of XSAVE and XSAVEOPT (x87 in its initial configuration,
    SSE and AVX in use), changed as a wrong save would write them and compared with the
    originals: a clear bit of a component in use, bytes that differ, a clear bit whose
    XSAVE component is not its initial configuration, a clear bit whose XSAVEOPT
    component was written, are each refused; x87's bit cleared as the SDM allows is not."""
    def image(form):
        case, rfbm, regs, prior, offsets, _ = _xsave_setup(form, "haswell", initial=False)
        native = native_result([case], False)[REGFILE:REGFILE + BUFFER]
        check = lambda mine: xsave_violations(form, rfbm, prior, [bytes(mine), native], [offsets[1]] * 2,  # noqa: E731
                                              _in_use(regs, rfbm, form), struct.unpack_from("<I", regs, MXCSR_AT)[0])
        return bytearray(native), prior, check

    def changed(area, at, data):
        area = bytearray(area)
        area[at:at + len(data)] = data
        return area

    native, prior, check = image("xsave")
    xstate_bv = struct.unpack_from("<Q", native, 512)[0]
    assert xstate_bv & 6 == 6 and not check(native)
    assert any("clears 0x4" in f for f in check(changed(native, 512, struct.pack("<Q", xstate_bv & ~4))))
    assert check(changed(native, 200, bytes([native[200] ^ 1]))) == [
        "component 1 differs (XSTATE_BV[1]: minivmm 1, the machine 1)"]
    x87_clear = changed(native, 512, struct.pack("<Q", xstate_bv & ~1))
    assert not check(x87_clear)                                       # x87's bit is the processor's choice
    assert any("not in its initial configuration" in f for f in check(changed(x87_clear, 0, b"\x7f\x02")))
    native, prior, check = image("xsaveopt")
    xstate_bv = struct.unpack_from("<Q", native, 512)[0]
    x87_clear = changed(native, 512, struct.pack("<Q", xstate_bv & ~1))
    for start, end in X87_FIELDS:                                     # not written: the area keeps its bytes
        x87_clear[start:end] = prior[start:end]
    assert not check(x87_clear)
    x87_clear[0:2] = b"\x7f\x03"
    assert check(x87_clear) == [
        "minivmm: component 0 written though XSTATE_BV[0] = 0 (xsaveopt writes only components whose bit it sets)"]
