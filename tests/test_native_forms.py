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


SAVES = [(form, host) for host in ("haswell", "skylake-client", "epyc", "skylake-server")
         for form in ("xsave", "xsaveopt", "xsavec") if not (form == "xsavec" and host == "haswell")]


@pytest.mark.parametrize("form, host", SAVES, ids=[f"{f}-{h}" for f, h in SAVES])
def test_the_xsave_family_saves_and_restores_what_the_machine_does(form, host):
    """x87 in its initial configuration, SSE, AVX (and the opmask and ZMM components on
    an AVX-512 host) saved by FORM, the registers clobbered, XRSTOR: the header, each
    component where the host's CPUID leaf 0xD puts it (the machine's own leaf for its
    run: AMD and Intel lay AVX-512 state out differently), and the registers equal the
    machine's. The engine's own XSAVE, XSAVEOPT and XRSTOR would lose YMM's upper halves."""
    from keystone import KS_ARCH_X86, KS_MODE_64, Ks

    from minivmm.cpu.profiles import load_profile
    profile = load_profile(host)
    wide = "avx512f" in profile.physical
    needs = {"xsave", form} | ({"avx512f"} if wide else set())
    if not needs <= machine_features() or form not in profile.physical:
        pytest.skip(f"this machine or {host} lacks {', '.join(sorted(needs - machine_features()))}")
    rfbm = 0xE7 if wide else 0x7
    ks = Ks(KS_ARCH_X86, KS_MODE_64)
    clobber = _encode([Instruction.create_reg_reg_reg(Code.EVEX_VPXORD_ZMM_K1Z_ZMM_ZMMM512B32, Register.ZMM17,
                                                      Register.ZMM17, Register.ZMM17),
                       Instruction.create_reg_reg_reg(Code.VEX_KXORQ_KR_KR_KR, Register.K3, Register.K3, Register.K3)]
                      ) if wide else b""
    body = bytes(ks.asm(f"fninit; mov eax, {rfbm}; xor edx, edx; {form} [rsi]; vpxor ymm1, ymm1, ymm1; "
                        "vpcmpeqd ymm2, ymm2, ymm2")[0]) + clobber + bytes(ks.asm("xrstor [rsi]")[0])
    regs = random_regfile(random.Random(f"{form}/{host}"))
    struct.pack_into("<Q", regs, FLAGS_AT, 0x2)
    cases = [(form, body, {}, bytes(regs), bytes(BUFFER))]
    guest, native = guest_result(cases, host, wide), native_result(cases, wide)
    vector = 64 if wide else 32
    assert all(guest[64 * i:64 * i + vector] == native[64 * i:64 * i + vector] == regs[64 * i:64 * i + vector]
               for i in range(32 if wide else 16)), "registers not restored as saved"
    assert not wide or guest[OPMASKS:GPRS_AT] == native[OPMASKS:GPRS_AT] == regs[OPMASKS:GPRS_AT]
    area, saved = (r[REGFILE:REGFILE + BUFFER] for r in (guest, native))
    header = struct.unpack_from("<QQ", area, 512)
    assert header == struct.unpack_from("<QQ", saved, 512)
    assert header[0] == rfbm & ~1 and header[1] == (1 << 63 | rfbm if form == "xsavec" else 0)  # x87 not in use
    assert area[24:28] == saved[24:28] and area[160:416] == saved[160:416]   # MXCSR, XMM0-15
    ours = _xsave_offsets(profile.cpuid, rfbm, form == "xsavec")
    theirs = _xsave_offsets(load_profile("native").cpuid, rfbm, form == "xsavec")
    for i, (at, size) in ours.items():
        assert area[at:at + size] == saved[theirs[i][0]:theirs[i][0] + size], f"component {i} differs"


def test_negative_control_the_engines_own_xsave_loses_ymm(monkeypatch):
    """With XSAVE and XRSTOR left to the engine, the comparison above fails."""
    from iced_x86 import Mnemonic

    from minivmm.cpu import isa
    own = (Mnemonic.XSAVE, Mnemonic.XSAVE64, Mnemonic.XRSTOR, Mnemonic.XRSTOR64)
    monkeypatch.setattr(isa, "ENGINE_WRONG", {k: v for k, v in isa.ENGINE_WRONG.items() if k not in own})
    with pytest.raises(AssertionError, match="registers not restored"):
        test_the_xsave_family_saves_and_restores_what_the_machine_does("xsave", "haswell")
