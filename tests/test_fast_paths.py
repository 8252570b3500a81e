"""The fast paths give what the slow ones give. With MINIVMM_FAST_PATHS=0 every exit is
planted as before; with the fast paths, an exit the engine's own #UD reaches is left to
it (exits/refusals.py). The same guests, Linux programs and audits end the same way,
with the same console, exceptions and audit, either way; a refusal table that lies is
caught by the same comparison (the negative control)."""

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minivmm.cpu.native import machine_features
from minivmm.guests import shipped_guests_dir
from minivmm.guests.assembler import assemble
from minivmm.guests.loader import GuestImage
from minivmm.vmm.exits import traps
from minivmm.vmm.exits.refusals import SWITCH, EngineRefusals
from minivmm.vmm.vm import VM

VPXOR_YMM, VPXOR_XMM = "c5f5efc2", "c5f1efc2"          # vpxor ymm0, ymm1, ymm2 / the xmm form
VMOVDQU64_ZMM = "62f1fe486f07"                         # vmovdqu64 zmm0, [rdi]
POPCNT = "f30fb8c0"                                    # popcnt eax, eax


def _window(hex_bytes: str) -> tuple[bytes, int]:
    code = bytes.fromhex(hex_bytes)
    return code + b"\x90" * (15 - len(code)), len(code)


def test_the_engine_refuses_what_its_model_lacks_and_every_wide_vex_and_evex_form():
    """Measured on the engine (unicorn 2.1.4, QEMU 5.0's decoder): VEX.256 forms stop at
    VEX.L, EVEX is BOUND's invalid opcode in 64-bit mode, POPCNT needs the model's bit;
    VEX.128 forms run (as their legacy SSE forms: the exit stays planted)."""
    penryn, nehalem = EngineRefusals("PENRYN"), EngineRefusals("NEHALEM")
    assert penryn.refuses(*_window(VPXOR_YMM)) and penryn.refuses(*_window(VMOVDQU64_ZMM))
    assert penryn.refuses(*_window(POPCNT)) and not nehalem.refuses(*_window(POPCNT))
    assert not penryn.refuses(*_window(VPXOR_XMM))
    assert not penryn.refuses(*_window("0fa2"))                 # CPUID runs (its hook answers)


def test_a_probe_that_ran_leaves_nothing_for_the_next():
    """An instruction that runs may change the scratch engine (here XSETBV clearing
    XCR0's SSE bit would make the next SSE form #UD): each probe starts from the same
    state."""
    engine = EngineRefusals("SKYLAKE_SERVER")
    assert not engine.refuses(*_window("0f28c1"))        # movaps xmm0, xmm1
    assert not engine.refuses(*_window("0f01d1"))        # xsetbv (ecx = 0, eax = 0)
    assert not engine.refuses(*_window("0f28c2"))        # movaps xmm0, xmm2: still runs


# ---- the same ends either way -------------------------------------------------------------

def _asm(name: str, lines: list[str]) -> GuestImage:
    return GuestImage(name, "asm", ((0x100000, assemble("\n".join(lines), f"{name}.asm")),), 0x100000)


def _ends(result) -> tuple:
    stop = result.stop
    return (stop.reason, stop.vector, stop.rip, stop.missing_features, stop.message, result.console,
            result.exit_code, [(e["vector"], e["rip"], e["features"], e["delivered"]) for e in result.exceptions],
            result.audit, result.instructions)


def _both(monkeypatch, make, **run):
    monkeypatch.setenv(SWITCH, "0")
    slow = make().run(timeout=120, **run)
    monkeypatch.setenv(SWITCH, "1")
    fast = make().run(timeout=120, **run)
    if "unsupported" in (slow.stop.reason, fast.stop.reason):
        pytest.skip(f"this machine cannot run the host's instructions: {slow.stop.message}")
    return slow, fast


# An AVX guest: it enables YMM state where CPUID shows XSAVE and runs VEX.256 and
# VEX.128 forms (AVX and AVX2) whatever CPUID says of them.
ENABLE_YMM = ["xor ecx, ecx", "xgetbv", "or eax, 7", "xsetbv"]
AVX_WORK = ["mov eax, 0x01020304", "vmovd xmm1, eax", "vpbroadcastd ymm1, xmm1", "vpaddd ymm0, ymm1, ymm1",
             "vpxor xmm2, xmm0, xmm1", "vmovd eax, xmm2", "out 0xe9, al", "vzeroupper", "xor eax, eax",
             "out 0xf4, al"]
AVX_LINES = ["mov eax, 1", "cpuid", "bt ecx, 26", "jnc no_xsave", *ENABLE_YMM, "no_xsave:", *AVX_WORK]


@pytest.mark.parametrize("host", ["penryn", "nehalem", "haswell", "skylake-server"])
@pytest.mark.parametrize("guest", ["detect_ud", "dispatch_ud", "avx_proper", "lzcnt_pitfall", "detect_both", "avx"])
def test_shipped_guests_end_the_same_either_way(monkeypatch, guest, host):
    make = (lambda: VM(_asm("avx", AVX_LINES), host)) if guest == "avx" else (lambda: VM(guest, host))
    slow, fast = _both(monkeypatch, make)
    assert _ends(fast) == _ends(slow)


@pytest.mark.parametrize("counted", [False, True], ids=["free", "counted"])
def test_an_audit_and_a_count_are_the_same_either_way(monkeypatch, counted):
    """A Haswell under a Sandy Bridge view, audited: the AVX2 the guest executes is counted
    where the engine's refusal reaches the exit as where a planted exit fires; a counted
    run (every exit planted again) counts the same instructions."""
    slow, fast = _both(monkeypatch, lambda: VM(_asm("avx", AVX_LINES), "haswell", evc="intel-sandybridge"), audit=True,
                       max_insns=10**6 if counted else None)
    assert fast.audit and "avx2" in {f for entry in fast.audit for f in entry["features"]}
    assert _ends(fast) == _ends(slow)


def test_a_refusal_table_that_lies_is_caught(monkeypatch):
    """Negative control: told that the engine refuses everything, the fast path leaves
    VPXOR xmm (VEX.128, which the engine runs) unplanted on a Penryn. The guest then
    runs what Penryn lacks instead of taking #UD, and the comparison sees it."""
    monkeypatch.setattr(EngineRefusals, "refuses", lambda self, window, length: True)
    slow, fast = _both(monkeypatch, lambda: VM(_asm("vex128", ["vpxor xmm0, xmm0, xmm1", "xor eax, eax",
                                                               "out 0xf4, al"]), "penryn"))
    assert (slow.stop.reason, slow.stop.vector) == ("crashed", 6)
    assert fast.stop.reason == "exited" and _ends(fast) != _ends(slow)


needs_gcc = pytest.mark.skipif(not shutil.which("gcc"), reason="gcc is not installed: cannot build a Linux program")


@pytest.fixture(scope="module")
def probe_avx2(tmp_path_factory):
    out = tmp_path_factory.mktemp("fast") / "probe_avx2"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(out), str(shipped_guests_dir().joinpath("linux", "probe_avx2.c"))],
                   check=True)
    return str(out)


@needs_gcc
@pytest.mark.parametrize("host", ["penryn", "haswell"])
def test_a_counted_run_with_the_fast_paths_off(monkeypatch, probe_avx2, host):
    """Counting with hundreds of exits hooks them by page; without the fast paths the
    engine has no list of stops, and none is given to it."""
    slow, fast = _both(monkeypatch, lambda: VM(probe_avx2, host), max_insns=50_000_000)
    assert _ends(fast) == _ends(slow) and fast.exit_code == 0


@pytest.mark.parametrize("host", ["penryn", "haswell"])
def test_a_linux_program_probing_avx2_ends_the_same_either_way(monkeypatch, probe_avx2, host):
    slow, fast = _both(monkeypatch, lambda: VM(probe_avx2, host))
    assert _ends(fast) == _ends(slow) and fast.exit_code == 0


@pytest.mark.parametrize("host", ["penryn", "haswell", "skylake-server"])
def test_python_runs_the_same_either_way(monkeypatch, host):
    """The dynamic python3 of this machine, its glibc choosing string functions by the
    host's CPUID (AVX2 and EVEX ones on the later hosts)."""
    if "avx2" not in machine_features() and host != "penryn":
        pytest.skip("this machine has no AVX2: the host's glibc chooses functions it cannot run")
    program = "import hashlib, json; print(json.dumps(sorted({'b': 2, 'a': 1})), hashlib.sha256(b'x' * 999).hexdigest())"
    slow, fast = _both(monkeypatch, lambda: VM(sys.executable, host, argv=["-S", "-c", program], mounts=["/"]))
    assert _ends(fast) == _ends(slow) and fast.exit_code == 0 and fast.console.startswith('["a", "b"]')


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "words"
    rng = random.Random(7)
    path.write_text("".join(f"{rng.choice(['alpha', 'beta', 'gamma'])} {rng.randrange(10 ** 6)}\n" for _ in range(2000)))
    return str(path)


def _sort(host: str, text: str):
    return lambda: VM(shutil.which("sort"), host, argv=[text], mounts=["/"])


@pytest.mark.parametrize("host", ["penryn", "haswell"])
def test_a_program_runs_the_same_with_exits_unhooked_all_the_time(monkeypatch, host, text):
    """Eight to twelve pages' exits hooked at most: fetches of new pages unhook the
    older ones (dropping their translated blocks, ending the start), and a fetch of an
    old page hooks its exits again. sort (glibc's AVX2 string functions on haswell)
    ends as on the slow paths."""
    if "avx2" not in machine_features() and host != "penryn":
        pytest.skip("this machine has no AVX2: the host's glibc chooses functions it cannot run")
    evictions = []
    evict = traps.InstructionExits._evict
    monkeypatch.setattr(traps.InstructionExits, "_evict", lambda self, keep: (evictions.append(keep), evict(self, keep)))
    monkeypatch.setattr(traps, "RESIDENT_PAGES", 8)
    monkeypatch.setattr(traps, "MAX_RESIDENT_PAGES", 12)
    slow, fast = _both(monkeypatch, _sort(host, text))
    assert _ends(fast) == _ends(slow) and fast.exit_code == 0 and evictions
    assert fast.console == "".join(sorted(Path(text).read_text().splitlines(keepends=True)))


# Three rounds of: a VEX.128 add on a page of its own (xmm0 = xmm1 + xmm2 = 3, printed),
# then thirteen more pages each with a VEX.128 form: fourteen pages of exits, past the
# eight that stay hooked, so the add's page has lost its exits when the next round
# calls it. The engine would run the add as the legacy PADDD (xmm0 += xmm2: 5, 7).
ROUNDS_OF_PAGES = ENABLE_YMM + [
    "mov eax, 1", "movd xmm1, eax", "mov eax, 2", "movd xmm2, eax", "mov ebx, 3",
    "again:", "call add", "movd eax, xmm0", "add al, 0x30", "out 0xe9, al",
    *[f"call other{i}" for i in range(13)],
    "dec ebx", "jnz again", "xor eax, eax", "out 0xf4, al",
    ".p2align 12", "add:", "vpaddd xmm0, xmm1, xmm2", "ret",
    *[line for i in range(13) for line in (".p2align 12", f"other{i}:", "vpxor xmm5, xmm6, xmm7", "ret")]]


@pytest.mark.parametrize("flushed", [True, False])
def test_a_page_unhooked_runs_only_after_a_fetch_hooked_it_again(monkeypatch, flushed):
    """Evicted exits come back before their code runs again: the TLB is emptied after
    an eviction, so the next fetch of the page hooks them. Without that (the negative
    control) the add's block is translated again from the TLB's entry, without its
    exit, and the engine runs it as the legacy form."""
    if "avx" not in machine_features():
        pytest.skip("this machine has no AVX: the host's VEX forms cannot run")
    monkeypatch.setattr(traps, "RESIDENT_PAGES", 8)
    monkeypatch.setattr(traps, "MAX_RESIDENT_PAGES", 8)
    if not flushed:
        monkeypatch.setattr(traps.InstructionExits, "after_eviction", lambda self: None)
    slow, fast = _both(monkeypatch, lambda: VM(_asm("pages", ROUNDS_OF_PAGES), "haswell"))
    assert slow.console == "333"
    assert (fast.console == "333") is flushed, fast.console


# ---- runs taken in machine code (exits/quick.py) -----------------------------------------

# Three rounds of refused AVX2 forms (no memory operand) whose results show: the flags
# VPTEST sets (ZF and CF), the MXCSR flag a masked divide by zero raises, a lane of a sum; then the
# divide again with ZE unmasked, #XM (crashed: the guest has no IDT).
QUICK_LINES = ENABLE_YMM + [
    "mov eax, 0x00010002", "vmovd xmm1, eax", "vpbroadcastd ymm1, xmm1", "vpcmpeqd ymm2, ymm2, ymm2",
    "mov eax, 0x3f800000", "vmovd xmm3, eax", "vpbroadcastd ymm3, xmm3", "vpxor xmm4, xmm4, xmm4", "mov ebx, 3",
    "again:", "vpaddd ymm0, ymm0, ymm1", "vptest ymm2, ymm4", "pushfq", "pop rax", "and eax, 0x8d5",
    "call print_hex32", "vdivps ymm5, ymm3, ymm4", "stmxcsr dword ptr [rsp - 256]", "mov eax, dword ptr [rsp - 256]",
    "call print_hex32", "vextracti128 xmm6, ymm0, 1", "vmovd eax, xmm6", "call print_hex32", "dec ebx", "jnz again",
    "and dword ptr [rsp - 256], 0xfffffdff", "ldmxcsr dword ptr [rsp - 256]", "vdivps ymm5, ymm3, ymm4",
    "xor eax, eax", "out 0xf4, al", '.include "lib/console.inc"']


needs_avx2 = pytest.mark.skipif("avx2" not in machine_features(), reason="this machine has no AVX2")


@needs_avx2
def test_runs_taken_in_machine_code_give_what_python_gives(monkeypatch):
    slow, fast = _both(monkeypatch, lambda: VM(_asm("quick", QUICK_LINES), "haswell"))
    assert (fast.stop.reason, fast.stop.vector) == ("crashed", 19), fast.stop.message
    assert len(fast.console) == 3 * 3 * 8 and _ends(fast) == _ends(slow)


@needs_avx2
def test_a_stale_plan_is_caught(monkeypatch):
    """Negative control: every run taken by the machine code with the first one's
    instructions (the VPADDD's at the VPTEST too, ending where the VPTEST ends): the
    flags it prints are not the slow path's."""
    import copy

    from minivmm.vmm.exits.native import NativeExecutor
    real, first = NativeExecutor.quick_run, []

    def stale(self, address):
        thunk = real(self, address)
        if thunk is None or not first:
            first.extend([thunk] if thunk is not None else [])
            return thunk
        wrong = copy.copy(first[0])
        wrong.start, wrong.end = thunk.start, thunk.end
        return wrong
    monkeypatch.setattr(NativeExecutor, "quick_run", stale)
    slow, fast = _both(monkeypatch, lambda: VM(_asm("quick", QUICK_LINES), "haswell"))
    assert fast.console != slow.console


# Reads taken in machine code: an aligned load and a sum from memory, three times from
# moving addresses; then the same loads misaligned (#GP), or reaching past RAM (#PF).
def _reads(last_step: str) -> list[str]:
    return ENABLE_YMM + [
        "mov rdi, 0x200000", "mov ecx, 256", "fill:", "mov dword ptr [rdi], ecx", "add rdi, 4", "dec ecx",
        "jnz fill", "mov rsi, 0x200000", "mov ebx, 4", "again:", "vmovdqa ymm0, ymmword ptr [rsi]",
        "vpaddd ymm1, ymm0, ymmword ptr [rsi + 32]", "vmovd eax, xmm1", "call print_hex32", "add rsi, 64",
        "dec ebx", "cmp ebx, 1", "jne next", last_step, "next:", "test ebx, ebx", "jnz again",
        "xor eax, eax", "out 0xf4, al", '.include "lib/console.inc"']


@needs_avx2
@pytest.mark.parametrize("last_step, vector", [("add rsi, 16", 13), ("mov rsi, 0xffffe0", 14), ("nop", None)],
                         ids=["misaligned", "beyond-ram", "fine"])
def test_reads_taken_in_machine_code_fault_as_python_faults(monkeypatch, last_step, vector):
    slow, fast = _both(monkeypatch, lambda: VM(_asm("reads", _reads(last_step)), "haswell", memory="16M"))
    assert fast.stop.vector == vector and _ends(fast) == _ends(slow)
    assert fast.console.startswith("000001f8000001d8000001b8")   # 256 + 248, 240 + 232, 224 + 216


# ---- what the engine would run for the guest: never what the host lacks ---------------------

def _hidden_lock(instruction: bytes) -> list[str]:
    """``instruction`` (LOCK-prefixed) where a linear sweep of the page does not find it:
    inside what the sweep reads as MOV EAX, imm32; reached by a jump."""
    return ["jmp main", ".byte 0xb8", "target:", ".byte " + ", ".join(hex(b) for b in instruction), "jmp after",
            "main:", "lea rcx, [rip + value]", "xor eax, eax", "jmp target", "after:", "xor eax, eax",
            "out 0xf4, al", "value: .byte 0x11, 0x22, 0x33, 0x44"]


@pytest.mark.parametrize("host, instruction, missing", [
    ("opteron-g5", "f00f38f001", ["movbe"]),     # LOCK MOVBE: the engine would run MOVBE, which the host lacks
    ("haswell", "f0660f3800c1", []),             # LOCK PSHUFB: the engine would leave its stack in YMM0's top
], ids=["lock-movbe", "lock-pshufb"])
def test_a_misused_lock_on_what_the_engine_must_not_run_is_ud_wherever_it_hides(monkeypatch, host, instruction,
                                                                                missing):
    slow, fast = _both(monkeypatch, lambda: VM(_asm("lock", _hidden_lock(bytes.fromhex(instruction))), host))
    assert (fast.stop.reason, fast.stop.vector, fast.stop.missing_features) == ("crashed", 6, missing)
    assert _ends(fast) == _ends(slow)


def test_an_undefined_vex_encoding_is_ud_where_the_engine_would_run_a_legacy_instruction(monkeypatch):
    """VEX 0F38 F0 /r (MOVBE's legacy opcode) defines nothing: #UD on every CPU, where
    the engine's EPYC model runs MOVBE, which an Opteron G5 lacks."""
    slow, fast = _both(monkeypatch, lambda: VM(_asm("vex", ["lea rcx, [rip + value]", ".byte 0xc4, 0xe2, 0x78, 0xf0, 0x01",
                                                            "xor eax, eax", "out 0xf4, al", "value: .quad 0"]),
                                               "opteron-g5"))
    assert (fast.stop.reason, fast.stop.vector) == ("crashed", 6) and _ends(fast) == _ends(slow)


@pytest.mark.parametrize("host, flip, missing", [("penryn", 0x71, ["avx"]), ("penryn", 0x75, ["avx2"])],
                         ids=["vex128", "vex256"])
def test_an_instruction_completed_in_the_next_page_is_decoded_as_it_now_is(monkeypatch, host, flip, missing):
    """C4 at a page's last byte, the rest of VPXOR in the next page: the guest rewrites
    VEX.L there (ymm, refused by the engine, to xmm, which the engine runs): its exit
    is decided again from the bytes the instruction now has."""
    lines = ["lea rdi, [rip + tail]", f"mov byte ptr [rdi + 1], {flip:#x}", "jmp head", ".fill 0xfff - 0x10, 1, 0x90",
             "head:", ".byte 0xc4", "tail:", ".byte 0xe1, 0x75, 0xef, 0xc2", "xor eax, eax", "out 0xf4, al"]
    image = _asm("cross", lines)
    assert (image.segments[0][0] + image.segments[0][1].index(bytes.fromhex("c4e175efc2"))) % 4096 == 4095
    slow, fast = _both(monkeypatch, lambda: VM(image, host))
    assert (fast.stop.reason, fast.stop.vector, fast.stop.missing_features) == ("crashed", 6, missing)
    assert _ends(fast) == _ends(slow)


@needs_avx2
def test_plans_go_when_the_thunks_code_is_freed(monkeypatch):
    """The executor starts its code arenas over when they are full (here after a few
    dozen runs): a plan made before must not call into the freed code. A routine that
    adds [rsi] = 1 into YMM0 runs three times (its plan is made), then many other runs
    are compiled, then the routine three times more: 6 either way."""
    from minivmm.vmm.exits import native
    monkeypatch.setattr(native, "CODE_ARENA", 8192)
    monkeypatch.setattr(native, "MAX_ARENAS", 2)
    others = [line for k in range(64) for line in (f"vpaddd ymm1, ymm1, ymm{2 + k % 8}", f"jmp other{k}", f"other{k}:")]
    lines = ENABLE_YMM + ["mov rsi, 0x200000", "mov dword ptr [rsi], 1", "vpxor xmm0, xmm0, xmm0",
                          "call add", "call add", "call add", *others, "call add", "call add", "call add",
                          "vmovd eax, xmm0", "call print_hex32", "xor eax, eax", "out 0xf4, al",
                          "add:", "vpaddd ymm0, ymm0, ymmword ptr [rsi]", "ret", '.include "lib/console.inc"']
    slow, fast = _both(monkeypatch, lambda: VM(_asm("arenas", lines), "haswell"))
    assert fast.console == slow.console == "00000006" and _ends(fast) == _ends(slow)
