"""What the engine cannot execute runs on the machine's own CPU, exactly.

Differential tests: each instruction form runs once natively (a function assembled
here that loads a register file, runs the instruction on a host buffer, stores it
back) and once as a guest instruction on a host profile that has it, from the same
random registers and memory: YMM0-15, the general registers, the arithmetic flags and
the memory must come out identical. Forms the machine lacks are skipped, saying so.
"""

import ctypes
import mmap
import random
import shutil
import struct
import subprocess

import pytest
from keystone import KS_ARCH_X86, KS_MODE_64, Ks

from minivmm.cpu.native import machine_features
from minivmm.guests import shipped_guests_dir
from minivmm.guests.assembler import assemble
from minivmm.guests.loader import GuestImage
from minivmm.vmm.vm import VM

DATA, BUFFER = 0x300000, 0x310000      # the register file and the memory operand's buffer (guest)
GPR = ("rax", "rbx", "rcx", "rdx", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14")
YMM_AT, GPR_AT, FLAGS_AT = 0, 512, 512 + 8 * len(GPR)
FLAGS = 0x8D5                           # CF PF AF ZF SF OF
# Each form: (instruction, the feature, a host profile that has it). rsi points at a
# 64-byte aligned buffer of random bytes; r15 holds the register file's address.
FORMS = [
    ("vaddps ymm0, ymm1, ymm2", "avx", "haswell"), ("vaddps ymm3, ymm4, ymmword ptr [rsi+32]", "avx", "haswell"),
    ("vmulpd ymm5, ymm6, ymm7", "avx", "sandybridge"), ("vdivps xmm0, xmm1, xmm2", "avx", "sandybridge"),
    ("vsqrtps ymm0, ymm1", "avx", "haswell"), ("vshufps ymm0, ymm1, ymm2, 0x1b", "avx", "haswell"),
    ("vperm2f128 ymm0, ymm1, ymm2, 0x21", "avx", "haswell"), ("vbroadcastss ymm0, dword ptr [rsi+4]", "avx", "haswell"),
    ("vinsertf128 ymm0, ymm1, xmm2, 1", "avx", "haswell"), ("vextractf128 xmmword ptr [rsi+16], ymm1, 1", "avx", "haswell"),
    ("vmaskmovps ymm0, ymm1, ymmword ptr [rsi]", "avx", "haswell"), ("vmaskmovps ymmword ptr [rsi], ymm1, ymm2", "avx", "haswell"),
    ("vptest ymm0, ymm1", "avx", "haswell"), ("vcomiss xmm0, xmm1", "avx", "haswell"),
    ("vcvtps2pd ymm0, xmm1", "avx", "haswell"), ("vcvttps2dq ymm0, ymm1", "avx", "haswell"),
    ("vblendvps ymm0, ymm1, ymm2, ymm3", "avx", "haswell"), ("vdpps ymm0, ymm1, ymm2, 0xf1", "avx", "haswell"),
    ("vmovmskps eax, ymm1", "avx", "haswell"), ("vroundps ymm0, ymm1, 1", "avx", "haswell"),
    ("vhaddps ymm0, ymm1, ymm2", "avx", "haswell"), ("vzeroupper", "avx", "haswell"),
    ("vmovdqu ymmword ptr [rsi+rcx*1], ymm9", "avx", "haswell"), ("vmovd ebx, xmm3", "avx", "haswell"),
    ("vpaddd ymm0, ymm1, ymm2", "avx2", "haswell"), ("vpshufb ymm0, ymm1, ymmword ptr [rsi]", "avx2", "haswell"),
    ("vpermd ymm0, ymm1, ymm2", "avx2", "haswell"), ("vpermq ymm0, ymm1, 0x4e", "avx2", "haswell"),
    ("vpsllvd ymm0, ymm1, ymm2", "avx2", "haswell"), ("vpsravd ymm0, ymm1, ymm2", "avx2", "haswell"),
    ("vpbroadcastb ymm0, xmm1", "avx2", "haswell"), ("vpmaddubsw ymm0, ymm1, ymm2", "avx2", "haswell"),
    ("vpmovmskb eax, ymm1", "avx2", "haswell"), ("vpcmpeqb ymm0, ymm1, ymm2", "avx2", "haswell"),
    ("vpblendvb ymm0, ymm1, ymm2, ymm3", "avx2", "haswell"), ("vmpsadbw ymm0, ymm1, ymm2, 5", "avx2", "haswell"),
    ("vpalignr ymm0, ymm1, ymm2, 5", "avx2", "haswell"), ("vpmuludq ymm0, ymm1, ymm2", "avx2", "haswell"),
    ("vpmaskmovd ymmword ptr [rsi], ymm1, ymm2", "avx2", "haswell"), ("vinserti128 ymm0, ymm1, xmmword ptr [rsi], 1", "avx2", "haswell"),
    ("vfmadd132ps ymm0, ymm1, ymm2", "fma", "haswell"), ("vfmadd231pd ymm0, ymm1, ymmword ptr [rsi]", "fma", "haswell"),
    ("vfnmsub213ss xmm0, xmm1, xmm2", "fma", "haswell"),
    ("vcvtph2ps ymm0, xmm1", "f16c", "haswell"), ("vcvtps2ph xmm0, ymm1, 0", "f16c", "haswell"),
    ("vcvtps2ph xmmword ptr [rsi+8], ymm1, 4", "f16c", "haswell"),
    ("andn eax, ebx, ecx", "bmi1", "haswell"), ("bextr rax, rbx, rcx", "bmi1", "haswell"),
    ("blsr rax, rbx", "bmi1", "haswell"), ("pdep rax, rbx, rcx", "bmi2", "haswell"),
    ("pext eax, ebx, dword ptr [rsi]", "bmi2", "haswell"), ("shlx rax, rbx, rcx", "bmi2", "haswell"),
    ("rorx rax, rbx, 13", "bmi2", "haswell"), ("mulx rax, rbx, rcx", "bmi2", "haswell"),
    ("sha1rnds4 xmm0, xmm1, 2", "sha_ni", "epyc"), ("sha1msg1 xmm0, xmm1", "sha_ni", "epyc"),
    ("sha256rnds2 xmm1, xmm2", "sha_ni", "epyc"), ("sha256msg2 xmm0, xmmword ptr [rsi]", "sha_ni", "epyc"),
    # keystone cannot assemble these: their bytes (vaesenc ymm0, ymm1, ymm2; vaesdeclast ymm0, ymm1, [rsi];
    # vpclmulqdq ymm0, ymm1, ymm2, 0x11; vgf2p8mulb ymm0, ymm1, ymm2; gf2p8affineqb xmm0, xmm1, 0x1b)
    (".byte 0xc4, 0xe2, 0x75, 0xdc, 0xc2", "vaes", "icelake-server"),
    (".byte 0xc4, 0xe2, 0x75, 0xdf, 0x06", "vaes", "icelake-server"),
    (".byte 0xc4, 0xe3, 0x75, 0x44, 0xc2, 0x11", "vpclmulqdq", "icelake-server"),
    (".byte 0xc4, 0xe2, 0x75, 0xcf, 0xc2", "gfni", "icelake-server"),
    (".byte 0x66, 0x0f, 0x3a, 0xce, 0xc1, 0x1b", "gfni", "icelake-server"),
]


def _body(instruction: str) -> list[str]:
    loads = [f"vmovdqu ymm{i}, ymmword ptr [r15+{YMM_AT + 32 * i}]" for i in range(16)]
    loads += [f"mov {r}, qword ptr [r15+{GPR_AT + 8 * k}]" for k, r in enumerate(GPR)]
    loads += [f"push qword ptr [r15+{FLAGS_AT}]", "popfq"]
    stores = ["pushfq", f"pop qword ptr [r15+{FLAGS_AT}]"]
    stores += [f"vmovdqu ymmword ptr [r15+{YMM_AT + 32 * i}], ymm{i}" for i in range(16)]
    stores += [f"mov qword ptr [r15+{GPR_AT + 8 * k}], {r}" for k, r in enumerate(GPR)]
    return loads + [instruction] + stores


def native_run(instruction: str, registers: bytes, memory: bytes) -> tuple[bytes, bytes]:
    """The reference: the instruction on this machine, rsi at a host buffer."""
    code = bytes(Ks(KS_ARCH_X86, KS_MODE_64).asm("; ".join(
        ["push rbx", "push rbp", "push r12", "push r13", "push r14", "push r15", "mov r15, rdi", "push rsi",
         "pop rsi", *_body(instruction), "vzeroupper", "cld", "pop r15", "pop r14", "pop r13", "pop r12",
         "pop rbp", "pop rbx", "ret"]))[0])
    page = mmap.mmap(-1, 1 << 16, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    function = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
    regs = ctypes.create_string_buffer(registers, len(registers))
    buffer = (ctypes.c_uint8 * 4096).from_buffer(mmap.mmap(-1, 8192))
    ctypes.memmove(ctypes.addressof(buffer) + 2048, memory, len(memory))
    function(ctypes.addressof(regs), ctypes.addressof(buffer) + 2048)
    return regs.raw, bytes(buffer)[2048:2048 + len(memory)]


def guest_run(instruction: str, host: str, registers: bytes, memory: bytes):
    """The same as a guest instruction: the registers and buffer in guest RAM."""
    source = "\n".join([
        "mov eax, 1", "cpuid", "xor ecx, ecx", "xgetbv", "or eax, 7", "xsetbv",   # the OS enables YMM state
        f"mov r15, {DATA:#x}", f"mov rsi, {BUFFER + 2048:#x}", *_body(instruction), "xor eax, eax", "out 0xf4, al"])
    code = assemble(source, "form.asm")
    image = GuestImage(instruction, "asm", ((0x100000, code), (DATA, registers), (BUFFER + 2048, memory)), 0x100000)
    result = VM(image, host).run(timeout=30)
    ram = result.ram
    return result, bytes(ram[DATA:DATA + len(registers)]), bytes(ram[BUFFER + 2048:BUFFER + 2048 + len(memory)])


def random_state(seed: str) -> tuple[bytes, bytes]:
    rng = random.Random(seed)
    registers = bytearray(rng.randbytes(FLAGS_AT + 8))
    # small shift counts, counts and offsets where an instruction takes them from a register
    struct.pack_into("<Q", registers, GPR_AT + 8 * GPR.index("rcx"), rng.randrange(0, 64))
    struct.pack_into("<Q", registers, FLAGS_AT, rng.getrandbits(64) & FLAGS | 0x2)
    return bytes(registers), rng.randbytes(256)


def undefined_flags(instruction: str) -> int:
    """The flags the SDM leaves undefined for this instruction (vendors differ there)."""
    from iced_x86 import Decoder, RflagsBits
    instr = Decoder(64, assemble(instruction, "one.asm")).decode()
    bits = {RflagsBits.OF: 0x800, RflagsBits.SF: 0x80, RflagsBits.ZF: 0x40, RflagsBits.AF: 0x10,
            RflagsBits.CF: 0x1, RflagsBits.PF: 0x4}
    return sum(flag for bit, flag in bits.items() if instr.rflags_undefined & bit)


def compare(instruction: str, host: str, seed: str, registers=None, memory=None):
    registers, memory = (registers, memory) if registers else random_state(seed)
    result, guest_regs, guest_memory = guest_run(instruction, host, registers, memory)
    assert result.stop.reason == "exited", f"{instruction} on {host}: {result.stop.message}"
    native_regs, native_memory = native_run(instruction, registers, memory)
    return guest_regs, native_regs, guest_memory, native_memory


@pytest.mark.parametrize("instruction, feature, host", FORMS, ids=[f[0] for f in FORMS])
def test_the_guest_computes_what_the_machine_computes(instruction, feature, host):
    if feature not in machine_features():
        pytest.skip(f"this machine has no {feature}: the form cannot be compared (it stays unsupported)")
    for trial in range(3):
        guest_regs, native_regs, guest_memory, native_memory = compare(instruction, host, f"{instruction}/{trial}")
        assert guest_regs[:GPR_AT] == native_regs[:GPR_AT], f"{instruction}: YMM registers differ"
        assert guest_regs[GPR_AT:FLAGS_AT] == native_regs[GPR_AT:FLAGS_AT], f"{instruction}: general registers differ"
        defined = FLAGS & ~undefined_flags(instruction)
        flags = [struct.unpack_from("<Q", r, FLAGS_AT)[0] & defined for r in (guest_regs, native_regs)]
        assert flags[0] == flags[1], f"{instruction}: flags differ"
        assert guest_memory == native_memory, f"{instruction}: memory differs"


def test_the_comparison_catches_a_wrong_result_negative_control():
    """Two different instructions from the same state do not compare equal: the check
    above would catch a guest that computed something else."""
    if "avx" not in machine_features():
        pytest.skip("this machine has no AVX")
    registers, memory = random_state("control")
    _, guest_regs, _ = guest_run("vaddps ymm0, ymm1, ymm2", "haswell", registers, memory)
    native_regs, _ = native_run("vsubps ymm0, ymm1, ymm2", registers, memory)
    assert guest_regs[:32] != native_regs[:32] and guest_regs[32:GPR_AT] == native_regs[32:GPR_AT]


# ---- faults inside vector instructions ------------------------------------------------

def _fault(instruction: str, rsi: int, setup=(), memory: str = "16M"):
    source = "\n".join(["mov eax, 1", "cpuid", "xor ecx, ecx", "xgetbv", "or eax, 7", "xsetbv",
                        f"mov rsi, {rsi:#x}", *setup, instruction, "xor eax, eax", "out 0xf4, al"])
    image = GuestImage(instruction, "asm", ((0x100000, assemble(source, "fault.asm")),), 0x100000)
    return VM(image, "haswell", memory=memory).run(timeout=30)


needs_avx = pytest.mark.skipif("avx2" not in machine_features(), reason="this machine has no AVX2")


@needs_avx
def test_a_misaligned_vmovdqa_is_gp_and_vmovdqu_is_not():
    """SDM Vol. 2, VMOVDQA: #GP(0) if a memory operand is not aligned on a 32-byte
    boundary (VEX.256); the unaligned move takes the same address."""
    result = _fault("vmovdqa ymm0, ymmword ptr [rsi]", 0x200010)
    assert (result.stop.reason, result.stop.vector) == ("crashed", 13), result.stop.message
    assert "misaligned" in result.stop.message
    assert _fault("vmovdqu ymm0, ymmword ptr [rsi]", 0x200010).stop.reason == "exited"
    assert _fault("vmovdqa ymm0, ymmword ptr [rsi]", 0x200020).stop.reason == "exited"


@needs_avx
def test_a_load_crossing_the_end_of_ram_is_pf_with_the_right_cr2():
    """16 MiB of RAM: a 32-byte load at 16 MiB - 16 reaches the first absent page; CR2
    is that page's first byte, the first byte the CPU could not read."""
    result = _fault("vmovdqu ymm0, ymmword ptr [rsi]", (16 << 20) - 16)
    assert (result.stop.reason, result.stop.vector) == ("crashed", 14), result.stop.message
    assert f"CR2 {16 << 20:#x}" in result.stop.message
    assert _fault("vmovdqu ymm0, ymmword ptr [rsi]", (16 << 20) - 32).stop.reason == "exited"


@needs_avx
def test_masked_off_elements_of_vmaskmovps_do_not_fault():
    """SDM Vol. 2, VMASKMOV: faults occur only for elements the mask selects. Elements
    0-3 below the end of RAM enabled, 4-7 beyond it disabled: no fault; enable element
    7 and it faults."""
    low_half = ["mov eax, 0x80000000", "vmovd xmm1, eax", "vpbroadcastd xmm1, xmm1"]   # elements 0-3 only
    assert _fault("vmaskmovps ymm0, ymm1, ymmword ptr [rsi]", (16 << 20) - 16, low_half).stop.reason == "exited"
    everything = ["vpcmpeqd ymm1, ymm1, ymm1"]
    result = _fault("vmaskmovps ymm0, ymm1, ymmword ptr [rsi]", (16 << 20) - 16, everything)
    assert (result.stop.reason, result.stop.vector) == ("crashed", 14)


@needs_avx
def test_a_gather_checks_each_enabled_element():
    """VPGATHERDD: each element's address is checked, masked-off ones are not read."""
    setup = ["xor eax, eax", "vmovd xmm1, eax", "vpbroadcastd ymm1, xmm1",                  # indices 0
             "mov eax, 0x80000000", "vmovd xmm2, eax", "vpbroadcastd ymm2, xmm2"]          # all enabled
    assert _fault("vpgatherdd ymm0, dword ptr [rsi+ymm1*4], ymm2", 0x200000, setup).stop.reason == "exited"
    beyond = _fault("vpgatherdd ymm0, dword ptr [rsi+ymm1*4], ymm2", (16 << 20) + 64, setup)
    assert (beyond.stop.reason, beyond.stop.vector) == ("crashed", 14)
    masked = setup[:3] + ["vpxor ymm2, ymm2, ymm2"]
    assert _fault("vpgatherdd ymm0, dword ptr [rsi+ymm1*4], ymm2", (16 << 20) + 64, masked).stop.reason == "exited"


# ---- a real AVX2 program -----------------------------------------------------------------

@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed: cannot build the AVX2 kernel")
    if not {"avx2", "fma", "f16c"} <= machine_features():
        pytest.skip("this machine lacks AVX2, FMA or F16C: the kernel cannot run natively to compare")
    out = tmp_path_factory.mktemp("avx2") / "avx2_kernel"
    subprocess.run(["gcc", "-static", "-O2", "-mavx2", "-mfma", "-mf16c", "-o", str(out),
                    str(shipped_guests_dir().joinpath("linux", "avx2_kernel.c"))], check=True)
    return str(out)


ITERATIONS = "2000"


def test_an_avx2_kernel_prints_on_haswell_what_it_prints_natively(kernel):
    """Gathers, lane permutes, variable shifts, FMA and half-float conversions (and glibc's
    own AVX2 string functions) on the Haswell profile, run by the machine's CPU."""
    native = subprocess.run([kernel, ITERATIONS], capture_output=True, text=True, timeout=60).stdout
    result = VM(kernel, "haswell", argv=[ITERATIONS]).run(timeout=120)
    assert result.exit_code == 0 and result.console == native and native.count("round") == 6, result.stop.message


def test_the_same_kernel_on_sandybridge_is_sigill_naming_avx2(kernel):
    result = VM(kernel, "sandybridge", argv=[ITERATIONS]).run(timeout=120)
    assert (result.stop.signal, result.exit_code) == ("SIGILL", 132) and result.stop.missing_features == ["avx2"]


@pytest.mark.parametrize("live", [False, True])
def test_migrated_mid_kernel_to_broadwell_it_prints_the_same(kernel, live):
    """Moved after round 2's line: stop-and-copy between rounds, and pre-copy, whose
    rounds let the kernel run on (its YMM accumulators live) until the switchover."""
    from minivmm.vmm.migration import PreCopy
    alone = VM(kernel, "haswell", argv=[ITERATIONS]).run(timeout=120)
    point = [i + 1 for i, name in enumerate(alone.syscalls["sample"]) if name == "write"][2]
    moved = VM(kernel, "haswell", argv=[ITERATIONS]).run(
        migrations=[f"broadwell@syscall:{point}"], timeout=300,
        precopy=PreCopy(guest_insns_per_s=1e8) if live else PreCopy(enabled=False))  # ~60k instructions a round
    assert moved.migrations[0]["mode"] == ("pre-copy" if live else "stop-and-copy")
    assert moved.migrations[0]["ok"] and moved.hosts == ["haswell", "broadwell"]
    assert moved.console == alone.console and moved.exit_code == 0


def test_forced_to_sandybridge_mid_kernel_it_dies_of_sigill_naming_avx2(kernel):
    alone = VM(kernel, "haswell", argv=[ITERATIONS]).run(timeout=120)
    point = [i + 1 for i, name in enumerate(alone.syscalls["sample"]) if name == "write"][2]
    from minivmm.vmm.migration import PreCopy
    moved = VM(kernel, "haswell", argv=[ITERATIONS]).run(migrations=[f"sandybridge@syscall:{point}"], force=True,
                                                          precopy=PreCopy(enabled=False), timeout=120)
    assert moved.migrations[0]["forced"] and moved.host == "sandybridge"
    assert (moved.stop.signal, moved.stop.missing_features) == ("SIGILL", ["avx2"])
    assert moved.console == "".join(alone.console.splitlines(keepends=True)[:3])


def test_a_snapshot_mid_kernel_resumes_in_another_process_to_the_same_result(kernel, tmp_path):
    from helpers import minivmm_cli
    alone = VM(kernel, "haswell", argv=[ITERATIONS]).run(timeout=120)
    point = [i + 1 for i, name in enumerate(alone.syscalls["sample"]) if name == "write"][1]
    snap = tmp_path / "k.snap"
    VM(kernel, "haswell", argv=[ITERATIONS]).run(snapshot_at=f"syscall:{point}", snapshot_file=str(snap), timeout=120)
    done = minivmm_cli("resume", str(snap), "--json", timeout=300)
    import json
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["console"] == alone.console


def test_negative_control_without_ymm_upper_halves_the_migrated_kernel_goes_wrong(kernel, monkeypatch):
    """The same pre-copy move with only XMM (the low halves) carried: the kernel's
    accumulators lose their upper lanes, and the output differs."""
    from minivmm.vmm import snapshot as snapshot_mod
    from minivmm.vmm.migration import PreCopy
    alone = VM(kernel, "haswell", argv=[ITERATIONS]).run(timeout=120)
    point = [i + 1 for i, name in enumerate(alone.syscalls["sample"]) if name == "write"][2]
    monkeypatch.setattr(snapshot_mod, "REGISTERS", tuple(r for r in snapshot_mod.REGISTERS if not r.startswith("YMM")))
    moved = VM(kernel, "haswell", argv=[ITERATIONS]).run(migrations=[f"broadwell@syscall:{point}"], timeout=300,
                                                          precopy=PreCopy(guest_insns_per_s=1e8))
    assert moved.migrations[0]["ok"] and moved.console != alone.console


XSAVEC_ROUND_TRIP = "\n".join([
    "fninit",                                                # x87 in its initial configuration: not saved
    "push 0x1f80", "ldmxcsr dword ptr [rsp]", "add rsp, 8",  # one MXCSR for both runs
    "mov eax, 7", "xor edx, edx", "xsavec [rsi]",           # x87, SSE and AVX, compacted
    "vpxor ymm1, ymm1, ymm1", "vpcmpeqd ymm2, ymm2, ymm2",  # clobber what was saved
    "xrstor [rsi]"])                                         # and bring it back


@pytest.mark.skipif("xsavec" not in machine_features(), reason="this machine has no XSAVEC to compare with")
@pytest.mark.parametrize("host", ["skylake-client", "epyc"])
def test_xsavec_and_xrstor_of_the_compacted_form_do_what_the_machine_does(host):
    """The engine has neither (its XRSTOR refuses XCOMP_BV[63]): minivmm carries them
    out. The area (legacy region, XSTATE_BV = 6, XCOMP_BV = 2^63 | 7, YMM's upper halves
    at 576) and the restored registers equal the machine's own run."""
    registers, _ = random_state("xsavec")
    registers = bytearray(registers)
    struct.pack_into("<Q", registers, FLAGS_AT, 0x2)
    guest_regs, native_regs, guest_memory, native_memory = compare(XSAVEC_ROUND_TRIP, host, "", bytes(registers),
                                                                   bytes(1024))
    assert guest_regs[:GPR_AT] == native_regs[:GPR_AT]
    header = struct.unpack_from("<QQ", guest_memory, 512)
    assert header == (6, 1 << 63 | 7) == struct.unpack_from("<QQ", native_memory, 512)  # x87 not in use
    assert guest_memory[160:416] == native_memory[160:416] and guest_memory[576:832] == native_memory[576:832]
    assert guest_memory[24:28] == native_memory[24:28]  # MXCSR


@pytest.mark.skipif(not shutil.which("sha256sum"), reason="no sha256sum on this machine")
@pytest.mark.parametrize("host", ["skylake-client", "epyc"])
def test_a_dynamic_program_runs_where_its_loader_saves_state_with_xsavec(host, tmp_path):
    """glibc's ld.so binds each symbol lazily between XSAVEC and XRSTOR where the view
    shows XSAVEC: on these hosts the machine's sha256sum runs to the native answer."""
    data = tmp_path / "data"
    data.write_bytes(bytes(range(256)) * 64)
    expected = subprocess.run(["sha256sum", str(data)], capture_output=True, text=True).stdout
    result = VM(shutil.which("sha256sum"), host, mounts=["/"], argv=[str(data)]).run(timeout=120)
    assert result.exit_code == 0 and result.console == expected, result.stop.message


@needs_avx
def test_an_unmasked_simd_exception_is_xm_and_writes_nothing():
    """SDM Vol. 1, 11.5.1: with MXCSR's divide-by-zero exception unmasked, VDIVPS by
    zero raises #XM (CR4.OSXMMEXCPT is set at boot); masked, it gives infinities."""
    divide = ["mov eax, 1", "cvtsi2ss xmm1, eax", "xorps xmm2, xmm2", "vbroadcastss ymm1, xmm1"]
    unmasked = ["push 0x1d80", "ldmxcsr dword ptr [rsp]", "add rsp, 8"]   # ZM (bit 9) clear
    result = _fault("vdivps ymm0, ymm1, ymm2", 0x200000, divide + unmasked)
    assert (result.stop.reason, result.stop.vector) == ("crashed", 19), result.stop.message
    assert _fault("vdivps ymm0, ymm1, ymm2", 0x200000, divide).stop.reason == "exited"
