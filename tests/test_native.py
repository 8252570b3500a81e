"""What the engine cannot execute runs on the machine's own CPU: faults inside vector
instructions, SIMD exceptions, XSAVEC, and an AVX2 kernel run, migrated and resumed.
(Every instruction form against the machine: test_native_forms.py.)"""

import random
import re
import shutil
import subprocess

import pytest

from minivmm.cpu.native import machine_features
from minivmm.guests import shipped_guests_dir
from minivmm.guests.assembler import assemble
from minivmm.guests.loader import GuestImage
from minivmm.vmm.vm import VM


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

def build(tmp_path_factory, name: str, needs: set[str], *flags: str) -> str:
    """A shipped Linux program built with gcc -static FLAGS, to run natively and as a
    guest: skipped, saying why, without gcc or without what it NEEDS."""
    if not shutil.which("gcc"):
        pytest.skip(f"gcc is not installed: cannot build {name}")
    if not needs <= machine_features():
        pytest.skip(f"this machine lacks {', '.join(sorted(needs - machine_features()))}: {name} cannot run "
                    f"natively to compare")
    out = tmp_path_factory.mktemp(name) / name
    subprocess.run(["gcc", "-static", *flags, "-o", str(out), str(shipped_guests_dir().joinpath("linux", f"{name}.c"))],
                   check=True)
    return str(out)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    return build(tmp_path_factory, "avx2_kernel", {"avx2", "fma", "f16c"}, "-O2", "-mavx2", "-mfma", "-mf16c")


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
    monkeypatch.setattr(snapshot_mod, "ENGINE_REGISTERS",
                        tuple(r for r in snapshot_mod.ENGINE_REGISTERS if not r.startswith("YMM")))
    moved = VM(kernel, "haswell", argv=[ITERATIONS]).run(migrations=[f"broadwell@syscall:{point}"], timeout=300,
                                                          precopy=PreCopy(guest_insns_per_s=1e8))
    assert moved.migrations[0]["ok"] and moved.console != alone.console


@pytest.mark.skipif(not shutil.which("sha256sum"), reason="no sha256sum on this machine")
@pytest.mark.parametrize("host", ["skylake-client", "epyc", "skylake-server"])
def test_a_dynamic_program_runs_where_its_loader_saves_state_with_xsavec(host, tmp_path):
    """glibc's ld.so binds each symbol lazily between XSAVEC and XRSTOR where the view
    shows XSAVEC: on these hosts the machine's sha256sum runs to the native answer (on
    skylake-server its XSAVEC takes the opmask and ZMM state too)."""
    if host == "skylake-server" and "avx512f" not in machine_features():
        pytest.skip("this machine has no AVX-512: skylake-server's vector instructions stop as unsupported")
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


# ---- AVX-512: ZMM0-31 and the opmask registers ----------------------------------------

@pytest.fixture(scope="module")
def avx512_kernel(tmp_path_factory):
    return build(tmp_path_factory, "avx512_kernel", {"avx512f", "avx512bw", "avx512vl"}, "-O2", "-mavx512f",
                 "-mavx512bw", "-mavx512vl")


ROUNDS = "3000"
MID_ROUND = "insn:300000"   # inside round 3's loop, its accumulators in ZMM registers


def test_an_avx512_kernel_prints_on_skylake_server_what_it_prints_natively(avx512_kernel):
    native = subprocess.run([avx512_kernel, ROUNDS], capture_output=True, text=True, timeout=60).stdout
    result = VM(avx512_kernel, "skylake-server", argv=[ROUNDS]).run(timeout=120)
    assert result.exit_code == 0 and result.console == native and native.count("round") == 6


def test_the_avx512_kernel_on_haswell_is_sigill_naming_avx512(avx512_kernel):
    result = VM(avx512_kernel, "haswell", argv=[ROUNDS]).run(timeout=120)
    assert result.stop.signal == "SIGILL" and result.stop.missing_features[0].startswith("avx512")


@pytest.mark.parametrize("live", [False, True], ids=["stop-and-copy", "pre-copy"])
def test_migrated_mid_round_to_cascadelake_the_avx512_kernel_prints_the_same(avx512_kernel, live):
    from minivmm.vmm.migration import PreCopy
    alone = VM(avx512_kernel, "skylake-server", argv=[ROUNDS]).run(timeout=120)
    moved = VM(avx512_kernel, "skylake-server", argv=[ROUNDS]).run(
        migrations=[f"cascadelake-server@{MID_ROUND}"], timeout=300,
        precopy=PreCopy(guest_insns_per_s=1e8) if live else PreCopy(enabled=False))
    assert moved.migrations[0]["ok"] and moved.hosts == ["skylake-server", "cascadelake-server"]
    assert moved.console == alone.console and moved.exit_code == 0


def test_negative_control_without_zmm_the_migrated_avx512_kernel_goes_wrong(avx512_kernel, monkeypatch):
    from minivmm.vmm import snapshot as snapshot_mod
    from minivmm.vmm.migration import PreCopy
    alone = VM(avx512_kernel, "skylake-server", argv=[ROUNDS]).run(timeout=120)
    monkeypatch.setattr(snapshot_mod, "ENGINE_REGISTERS",
                        tuple(r for r in snapshot_mod.ENGINE_REGISTERS if not r.startswith("ZMM")))
    moved = VM(avx512_kernel, "skylake-server", argv=[ROUNDS]).run(
        migrations=[f"cascadelake-server@{MID_ROUND}"], timeout=300, precopy=PreCopy(enabled=False))
    assert moved.migrations[0]["ok"] and moved.console != alone.console


def test_a_snapshot_mid_round_of_the_avx512_kernel_resumes_in_another_process(avx512_kernel, tmp_path):
    import json

    from helpers import minivmm_cli
    alone = VM(avx512_kernel, "skylake-server", argv=[ROUNDS]).run(timeout=120)
    snap = tmp_path / "k.snap"
    VM(avx512_kernel, "skylake-server", argv=[ROUNDS]).run(snapshot_at=MID_ROUND, snapshot_file=str(snap), timeout=120)
    done = minivmm_cli("resume", str(snap), "--json", timeout=300)
    assert done.returncode == 0 and json.loads(done.stdout)["console"] == alone.console


def _opmask_guest():
    """K1-K7 and ZMM16-31 set to patterns, a loop long enough to move in, then both
    stored to 0x200000: what a migration must carry, which the engine cannot hold."""
    from iced_x86 import Code, Encoder, Instruction, MemoryOperand, Register
    at = lambda displ: MemoryOperand(Register.RSI, displ=displ, displ_size=8)  # noqa: E731
    setup = [Instruction.create_reg_u64(Code.MOV_R64_IMM64, Register.RSI, 0x200000)]
    setup += [Instruction.create_reg_mem(Code.VEX_KMOVQ_KR_KM64, Register.K0 + i, at(8 * i)) for i in range(1, 8)]
    setup += [Instruction.create_reg_mem(Code.EVEX_VMOVDQU64_ZMM_K1Z_ZMMM512, Register.ZMM16 + i, at(64 + 64 * i))
              for i in range(16)]
    setup += [Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.ECX, 20000)]
    save = [Instruction.create_mem_reg(Code.VEX_KMOVQ_M64_KR, at(0x2000 + 8 * i), Register.K0 + i) for i in range(1, 8)]
    save += [Instruction.create_mem_reg(Code.EVEX_VMOVDQU64_ZMMM512_K1Z_ZMM, at(0x2040 + 64 * i), Register.ZMM16 + i)
             for i in range(16)]
    encoder = Encoder(64)
    for instr in setup:
        encoder.encode(instr, 0)
    enable = bytes.fromhex("31c9 0f01d0 0de7000000 0f01d1")       # XCR0 |= opmask, ZMM_Hi256, Hi16_ZMM
    loop = bytes.fromhex("48ffc0 ffc9 75f9")                        # inc rax; dec ecx; jnz
    head = enable + encoder.take_buffer() + loop
    for instr in save:
        encoder.encode(instr, 0)
    code = head + encoder.take_buffer() + bytes.fromhex("31c0 e6f4")
    patterns = bytes(8) + random.Random("opmask").randbytes(8 * 7 + 64 * 16)
    return GuestImage("opmask", "asm", ((0x100000, code), (0x200000, patterns)), 0x100000), patterns


@pytest.mark.skipif("avx512f" not in machine_features(), reason="this machine has no AVX-512")
@pytest.mark.parametrize("carried", [True, False], ids=["carried", "negative-control"])
def test_opmask_and_upper_zmm_registers_survive_a_migration(carried, monkeypatch):
    from minivmm.vmm.exits.native import NativeExecutor
    from minivmm.vmm.migration import PreCopy
    if not carried:  # the opmask registers left behind: the destination's are zero
        monkeypatch.setattr(NativeExecutor, "opmasks", lambda self: {})
    image, patterns = _opmask_guest()
    result = VM(image, "skylake-server").run(migrations=["icelake-server@insn:30000"], precopy=PreCopy(enabled=False),
                                             timeout=60)
    assert result.stop.reason == "exited" and result.migrations[0]["ok"]
    saved = bytes(result.ram[0x202000 + 8:0x202000 + 64 + 64 * 16])
    assert (saved == patterns[8:]) == carried
    assert saved[56:] == patterns[64:]   # ZMM16-31 either way


@pytest.fixture(scope="module")
def sigframe_avx512(tmp_path_factory):
    return build(tmp_path_factory, "sigframe_avx512", {"avx512f"}, "-O1", "-mavx512f")


SIGFRAME_LINE = re.compile(r"zmm16=([0-9a-f]+),([0-9a-f]+) k1=([0-9a-f]+) xfeatures=([0-9a-f]+)")


@pytest.mark.parametrize("carried", [True, False], ids=["carried", "negative-control"])
def test_a_signal_frame_carries_opmask_and_zmm_state_as_linux_does(sigframe_avx512, carried, monkeypatch):
    """ZMM16 and K1 survive a SIGILL handler that clobbers them, through the frame's
    opmask and Hi16_ZMM components, as natively; without those components they do not.

    The frame's sw_reserved.xfeatures (what the program prints) names the components its
    XSAVE area holds: the XCR0 features Linux gives user frames (arch/x86/kernel/fpu/
    signal.c), and XCR0 can enable only what CPUID leaf 0xD reports (SDM Vol. 1, 13.3).
    The machine's Linux enables the machine's components, which may be more than the
    skylake-server profile has (AMX's XTILECFG, PKRU); so the frames are compared on
    the components of the XCR0 the guest's Linux enables on the profile (x87, SSE, AVX,
    opmask, ZMM_Hi256, Hi16_ZMM): minivmm's frame names exactly those, the machine's
    names them all (it may name more), and ZMM16 and K1 come back as the machine's do."""
    from minivmm.linux.start import linux_xcr0
    if not carried:
        from minivmm.linux import signals
        monkeypatch.setattr(signals, "CARRIED", (2,))
    native = subprocess.run([sigframe_avx512], capture_output=True, text=True, timeout=30).stdout
    vm = VM(sigframe_avx512, "skylake-server")
    result = vm.run(timeout=60)
    xcr0 = linux_xcr0(vm.view)
    assert result.exit_code == 0 and SIGFRAME_LINE.fullmatch(result.console.strip()), result.console
    (*ours, our_features), (*theirs, their_features) = (SIGFRAME_LINE.fullmatch(out.strip()).groups()
                                                        for out in (result.console, native))
    assert (xcr0, int(our_features, 16)) == (0xE7, xcr0)
    assert int(their_features, 16) & xcr0 == xcr0, f"the machine's frame lacks {xcr0 & ~int(their_features, 16):#x}"
    assert theirs == ["1122334455667788", "1122334455667788", "5a5a"]
    if carried:
        assert ours == theirs
    else:   # neither the opmask nor the Hi16_ZMM component: the handler's K1 and ZMM16 stay
        assert ours[:2] != theirs[:2] and ours[2] != theirs[2], ours
