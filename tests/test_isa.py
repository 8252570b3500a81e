"""Each host executes exactly its physical ISA; #UD and other faults reach the guest's
IDT as the architecture delivers them; the audit finds guideline violations."""

import functools
import struct

import pytest
from iced_x86 import Code, Decoder
from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
from unicorn.x86_const import UC_CPU_X86_HASWELL, UC_X86_REG_CR4, UC_X86_REG_XMM0, UC_X86_REG_XMM1, UC_X86_REG_XMM2

from minivmm.cpu import isa
from minivmm.cpu.native import machine_features
from minivmm.cpu.profiles import builtin_names, engine_models, load_profile
from minivmm.guests.assembler import assemble
from minivmm.guests.loader import GuestImage
from minivmm.vmm.vm import VM

# Instruction, the feature the vendors' manuals say it needs. iced-x86 must agree.
INSTRUCTIONS = [
    ("haddps xmm0, xmm1", "pni"), ("pshufb xmm0, xmm1", "ssse3"), ("ptest xmm0, xmm1", "sse4_1"),
    ("crc32 eax, ebx", "sse4_2"), ("popcnt rax, rbx", "popcnt"), ("aesenc xmm0, xmm1", "aes"),
    ("pclmulqdq xmm0, xmm1, 0", "pclmulqdq"), ("movbe eax, dword ptr [rsp - 8]", "movbe"),
    ("andn eax, ebx, ecx", "bmi1"), ("pdep eax, ebx, ecx", "bmi2"), ("adcx eax, ebx", "adx"),
    ("rdrand eax", "rdrand"), ("rdseed eax", "rdseed"), ("rdtscp", "rdtscp"), ("xgetbv", "xsave"),
    ("xsaveopt [rsp - 4096]", "xsaveopt"), ("clflushopt [rsp - 64]", "clflushopt"), ("clwb [rsp - 64]", "clwb"),
    ("lahf", "lahf_lm"), ("cmpxchg16b [rsp - 64]", "cx16"), ("extrq xmm0, xmm1", "sse4a"),
    ("prefetchw byte ptr [rsp - 64]", "3dnowprefetch"), ("pfadd mm0, mm1", "3dnow"), ("vaddps xmm0, xmm1, xmm2", "avx"),
    ("vpaddd ymm0, ymm1, ymm2", "avx2"), ("vfmadd132ps xmm0, xmm1, xmm2", "fma"),
    ("vcvtph2ps xmm0, xmm1", "f16c"), ("sha1rnds4 xmm0, xmm1, 0", "sha_ni"),
    ("vaddps zmm0, zmm1, zmm2", "avx512f"), ("vprotb xmm0, xmm1, xmm2", "xop"),
    ("vfmaddps xmm0, xmm1, xmm2, xmm3", "fma4"), ("blcfill eax, ebx", "tbm"),
]
# Its own IDT: #UD (vector 6) powers off with status 6; running on powers off with 0.
# Like an OS, it first enables every state component the CPU reports (XCR0 from
# CPUID.(0DH,0):EAX), so that AVX instructions are not #UD for want of YMM state.
HARNESS = """
    mov eax, 1
    cpuid
    bt ecx, 27
    jnc no_xsave
    mov eax, 0xd
    xor ecx, ecx
    cpuid
    and eax, 0xe7
    xor edx, edx
    xor ecx, ecx
    xsetbv
no_xsave:
    lea rax, [rip + on_ud]
    mov ecx, 6
    call install_gate
    xor ecx, ecx
    {instruction}
    xor eax, eax
    out 0xf4, al
on_ud:
    mov al, 6
    out 0xf4, al
.include "lib/idt.inc"
"""


@functools.cache
def image(instruction: str) -> GuestImage:
    code = assemble(HARNESS.format(instruction=instruction), "harness.asm")
    return GuestImage(instruction, "asm", ((0x100000, code),), 0x100000)


def expected(host, feature: str, instruction: str) -> str:
    if feature not in host.physical:
        if feature == "abm":
            return "runs"
        return "#UD"
    if feature in isa.engine_capable():
        return "runs"
    # what the engine cannot execute, the machine's own CPU does
    return "runs" if feature in machine_features() else "unsupported"


def outcome(result) -> str:
    if result.stop.reason == "unsupported":
        return "unsupported"
    assert result.stop.reason == "exited", result.stop.message
    return {0: "runs", 6: "#UD"}[result.stop.status]


@pytest.mark.parametrize("instruction, feature", INSTRUCTIONS)
def test_iced_x86_agrees_on_the_feature(instruction, feature):
    code = assemble(instruction)
    assert isa.needed_features(Decoder(64, code).decode()) == {feature}


@pytest.mark.parametrize("host", builtin_names())
def test_each_host_executes_exactly_its_physical_isa(host):
    profile = load_profile(host)
    table = {instr: (expected(profile, feature, instr), outcome(VM(image(instr), profile).run(timeout=10)))
             for instr, feature in INSTRUCTIONS}
    wrong = {i: t for i, t in table.items() if t[0] != t[1]}
    assert not wrong, f"{host}: expected vs got {wrong}"


def test_the_table_has_at_least_25_features_and_both_outcomes():
    assert len({f for _, f in INSTRUCTIONS}) >= 25
    outcomes = {expected(load_profile(h), f, i) for h in builtin_names() for i, f in INSTRUCTIONS}
    # "unsupported" where a host has what neither the engine nor this machine executes
    lacking = {f for h in builtin_names() for f in load_profile(h).physical
               if f in {f for _, f in INSTRUCTIONS} - isa.engine_capable() - machine_features()}
    assert outcomes == {"runs", "#UD"} | ({"unsupported"} if lacking else set())


def test_dump_profiles_on_a_wider_engine_model_still_fault():
    """A Xeon 5110 runs on an engine model with POPCNT; the host does not have it."""
    xeon = load_profile("dump:Xeon-5110")
    assert "popcnt" in engine_models()[xeon.engine_model]
    assert outcome(VM(image("popcnt rax, rbx"), xeon).run(timeout=5)) == "#UD"


VADDPS_VALUE = """
    mov eax, 1
    cpuid
    bt ecx, 27
    jnc done
    xor ecx, ecx
    xgetbv
    or eax, 7
    xsetbv
    mov eax, 1
    cvtsi2ss xmm0, eax
    mov eax, 4
    cvtsi2ss xmm1, eax
    mov eax, 8
    cvtsi2ss xmm2, eax
    vaddps xmm0, xmm1, xmm2
    cvttss2si eax, xmm0
done:
    out 0xf4, al
"""


def test_vaddps_never_gives_the_engines_wrong_answer():
    """VEX.128 VADDPS xmm0, xmm1, xmm2 is xmm1 + xmm2 = 12; the engine alone computes
    xmm0 + xmm2 = 9 (VEX.vvvv ignored). On every AVX host it gives 12, run by the
    machine's own CPU, or it stops as unsupported where the machine lacks AVX."""
    code = assemble(VADDPS_VALUE, "vaddps.asm")
    for host in [h for h in builtin_names() if load_profile(h).has("avx")]:  # the others: #UD, above
        result = VM(GuestImage("vaddps", "asm", ((0x100000, code),), 0x100000), host).run(timeout=5)
        if "avx" in machine_features():
            assert (result.stop.reason, result.stop.status) == ("exited", 12), (host, result.stop.message)
        else:
            assert result.stop.reason == "unsupported", host


def test_avx_without_ymm_state_in_xcr0_is_ud_even_where_the_cpu_has_avx():
    """SDM Vol. 1, 13.3: VEX instructions raise #UD unless XCR0[2:1] = 11b. The boot
    state enables x87|SSE only, so the naive check (CPUID's AVX bit alone) crashes into
    #UD on Sandy Bridge; the complete check (OSXSAVE, XGETBV) takes the SSE2 path. The
    harness above, which enables YMM state first, is the control: there VADDPS is not #UD."""
    result = VM("avx_proper", "sandybridge").run(timeout=10)
    assert "naive check (avx bit only): avx" in result.console
    assert "naive path's vaddps: #UD" in result.console
    avx = result.detections["avx"]
    assert (avx.cpuid, avx.probe, avx.uses) == (True, False, "sse2")
    assert [e["name"] for e in result.exceptions] == ["#UD"] and result.exceptions[0]["delivered"]
    on_penryn = VM("avx_proper", "penryn").run(timeout=10)
    assert on_penryn.detections["avx"].probe is None and not on_penryn.exceptions


def test_xcr0_is_found_in_the_engine_context():
    from minivmm.vmm import engine
    assert engine._calibrate_xcr0() is not None


@pytest.mark.parametrize("host", ["core2", "penryn", "opteron-g1"])
def test_reserved_nop_space_runs_as_nop_without_its_feature(host):
    """GCC's CET code starts functions with ENDBR64: a NOP on CPUs without CET; RDSSP
    likewise. iced-x86 says they need the feature and the host lacks it: they still run."""
    for code, feature in ((b"\xf3\x0f\x1e\xfa", "ibt"), (b"\xf3\x48\x0f\x1e\xc8", "shstk")):  # endbr64; rdsspq rax
        assert isa.needed_features(Decoder(64, code).decode()) == {feature}
        assert not load_profile(host).has(feature)
        instruction = ".byte " + ", ".join(f"0x{b:02x}" for b in code)
        assert outcome(VM(image(instruction), host).run(timeout=5)) == "runs", (host, feature)


def test_negative_control_bare_engine_miscomputes_vaddps():
    """Without the gate, the engine ignores VEX.vvvv: xmm0 = xmm0 + xmm2, not xmm1 + xmm2."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.ctl_set_cpu_model(UC_CPU_X86_HASWELL)
    uc.mem_map(0, 0x10000)
    uc.reg_write(UC_X86_REG_CR4, 0x600)
    floats = lambda *v: int.from_bytes(struct.pack("<4f", *v), "little")  # noqa: E731
    uc.reg_write(UC_X86_REG_XMM0, floats(100, 100, 100, 100))
    uc.reg_write(UC_X86_REG_XMM1, floats(1, 1, 1, 1))
    uc.reg_write(UC_X86_REG_XMM2, floats(2, 2, 2, 2))
    code = assemble("vaddps xmm0, xmm1, xmm2", address=0x1000)
    uc.mem_write(0x1000, code)
    uc.emu_start(0x1000, 0x1000 + len(code))
    assert uc.reg_read(UC_X86_REG_XMM0) == floats(102, 102, 102, 102)  # wrong: should be 3.0


def test_lzcnt_runs_as_bsr_without_abm():
    assert VM("lzcnt_pitfall", "haswell").run(timeout=5).stop.status == 31
    assert VM("lzcnt_pitfall", "penryn").run(timeout=5).stop.status == 0
    # The engine model of this dump has ABM: minivmm computes the BSR itself.
    assert VM("lzcnt_pitfall", "dump:Xeon-5110").run(timeout=5).stop.status == 0


def test_bsr_emulation_of_memory_operands_and_zero(run_asm):
    result = run_asm("""
        mov qword ptr [rsp - 8], 0x100
        lzcnt rax, qword ptr [rsp - 8]    ; as BSR: 8
        mov rbx, 0x55
        xor ecx, ecx
        lzcnt rbx, rcx                    ; BSR of 0: ZF=1, destination unchanged
        jnz bad
        cmp rbx, 0x55
        jne bad
        tzcnt edx, eax                    ; as BSF of 8: 3
        add eax, edx
        out 0xf4, al
    bad:
        mov al, 0xbb
        out 0xf4, al
    """, "dump:Xeon-5110")
    assert result.stop.status == 11


# ---- exception delivery ----------------------------------------------------------------

IDT_GUEST = """
    lea rdi, [rip + idt]
    mov ecx, {vector}
    shl ecx, 4
    lea rax, [rip + handler]
    mov word ptr [rdi + rcx], ax
    mov word ptr [rdi + rcx + 2], 8
    mov word ptr [rdi + rcx + 4], {gate_type}
    shr rax, 16
    mov word ptr [rdi + rcx + 6], ax
    shr rax, 16
    mov dword ptr [rdi + rcx + 8], eax
    lea rax, [rip + idtr]
    mov word ptr [rax], {limit}
    mov qword ptr [rax + 2], rdi
    lidt [rax]
    mov r12, rsp
    {body}
handler:
    {handler}
.align 8
idtr: .fill 10, 1, 0
.align 16
idt: .fill 512, 1, 0
"""


def idt_guest(run_asm, body, handler, vector, host="nehalem", gate_type="0x8e00", limit=511, **kw):
    return run_asm(IDT_GUEST.format(body=body, handler=handler, vector=vector, gate_type=gate_type,
                                    limit=limit), host, **kw)


def test_ud_frame_is_architectural_and_iretq_returns(run_asm):
    # The handler checks the frame: RIP at the faulting instruction, CS 8, SS 0x10,
    # the old RSP, IF clear in the handler; then skips ud2 (2 bytes) and returns.
    result = idt_guest(run_asm, body="""
        pushfq
        pop r13
    fault:
        ud2
        mov al, 42
        out 0xf4, al
    """, handler="""
        lea rax, [rip + fault]
        cmp [rsp], rax
        jne bad
        cmp qword ptr [rsp + 8], 8
        jne bad
        cmp [rsp + 16], r13
        jne bad
        cmp [rsp + 24], r12
        jne bad
        cmp qword ptr [rsp + 32], 0x10
        jne bad
        add qword ptr [rsp], 2
        iretq
    bad:
        mov al, 1
        out 0xf4, al
    """, vector=6)
    assert result.stop.status == 42
    assert result.exceptions == [{"vector": 6, "name": "#UD", "rip": result.exceptions[0]["rip"],
                                  "instruction": "ud2", "features": [], "delivered": True, "host": "nehalem"}]


def test_repeated_divide_errors_stay_divide_errors(run_asm):
    """The engine's stale exception state would turn the second #DE into #DF."""
    result = idt_guest(run_asm, body="""
        xor ecx, ecx
        mov r14d, 5
    again:
        xor eax, eax
        div ecx
        dec r14d
        jnz again
        mov al, 77
        out 0xf4, al
    """, handler="""
        add qword ptr [rsp], 2
        iretq
    """, vector=0)
    assert result.stop.status == 77
    assert [e["vector"] for e in result.exceptions] == [0] * 5


def test_general_protection_fault_pushes_an_error_code(run_asm):
    result = idt_guest(run_asm, body="""
        mov rax, 0x8000000000000000
        mov rbx, [rax]              ; non-canonical: #GP(0)
        mov al, 1
        out 0xf4, al
    """, handler="""
        cmp qword ptr [rsp], 0      ; the error code, then RIP
        jne bad
        mov al, 13
        out 0xf4, al
    bad:
        mov al, 2
        out 0xf4, al
    """, vector=13)
    assert result.stop.status == 13


def test_int3_is_a_trap_with_rip_after_it(run_asm):
    result = idt_guest(run_asm, body="""
        int3
    after:
        mov al, 1
        out 0xf4, al
    """, handler="""
        lea rax, [rip + after]
        cmp [rsp], rax
        jne bad
        mov al, 3
        out 0xf4, al
    bad:
        mov al, 9
        out 0xf4, al
    """, vector=3)
    assert result.stop.status == 3


def test_access_beyond_ram_is_a_page_fault_with_cr2(run_asm):
    result = idt_guest(run_asm, body="""
        mov rbx, 0x7000000
        mov qword ptr [rbx], 1
    """, handler="""
        mov rax, cr2
        cmp rax, 0x7000000
        jne bad
        cmp qword ptr [rsp], 2      ; error code: a write to a not-present page
        jne bad
        mov al, 14
        out 0xf4, al
    bad:
        mov al, 1
        out 0xf4, al
    """, vector=14)
    assert result.stop.status == 14


@pytest.mark.parametrize("gate_type, limit, handler_at, reason", [
    ("0x8e00", 16 * 6 - 1, None, "IDT limit 0x5f does not cover vector 6"),
    ("0x0e00", 511, None, "IDT gate 6 is not present"),
    ("0x8c00", 511, None, "not a 64-bit interrupt or trap gate"),
    ("0x8e00", 511, "0x40000000", "outside guest RAM"),
])
def test_malformed_idt_crashes_with_the_reason(run_asm, gate_type, limit, handler_at, reason):
    handler = "nop" if handler_at is None else ""
    body = "ud2"
    if handler_at:
        body = f"mov dword ptr [rdi + 104], 0\n    mov word ptr [rdi + 102], {int(handler_at, 16) >> 16}\n    ud2"
    result = idt_guest(run_asm, body=body, handler=handler, vector=6, gate_type=gate_type, limit=limit)
    assert result.stop.reason == "crashed" and result.exit_code == 125
    assert reason in result.stop.message and result.stop.vector == 6


def test_a_guest_that_faults_forever_hits_the_budget(run_asm):
    result = idt_guest(run_asm, body="ud2", handler="iretq", vector=6, timeout=0.5)  # re-executes ud2
    assert result.stop.reason == "limit"
    assert len(result.exceptions) > 10


def test_stack_beyond_ram_is_a_triple_fault(run_asm):
    result = idt_guest(run_asm, body="mov rsp, 0x7000000\n    ud2", handler="nop", vector=6)
    assert result.stop.reason == "crashed" and "stack" in result.stop.message


# ---- the gate and self-modifying code ---------------------------------------------------

def test_code_written_at_run_time_is_gated(run_asm):
    """Write POPCNT over NOPs, then run it: on Penryn it must fault, not execute."""
    source = """
        lea rdi, [rip + slot]
        mov dword ptr [rdi], 0xc3b80ff3     ; f3 0f b8 c3 = popcnt eax, ebx
        mov ebx, 0xff
    slot:
        nop
        nop
        nop
        nop
        out 0xf4, al
    """
    assert run_asm(source, "penryn").stop.vector == 6
    assert run_asm(source, "nehalem").stop.status == 8
    untouched = source.replace("mov dword ptr [rdi], 0xc3b80ff3", "nop")
    assert run_asm(untouched, "penryn").stop.reason == "exited"  # negative control: NOPs run


# ---- the seed's point and the audit -----------------------------------------------------

def detection(host, evc=None, guest="detect_both"):
    return VM(guest, host, evc=evc).run(timeout=20).detections


def test_masked_but_executable_under_evc():
    nehalem_as_penryn = detection("nehalem", "intel-penryn")["popcnt"]
    assert (nehalem_as_penryn.cpuid, nehalem_as_penryn.probe) == (False, True)
    penryn = detection("penryn")["popcnt"]
    assert (penryn.cpuid, penryn.probe) == (False, False)


def test_detect_ud_uses_what_it_finds():
    found = detection("nehalem", "intel-penryn", guest="detect_ud")
    assert found["popcnt"].uses == "popcnt" and not found["popcnt"].cpuid
    assert detection("nehalem", "intel-penryn", guest="detect_cpuid")["popcnt"].uses == "generic"


def test_audit_reports_the_unasked_popcnt(run_asm, asm_guest):
    guest = asm_guest("""
        mov ecx, 3
    l:  popcnt eax, ebx
        loop l
        xor eax, eax
        out 0xf4, al
    """)
    result = VM(guest, "nehalem", evc="intel-penryn").run(timeout=5, audit=True)
    assert result.stop.reason == "exited"  # the host executes it...
    assert [(a["instruction"], a["features"], a["count"]) for a in result.audit] == [("popcnt eax, ebx", ["popcnt"], 3)]
    clean = VM(guest, "nehalem").run(timeout=5, audit=True)
    assert clean.audit == []  # ...and without the mask it is no violation


def test_audit_of_a_cpuid_guided_guest_is_clean():
    assert VM("detect_cpuid", "nehalem", evc="intel-penryn").run(timeout=10, audit=True).audit == []


def test_audit_counts_a_hot_instruction_up_to_its_limit_then_lets_it_run():
    """dispatch_ud's loop runs PMULLD millions of times under a mask hiding SSE4.1: the
    audit counts 1000 executions, says there were more, and the run's result is the
    same as without auditing (counting stops; the loop runs at engine speed)."""
    plain = VM("dispatch_ud", "penryn", evc="intel-merom").run(timeout=60)
    audited = VM("dispatch_ud", "penryn", evc="intel-merom").run(timeout=60, audit=True)
    hot = {a["instruction"]: a for a in audited.audit}["pmulld xmm0, xmm1"]
    assert hot["count"] == 1000 and hot["more"] and hot["features"] == ["sse4_1"]
    assert audited.console == plain.console and audited.memory_sha256 == plain.memory_sha256


def test_audit_counts_stay_exact_below_the_limit_across_counted_runs(asm_guest):
    guest = asm_guest("mov ecx, 10\nl: popcnt eax, ebx\ndec ecx\njnz l\nhlt")
    result = VM(guest, "nehalem", evc="intel-penryn").run(audit=True, max_insns=1_000_000, timeout=10)
    assert [(a["count"], a["more"]) for a in result.audit] == [(10, False)] and result.instructions == 32


def _code_pages(path: str, limit: int) -> list[bytes]:
    """Up to ``limit`` pages (plus the 15 bytes after each) of an ELF's executable segments."""
    data = open(path, "rb").read()
    phoff, phnum = struct.unpack_from("<Q", data, 32)[0], struct.unpack_from("<H", data, 56)[0]
    pages = []
    for i in range(phnum):
        kind, flags, offset, _, _, size = struct.unpack_from("<IIQQQQ", data, phoff + 56 * i)
        if kind == 1 and flags & 1:
            pages += [data[at:at + 4096 + 15] for at in range(offset, offset + size, 4096)]
    step = max(len(pages) // limit, 1)
    return pages[::step][:limit]


@pytest.mark.parametrize("binary", ["/bin/busybox", "/lib/x86_64-linux-gnu/libc.so.6"])
def test_decoding_only_candidate_offsets_plants_every_exit_the_full_superset_does(binary):
    """The exits of a page come from decoding the offsets where an instruction that can
    exit may start (an 0F/VEX/EVEX/XOP/LAHF/SAHF/HLT/OUT opcode after up to 14
    prefixes): on real code, for hosts old and new, with and without auditing, exactly
    the exits of decoding every offset."""
    import os
    from minivmm.masking.view import GuestCpuidView
    from minivmm.vmm.exits.traps import exit_candidates
    if not os.path.exists(binary):
        pytest.skip(f"{binary} is not on this machine")
    classifiers = []
    for host, evc, audit in (("core2", None, False), ("opteron-g1", None, False), ("nehalem", "intel-merom", True),
                             ("sandybridge", None, False), ("haswell", None, True), ("epyc-rome", None, False)):
        profile = load_profile(host)
        classifiers.append(VM("hello", profile).classifier(profile, GuestCpuidView.for_host(profile, evc), audit))
    for data in _code_pages(binary, 24):
        decoder = Decoder(64, data, ip=0)

        def exits(offsets, classify):
            found = {}
            for offset in offsets:
                decoder.position, decoder.ip = offset, offset
                action, audited = classify(decoder.decode())
                if action or audited:
                    found[offset] = (action, audited)
            return found
        candidates, _ = exit_candidates(data, 0, 4096)
        assert len(candidates) < 4096 // 2
        for classify in classifiers:
            assert exits(sorted(candidates), classify) == exits(range(4096), classify)


def test_no_one_byte_opcode_outside_the_candidates_needs_a_feature_or_exits():
    """The whole one-byte opcode map (every first byte after any usual prefix, every
    ModRM): what does not start with a candidate opcode needs no CPUID feature and is
    neither HLT nor OUT, so no exit is ever lost by decoding only the candidates."""
    from iced_x86 import Mnemonic
    from minivmm.vmm.exits.traps import OPCODES
    for prefix in (b"", b"\x66", b"\xf2", b"\xf3", b"\x48", b"\xf3\x48"):
        for opcode in range(256):
            for modrm in range(256):
                code = prefix + bytes([opcode, modrm]) + bytes(13)
                if OPCODES.match(code, len(prefix)) or opcode in b"\x26\x2e\x36\x3e\x64\x65\x66\x67\xf0\xf2\xf3" \
                        or 0x40 <= opcode < 0x50:
                    continue
                instr = Decoder(64, code, ip=0).decode()
                assert not isa.needed_features(instr) and instr.mnemonic not in (Mnemonic.HLT, Mnemonic.OUT), \
                    (code[:len(prefix) + 2].hex(), str(instr))


def _classifiers(linux: bool):
    """(name, classify) for hosts old and new, with and without auditing."""
    import sys
    from minivmm.masking.view import GuestCpuidView
    for host, evc, audit in (("core2", None, False), ("opteron-g1", None, False), ("nehalem", "intel-merom", True),
                             ("haswell", None, True), ("skylake-server", None, False), ("epyc-rome", None, False)):
        profile = load_profile(host)
        vm = VM(sys.executable, profile, mounts=["/"]) if linux else VM("hello", profile)
        yield f"{host} {evc} {audit}", vm.classifier(profile, GuestCpuidView.for_host(profile, evc), audit)


LEFT_OUT_0F = (0x1F, *range(0x40, 0x50), *range(0x80, 0xA0), 0xAF, 0xB6, 0xB7, 0xBE, 0xBF)


def test_the_0f_rows_left_out_of_the_candidates_never_exit():
    """NOP, Jcc, SETcc, CMOVcc, IMUL, MOVZX and MOVSX after any usual prefix, every ModRM:
    no feature, no exit, on any host, audited or not (OPCODES leaves them out)."""
    from minivmm.vmm.exits.traps import OPCODES
    classifiers = [c for linux in (False, True) for c in _classifiers(linux)]
    for second in LEFT_OUT_0F:
        assert not OPCODES.match(bytes([0x0F, second]))
        for prefix in (b"", b"\x66", b"\xf2", b"\xf3", b"\x48", b"\xf3\x48", b"\x66\x48", b"\x2e"):
            for modrm in range(256):
                instr = Decoder(64, prefix + bytes([0x0F, second, modrm]) + bytes(12), ip=0).decode()
                assert not isa.needed_features(instr), str(instr)
                for name, classify in classifiers:
                    assert classify(instr) == (None, frozenset()), (name, str(instr))


@pytest.mark.parametrize("linux", [False, True], ids=["guest", "linux"])
def test_swept_only_opcodes_exit_only_where_a_sweep_finds_them(linux):
    """Every instruction after a swept-only opcode byte (every ModRM, the usual
    prefixes; after LOCK, every opcode the other candidates do not cover) exits only as
    traps.swept allows, or is a misused LOCK: so decoding those offsets only where a
    linear sweep starts an instruction loses no exit that must be exact."""
    from minivmm.vmm.exits.traps import OPCODES, swept
    for name, classify in _classifiers(linux):
        for opcode in classify.swept_only:
            seconds = [b for b in range(256) if not OPCODES.match(bytes([b, 0]))] if opcode == 0xF0 else [None]
            modrms = range(0, 256, 7) if opcode == 0xF0 else range(256)   # every mod and reg, some r/m
            for prefix in (b"", b"\x66", b"\x48", b"\xf2", b"\xf3"):
                for second in seconds:
                    for modrm in modrms:
                        body = bytes([opcode, modrm] if second is None else [opcode, second, modrm])
                        code = prefix + body + bytes(12)
                        instr = Decoder(64, code, ip=0).decode()
                        if instr.code == Code.INVALID:
                            continue  # no exit, or a misused LOCK (swept, as traps._update does)
                        action, audited = classify(instr)
                        assert not audited and (action is None or swept(action, instr)), (name, code[:4].hex(),
                                                                                          str(instr), action)


def machine_verdict(instruction: str) -> str:
    """The instruction on this machine's own CPU, in a child process: "#UD" if it dies
    of SIGILL, "runs" if it returns (RCX = 0 first, as in the guest harness; the stack
    64-byte aligned, as the guest's)."""
    import ctypes
    import faulthandler
    import mmap
    import os
    import signal
    from keystone import KS_ARCH_X86, KS_MODE_64, Ks
    code = bytes(Ks(KS_ARCH_X86, KS_MODE_64).asm(
        f"push rbp; mov rbp, rsp; and rsp, -64; xor ecx, ecx; {instruction}; "
        "mov rsp, rbp; pop rbp; ret")[0])
    page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    function = ctypes.CFUNCTYPE(None)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
    child = os.fork()
    if child == 0:
        faulthandler.disable()  # the SIGILL is the answer, not a crash to report
        function()
        os._exit(0)
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGILL, f"{instruction}: the machine raised signal {os.WTERMSIG(status)}"
        return "#UD"
    return "runs"


@pytest.mark.parametrize("instruction, feature", INSTRUCTIONS, ids=[i for i, _ in INSTRUCTIONS])
def test_the_machine_itself_is_the_oracle_of_the_ud_gate(instruction, feature):
    """Each instruction of the table runs or is #UD on the emulated native profile
    exactly as on this machine's CPU (the native profile is the machine's CPUID): what
    the machine has runs (the engine or the machine's CPU executing it), what it lacks
    is #UD in both."""
    on_machine = machine_verdict(instruction)
    emulated = outcome(VM(image(instruction), "native").run(timeout=10))
    assert on_machine == ("runs" if feature in machine_features() else "#UD")
    assert emulated == on_machine, f"{instruction}: the machine says {on_machine}, the emulated native profile {emulated}"


def test_the_oracle_catches_a_gate_that_is_wrong_negative_control():
    """A native profile that wrongly lacks POPCNT makes the emulator say #UD where the
    machine runs it: the comparison above would fail."""
    import dataclasses
    native = load_profile("native")
    if "popcnt" not in native.physical:
        pytest.skip("this machine has no POPCNT")
    wrong = dataclasses.replace(native, physical=native.physical - {"popcnt"})
    assert machine_verdict("popcnt rax, rbx") == "runs"
    assert outcome(VM(image("popcnt rax, rbx"), wrong).run(timeout=10)) == "#UD"


def test_the_engine_keeps_upper_halves_after_every_legacy_sse_form_but_those_it_exits_on():
    """A legacy SSE instruction leaves bits 511:128 of its destination unchanged (SDM
    Vol. 1, 14.1.3). The engine writes a whole register from a 16-byte result after two
    forms, leaving its own stack contents there (host pointers a guest could read): those
    exit where YMM exists (isa.UPPER_CLOBBERED) and run on the machine's CPU."""
    import iced_x86 as iced
    from iced_x86 import Code, EncodingKind, Encoder, Instruction, OpCodeInfo, Register
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc, UcError
    from unicorn import x86_const as x86

    kinds = {v: k for k, v in vars(iced.OpCodeOperandKind).items() if k.isupper()}
    names = {v: k for k, v in vars(iced.CpuidFeature).items() if k.isupper()}
    sse = {"SSE", "SSE2", "SSE3", "SSSE3", "SSE4_1", "SSE4_2", "AES", "PCLMULQDQ", "SHA", "GFNI"}
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x20000)
    uc.reg_write(x86.UC_X86_REG_CR4, 0x40600)   # OSFXSR, OSXMMEXCPT, OSXSAVE
    clobbering, tried = set(), 0
    for code in (c for n, c in vars(Code).items() if n.isupper() and c != Code.INVALID):
        info = OpCodeInfo(code)
        form = [kinds[info.op_kind(i)] for i in range(info.op_count)]
        features = {names[f] for f in Instruction.create(code).cpuid_features()}
        if not (info.mode64 and info.encoding == EncodingKind.LEGACY and features and features <= sse
                and form and form[0].startswith("XMM") and all(k.startswith("XMM") or k == "IMM8" for k in form)):
            continue
        operands = [Register.XMM5 if i == 0 else Register.XMM9 + i if k.startswith("XMM") else 0x1B
                    for i, k in enumerate(form)]
        pattern = "_".join("reg" if k.startswith("XMM") else "u32" for k in form)
        encoder = Encoder(64)
        encoder.encode(getattr(Instruction, f"create_{pattern}")(code, *operands), 0x1000)
        body = encoder.take_buffer()
        uc.mem_write(0x1000, body)
        for r in range(16):
            uc.reg_write(getattr(x86, f"UC_X86_REG_ZMM{r}"), int.from_bytes(bytes([0xA0 + r]) * 64, "little"))
        try:
            uc.emu_start(0x1000, 0x1000 + len(body), count=1)
        except UcError:  # beyond the engine's model: it never runs the form
            continue
        tried += 1
        if uc.reg_read(x86.UC_X86_REG_ZMM5).to_bytes(64, "little")[16:] != b"\xa5" * 48:
            clobbering.add(code)
    assert tried > 200
    assert clobbering == isa.UPPER_CLOBBERED


@pytest.mark.parametrize("instruction", ["fnstsw ax", "fstsw ax", ".byte 0xdb, 0xe4"], ids=["fnstsw", "fstsw", "fnsetpm"])
def test_the_287s_additions_run_everywhere(instruction):
    """FNSTSW AX came with the 287 and every x86-64 CPU has it (glibc's long double
    printf reads the FXAM result with it); FNSETPM is a no-op since the 387 (SDM Vol. 2A,
    FSTSW; Vol. 1, 8.3.13). The machine runs both; so do the oldest and an AMD profile."""
    assert machine_verdict(instruction) == "runs"
    for host in ("core2", "opteron-g1"):
        assert outcome(VM(image(instruction), host).run(timeout=10)) == "runs", host
