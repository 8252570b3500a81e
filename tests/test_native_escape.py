"""The native executor is the VMM's, not the guest's: every way out that was found, each
run natively (the oracle) and as a Linux program under minivmm, which must agree, and the
VMM's own state untouched. Plus the allow-list itself and the fuzzer's short profile."""

import random

import pytest
from iced_x86 import Decoder
from keystone import KS_ARCH_X86, KS_MODE_64, Ks

from minivmm.cpu.confined import refusal
from minivmm.cpu.native import machine_features
from minivmm.guests.assembler import assemble
from minivmm.guests.loader import GuestImage
from minivmm.testing import nativefuzz
from minivmm.vmm.vm import VM

needs_avx2 = pytest.mark.skipif(not {"avx2", "bmi2"} <= machine_features(), reason="this machine has no AVX2/BMI2")
needs_fsgsbase = pytest.mark.skipif("fsgsbase" not in machine_features(), reason="this machine has no FSGSBASE")


@pytest.fixture(scope="module")
def workers():
    """minivmm in child processes, one per host: a regression that kills the VMM fails
    its test instead of the test session."""
    started = {}
    yield lambda host: started.setdefault(host, nativefuzz._Worker(host))
    for worker in started.values():
        worker.stop()


def outcomes(sequence, workers, tmp_path, host="haswell", seed=1):
    """The sequence natively and under minivmm: (native, guest) Outcomes."""
    rng = random.Random(seed)
    path = tmp_path / "case"
    path.write_bytes(nativefuzz.program(sequence, rng, wide=False))
    path.chmod(0o755)
    guest = workers(host).run(str(path))
    assert guest is not None, "the VMM died"
    return nativefuzz.native(str(path)), guest


def assert_as_native(sequence, workers, tmp_path, host="haswell", signal=None):
    native, guest = outcomes(sequence, workers, tmp_path, host)
    assert not guest.vmm, guest.vmm
    assert native.signal == signal, f"natively: {native.signal}"
    assert guest.signal == native.signal
    undefined = nativefuzz._undefined_flags(sequence)
    assert nativefuzz._masked(guest.dump, undefined) == nativefuzz._masked(native.dump, undefined)


VPADDD = "vpaddd ymm0, ymm1, ymm1"   # takes what follows into a native run


@needs_avx2
@pytest.mark.parametrize("sequence", [
    ["mov ecx, 64", "bzhi rax, rsp, rcx"],                               # RSP read: the guest's, not the VMM's stack
    ["vmovq xmm0, rsp", "vmovq rax, xmm0"],
    ["lea rax, [rsp - 64]", "mov ecx, 64", "bzhi rsp, rax, rcx"],         # RSP written: the guest's
    ["lea rax, [rsp - 8]", "vmovq xmm0, rax", "vmovq rsp, xmm0"],
    [VPADDD, "lea rax, [rsp + 16]", "mov esp, eax"],
], ids=["bzhi-reads-rsp", "vmovq-reads-rsp", "bzhi-writes-rsp", "vmovq-writes-rsp", "esp-after-avx"])
def test_the_stack_pointer_is_the_guests(sequence, workers, tmp_path):
    assert_as_native(sequence, workers, tmp_path)


@needs_avx2
@needs_fsgsbase
def test_fs_and_gs_bases_are_the_guests(workers, tmp_path):
    assert_as_native([VPADDD, "rdfsbase rax", "rdgsbase rcx"], workers, tmp_path)
    assert_as_native([VPADDD, "wrfsbase rsi", "rdfsbase rdx"], workers, tmp_path)


@needs_avx2
@pytest.mark.parametrize("instruction", ["wbinvd", "swapgs", "lgdt [rsi]", "invlpg [rsi]", "cli", "hlt", "rdmsr"])
def test_privileged_instructions_after_avx_are_the_guests_sigsegv(instruction, workers, tmp_path):
    assert_as_native([VPADDD, instruction], workers, tmp_path, signal="SIGSEGV")


@needs_avx2
def test_a_misaligned_legacy_sse_operand_in_a_run_is_the_guests_sigsegv(workers, tmp_path):
    """SDM Vol. 1, 10.4.1.1: a 16-byte legacy SSE memory operand must be aligned (#GP)."""
    assert_as_native([VPADDD, "movaps xmm2, xmmword ptr [rsi + 1]"], workers, tmp_path, signal="SIGSEGV")
    assert_as_native([VPADDD, "addps xmm2, xmmword ptr [rsi + 4]"], workers, tmp_path, signal="SIGSEGV")
    assert_as_native([VPADDD, "movups xmm2, xmmword ptr [rsi + 4]"], workers, tmp_path)


@needs_avx2
def test_lock_where_it_is_not_allowed_is_sigill(workers, tmp_path):
    """SDM Vol. 2A, LOCK: #UD on an instruction that cannot take it (the engine ran it)."""
    assert_as_native([VPADDD, bytes.fromhex("f089c0")], workers, tmp_path, signal="SIGILL")
    assert_as_native([bytes.fromhex("f089c0")], workers, tmp_path, signal="SIGILL")
    assert_as_native(["lock add qword ptr [rsp], rax"], workers, tmp_path)


@needs_avx2
@pytest.mark.parametrize("operand", ["[r8d]", "[r8d - 16]", "[r8d + r9d*2]", "fs:[r9 + 8]", "gs:[r9]"])
def test_address_size_and_segment_overrides_address_what_the_cpu_does(operand, workers, tmp_path):
    """67h: the effective address wraps at 32 bits (R8 holds junk above bit 31);
    FS/GS: based on the guest's own bases (thread-local AVX code)."""
    assert_as_native([VPADDD, f"vmovdqu ymm3, ymmword ptr {operand}", f"vpaddd ymm4, ymm3, ymmword ptr {operand}"],
                     workers, tmp_path)


@needs_avx2
def test_a_stack_segment_access_to_a_non_canonical_address_is_sigbus(workers, tmp_path):
    """SDM Vol. 3A, 6.15: a non-canonical address through SS (RSP or RBP based) is #SS,
    which Linux sends as SIGBUS; through DS it is #GP, SIGSEGV."""
    assert_as_native([VPADDD, "vmovdqu ymm3, ymmword ptr [rbp + r14]"], workers, tmp_path, signal="SIGBUS")
    assert_as_native([VPADDD, "vmovdqu ymm3, ymmword ptr [rsi + r14]"], workers, tmp_path, signal="SIGSEGV")


@needs_avx2
def test_the_vmms_mxcsr_and_x87_control_word_survive_whatever_the_guest_loads(workers, tmp_path):
    """A guest's MXCSR with reserved bits reached the thunk's LDMXCSR: #GP in the VMM.
    The worker compares its own MXCSR and x87 control word before and after (``vmm``)."""
    native, guest = outcomes(["mov dword ptr [rsp], 0xffffffff", "ldmxcsr dword ptr [rsp]", VPADDD,
                              "mov word ptr [rsp], 0", "fldcw word ptr [rsp]", VPADDD], workers, tmp_path)
    assert not guest.vmm, guest.vmm
    assert native.signal == "SIGSEGV"   # (the engine accepts LDMXCSR's reserved bits: README, Limits)


@needs_avx2
def test_code_rewritten_by_a_native_store_runs_as_rewritten():
    """A VMOVDQU store turns VPADDD into VPSUBD: the second pass must subtract (the
    translated block and the planted exit were the old instruction's)."""
    source = "\n".join([
        "mov eax, 1", "cpuid", "xor ecx, ecx", "xgetbv", "or eax, 7", "xsetbv",
        "mov eax, 5", "vmovd xmm1, eax", "vpbroadcastd ymm1, xmm1",
        "mov eax, 3", "vmovd xmm2, eax", "vpbroadcastd ymm2, xmm2",
        "mov r8d, 2",
        "again:",
        "patch: vpaddd ymm0, ymm1, ymm2",
        "vmovd eax, xmm0", "add al, 0x30", "out 0xe9, al",
        "vmovdqu xmm3, xmmword ptr [rip + patch]",
        "mov eax, 0xc2faf5c5",           # vpsubd ymm0, ymm1, ymm2
        "vpinsrd xmm3, xmm3, eax, 0",
        "vmovdqu xmmword ptr [rip + patch], xmm3",
        "dec r8d", "jnz again",
        "xor eax, eax", "out 0xf4, al"])
    image = GuestImage("smc", "asm", ((0x100000, assemble(source, "smc.asm")),), 0x100000)
    result = VM(image, "haswell").run(timeout=30)
    assert result.stop.reason == "exited", result.stop.message
    assert result.console == "82"


# ---- the allow-list ---------------------------------------------------------------------

def _decoded(text: str):
    return Decoder(64, bytes(Ks(KS_ARCH_X86, KS_MODE_64).asm(text)[0])).decode()


@pytest.mark.parametrize("text", [
    "rdfsbase rax", "wrgsbase rax", "wbinvd", "swapgs", "lgdt [rax]", "sgdt [rax]", "sldt ax", "str ax",
    "invlpg [rax]", "fldcw word ptr [rax]", "fnstenv [rax]", "fninit", "fld qword ptr [rax]",
    "ldmxcsr dword ptr [rax]", "stmxcsr dword ptr [rax]", "xsave [rax]", "rdtsc", "cpuid", "xgetbv",
    "push rax", "pop rax", "call rax", "div rcx", "movq mm0, qword ptr [rax]", "rdpkru", "rdrand rax",
    "mov rax, cr0", "mov ax, ds", "lar eax, ecx", "smsw eax",
    "movsb", "sysenter", "int 0x80", "popcnt rax, rcx"])
def test_what_is_not_on_the_allow_list_never_runs_natively(text):
    assert refusal(_decoded(text), wide=True), text


@pytest.mark.parametrize("text", [
    "vpaddd ymm0, ymm1, ymmword ptr [rax]", "bzhi rax, rsp, rcx", "vmovq xmm0, rsp", "add rax, qword ptr [rsi]",
    "paddd xmm0, xmmword ptr fs:[rax]", "vmovdqu ymm0, ymmword ptr [eax]", "pdep rax, rbx, rcx", "shlx rax, rbx, rcx"])
def test_confined_instructions_may_run_natively(text):
    assert refusal(_decoded(text), wide=True) is None, text


# ---- the fuzzer's short profile ---------------------------------------------------------

@needs_avx2
def test_the_native_executor_fuzzer_finds_no_escape_and_no_unexplained_difference():
    """python -m minivmm.testing.nativefuzz runs the long profile (README, Security)."""
    tally = nativefuzz.campaign(150, seed=7)
    assert tally.vmm_deaths == tally.vmm_troubles == tally.host_values == 0, tally.unexplained
    assert not tally.unexplained, tally.unexplained
    assert tally.agreed > tally.cases // 2


# ---- checks the engine leaves out --------------------------------------------------------

@needs_fsgsbase
@pytest.mark.parametrize("sequence, signal", [
    (["wrfsbase r14"], "SIGSEGV"),                      # R14: a non-canonical value (SDM Vol. 2D, WRFSBASE)
    (["wrgsbase rsi"], None),
    (["mov dword ptr [rsp], 0x10000", "ldmxcsr dword ptr [rsp]"], "SIGSEGV"),   # a reserved MXCSR bit
    (["mov dword ptr [rsp], 0xffbf", "ldmxcsr dword ptr [rsp]", "stmxcsr dword ptr [rsp + 8]"], None),
], ids=["wrfsbase-noncanonical", "wrgsbase", "ldmxcsr-reserved", "ldmxcsr"])
def test_what_the_engine_takes_unchecked_faults_as_on_the_cpu(sequence, signal, workers, tmp_path):
    assert_as_native(sequence, workers, tmp_path, signal=signal)


SNAN = ["mov word ptr [rsp], 0x40", "fldcw word ptr [rsp]", "mov dword ptr [rsp + 8], 0x7fa00000"]


@needs_avx2
@pytest.mark.parametrize("sequence, signal", [
    ([VPADDD, "mov word ptr [rsp], 0", "fldcw word ptr [rsp]", *SNAN[2:], "fld dword ptr [rsp + 8]",
      "fld dword ptr [rsp + 8]"], "SIGFPE"),                                                # #MF at the second FLD
    ([*SNAN, "fld dword ptr [rsp + 8]", "fnclex", "fldz"], None),                            # cleared in between
    ([*SNAN, "fld dword ptr [rsp + 8]", "fnclex", "fld dword ptr [rsp + 8]", "fldz"], "SIGFPE"),
    (["mov dword ptr [rsp + 8], 0x7fa00000", "fld dword ptr [rsp + 8]", "fld dword ptr [rsp + 8]"], None),  # masked
], ids=["after-avx", "cleared", "raised-again", "masked"])
def test_an_unmasked_x87_exception_is_the_guests_sigfpe(sequence, signal, workers, tmp_path):
    """SDM Vol. 1, 8.6: an unmasked x87 exception is raised (#MF) at the next waiting x87
    instruction; the engine records it and raises nothing; the VMM's own FPU never sees it."""
    assert_as_native(sequence, workers, tmp_path, signal=signal)


# ---- found by an adversarial review ------------------------------------------------------

SIGFPE_HANDLER = ("lea rax, [rip + h]; mov [rsp - 64], rax; mov qword ptr [rsp - 56], 0x04000000; mov [rsp - 48], rax; "
                  "mov qword ptr [rsp - 40], 0; mov eax, 13; mov edi, 8; lea rsi, [rsp - 64]; xor edx, edx; "
                  "mov r10d, 8; syscall; ")   # rt_sigaction(SIGFPE, handler = restorer = h: go on at h)
RWX_CODE = "mov eax, 10; mov edi, 0x400000; mov esi, 0x1000; mov edx, 7; syscall; "   # mprotect(code, RWX)


@needs_avx2
@pytest.mark.parametrize("sequence, signal", [
    ([VPADDD, "mov rcx, 0x4000000000000000", "bts qword ptr [rsi], rcx"], "SIGSEGV"),  # a bit 2^62 further
    ([VPADDD, "mov rcx, 70", "bts qword ptr [rsi], rcx", "bt qword ptr [rsi], rcx"], None),
    ([VPADDD, "mov eax, 0", "mov fs, eax", "mov ecx, gs"], None),                       # MOV Sreg: the VMM's own
    ([VPADDD, "mov rax, qword ptr [rsi]", bytes.fromhex("48a1") + (0x601000).to_bytes(8, "little")], None),  # moffs
    (["mov eax, 0x601000", "wrfsbase rax", "mov rdi, 0xfffffffffffff100", "vpcmpeqd xmm1, xmm1, xmm1",
      bytes.fromhex("64c5f9f7c1")], None),                                              # fs: vmaskmovdqu, wrapping
    ([RWX_CODE + "lea rax, [rip + t + 2]; mov ecx, 0; vpaddd ymm0, ymm1, ymm1; mov byte ptr [rax], 5; "
      "t: add ecx, 1"], None),                                                          # a run rewriting itself
], ids=["bts-far", "bts-near", "mov-sreg", "moffs", "vmaskmovdqu-fs", "run-rewrites-itself"])
def test_what_an_adversary_tried_runs_as_natively(sequence, signal, workers, tmp_path):
    assert_as_native(sequence, workers, tmp_path, signal=signal)


@needs_avx2
def test_a_store_before_an_unmasked_simd_exception_in_a_run_happens_once(workers, tmp_path):
    """ADD [rbx] then VDIVPS by zero with ZE unmasked: the handler (SIGFPE) sees [rbx] = 1.
    (The frames themselves differ: the machine's holds its own components.)"""
    counter = 4096 + 0x2800   # [rbx] in the dump: the data pages follow the registers' page
    native, guest = outcomes([SIGFPE_HANDLER + "mov rbx, 0x602800; mov qword ptr [rbx], 0; vpxor xmm4, xmm4, xmm4; "
                              "mov dword ptr [rbx + 8], 0x1d80; ldmxcsr [rbx + 8]; vpaddd ymm0, ymm1, ymm1; "
                              "add qword ptr [rbx], 1; vdivps xmm2, xmm3, xmm4; h: nop"], workers, tmp_path)
    assert native.signal is guest.signal is None and not guest.vmm
    assert native.dump[counter:counter + 8] == guest.dump[counter:counter + 8] == (1).to_bytes(8, "little")


@needs_avx2
def test_a_gather_with_a_32_bit_address_stops_as_unsupported_in_one_line(workers, tmp_path):
    """67h on a vector-indexed operand: each element's address wraps at 32 bits, which no
    rebased thunk does; refused, never run (README, Limits)."""
    _, guest = outcomes(["mov eax, 0x600010", "vmovd xmm1, eax", "vpbroadcastd ymm1, xmm1", "vpcmpeqd ymm2, ymm2, ymm2",
                         bytes.fromhex("67c4e26d90040df0ffffff")], workers, tmp_path)
    assert guest.vmm.startswith("stopped: vpgatherdd") and "cannot execute it exactly" in guest.vmm


@needs_avx2
def test_runs_compiled_before_xcr0_changed_are_not_reused():
    """XSETBV taking AVX state away makes the next VPADDD #UD (SDM Vol. 1, 13.3), even
    where a run over it was compiled while XCR0 allowed it."""
    source = "\n".join(["mov eax, 1", "cpuid", "mov r8d, 2", "mov edi, 7", "again:", "xor ecx, ecx", "xor edx, edx",
                        "mov eax, edi", "xsetbv", "pdep rax, rbx, rsi", "vpaddd ymm0, ymm1, ymm1", "mov edi, 3",
                        "dec r8d", "jnz again", "xor eax, eax", "out 0xf4, al"])
    image = GuestImage("xcr0", "asm", ((0x100000, assemble(source, "xcr0.asm")),), 0x100000)
    result = VM(image, "haswell").run(timeout=30)
    assert (result.stop.reason, result.stop.vector) == ("crashed", 6), result.stop.message


@needs_avx2
@pytest.mark.parametrize("host, wide", [("haswell", False), ("native", True)])
def test_a_signal_handler_starts_with_the_initial_fpu_state(host, wide, workers, tmp_path):
    """handle_signal's fpu__clear_user_states: MXCSR 0x1F80, FCW 0x37F, vectors zero in
    the handler (the frame keeps the program's). The registers' page of the dump only:
    the frames themselves differ in the components the machine has."""
    rng = random.Random(1)
    path = tmp_path / "case"
    path.write_bytes(nativefuzz.program([SIGFPE_HANDLER + "mov rbx, 0x602800; vpxor xmm4, xmm4, xmm4; "
                                         "mov dword ptr [rbx + 8], 0x1d80; ldmxcsr [rbx + 8]; "
                                         "vdivps xmm2, xmm3, xmm4; h: xor edx, edx; xor esi, esi; "
                                         "mov rsp, 0x601800"], rng, wide))
    path.chmod(0o755)
    native, guest = nativefuzz.native(str(path)), workers(host).run(str(path))
    assert guest is not None and not guest.vmm and native.signal is guest.signal is None
    assert guest.dump[:4096] == native.dump[:4096]
