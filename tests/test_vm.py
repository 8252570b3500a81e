"""The run loop: exits, CPUID answers, crashes, budgets, and a VMM that survives them."""

import pytest

from minivmm.cpu.profiles import load_profile
from minivmm.vmm.vm import VM, parse_size

CPUID_THEN_EXIT = """
    mov eax, {leaf}
    mov ecx, {subleaf}
    cpuid
    out 0xf4, al
"""


def cpuid_seen(run_asm, host, leaf, subleaf=0):
    result = run_asm(CPUID_THEN_EXIT.format(leaf=leaf, subleaf=subleaf), host)
    exit_ = result.cpuid_exits[-1]
    return exit_["eax"], exit_["ebx"], exit_["ecx"], exit_["edx"]


def test_every_cpuid_exits_and_is_recorded_with_its_host(run_asm):
    result = run_asm("""
        mov esi, 5
    again:
        mov eax, 1
        cpuid
        dec esi
        jnz again
        mov eax, 0x80000001
        cpuid
        out 0xf4, al
    """, "westmere")
    assert [(e["leaf"], e["host"]) for e in result.cpuid_exits] == [(1, "westmere")] * 5 + [(0x80000001, "westmere")]
    assert result.cpuid_leaves() == [(1, 0), (0x80000001, 0)]


def test_guest_registers_hold_the_answer(run_asm):
    # The guest prints the vendor string it read: the answer reached its registers.
    result = run_asm("""
        xor eax, eax
        cpuid
        mov [rsp - 12], ebx
        mov [rsp - 8], edx
        mov [rsp - 4], ecx
        lea rsi, [rsp - 12]
        mov ecx, 12
    p:  lodsb
        out 0xe9, al
        loop p
        out 0xf4, al
    """, "epyc")
    assert result.console == "AuthenticAMD"


def test_intel_leaf_beyond_maximum_returns_highest_basic_leaf(run_asm):
    top = load_profile("nehalem").cpuid.max_basic
    highest = cpuid_seen(run_asm, "nehalem", top)
    assert highest != (0, 0, 0, 0)
    assert cpuid_seen(run_asm, "nehalem", top + 1) == highest
    assert cpuid_seen(run_asm, "nehalem", 0x8FFFFFFF) == highest


def test_amd_leaf_beyond_maximum_returns_zeros(run_asm):
    assert cpuid_seen(run_asm, "epyc", 0x7FFFFFF0) == (0, 0, 0, 0)


def test_subleaf_is_ignored_on_leaves_that_do_not_take_one(run_asm):
    assert cpuid_seen(run_asm, "haswell", 1, 5) == cpuid_seen(run_asm, "haswell", 1, 0)
    assert cpuid_seen(run_asm, "haswell", 4, 1) != cpuid_seen(run_asm, "haswell", 4, 0)


def test_hypervisor_leaf_names_minivmm(run_asm):
    eax, ebx, ecx, edx = cpuid_seen(run_asm, "penryn", 0x40000000)
    assert eax == 0x40000000
    assert b"".join(r.to_bytes(4, "little") for r in (ebx, ecx, edx)).rstrip(b"\0") == b"minivmm"


def test_osxsave_mirrors_cr4_and_xcr0_is_x87_sse(run_asm):
    source = """
        mov eax, 1
        cpuid
        bt ecx, 27
        jnc no_osxsave
        xor ecx, ecx
        xgetbv
        out 0xf4, al            ; status = XCR0
    no_osxsave:
        mov al, 0xee
        out 0xf4, al
    """
    assert run_asm(source, "sandybridge").stop.status == 3
    assert run_asm(source, "penryn").stop.status == 0xEE
    # Clearing CR4.OSXSAVE in the guest clears the CPUID bit.
    result = run_asm("""
        mov rax, cr4
        btr rax, 18
        mov cr4, rax
        mov eax, 1
        cpuid
        shr ecx, 27
        and ecx, 1
        mov eax, ecx
        out 0xf4, al
    """, "haswell")
    assert result.stop.status == 0


def test_hlt_ends_the_run_halted(run_asm):
    result = run_asm("mov al, 65\nout 0xe9, al\nhlt\nout 0xe9, al")
    assert result.stop.reason == "halted" and result.exit_code == 0 and result.console == "A"


def test_unknown_ports_read_all_ones_and_writes_are_counted(run_asm):
    result = run_asm("""
        in al, 0x60
        mov bl, al
        in ax, 0x61
        out 0x80, al
        out 0x80, al
        in al, 0xe9             ; debugcon presence check
        add al, bl
        out 0xf4, al
    """)
    assert result.stop.status == (0xFF + 0xE9) & 0xFF
    assert result.unknown_port_writes == {0x80: 2}


def test_checkpoints_are_counted(run_asm):
    assert run_asm("out 0xf5, al\nout 0xf5, eax\nhlt").checkpoints == 2


def test_jump_to_unmapped_memory_crashes_cleanly(run_asm):
    result = run_asm("mov rax, 0x40000000\njmp rax")
    assert result.stop.reason == "crashed" and result.exit_code == 125
    assert "beyond guest RAM" in result.stop.message


def test_write_beyond_ram_crashes_cleanly(run_asm):
    result = run_asm("mov rax, 0x7000000\nmov qword ptr [rax], 1\nhlt")
    assert result.stop.reason == "crashed" and "write to 0x7000000" in result.stop.message


def test_fault_without_idt_crashes_with_vector_and_instruction(run_asm):
    result = run_asm("nop\nud2")
    assert result.stop.reason == "crashed" and result.stop.vector == 6
    assert result.stop.instruction == "ud2" and result.stop.rip == 0x100001


def test_instruction_outside_the_engine_isa_names_the_missing_feature(run_asm):
    result = run_asm("popcnt rax, rbx\nhlt", "penryn")
    assert result.stop.vector == 6 and result.stop.missing_features == ["popcnt"]
    assert "penryn lacks" in result.stop.message


def test_triple_fault_is_a_crash(run_asm):
    # An IDT whose gates point nowhere: the first fault cannot be delivered.
    result = run_asm("""
        lea rax, [rip + idtr]
        lidt [rax]
        xor edx, edx
        div edx
    idtr: .word 0xfff
          .quad 0x3000
    """)
    assert result.stop.reason == "crashed" and result.stop.vector == 0


def test_endless_loop_hits_the_time_budget(run_asm):
    result = run_asm("l: jmp l", timeout=0.5)
    assert result.stop.reason == "limit" and result.exit_code == 124


@pytest.mark.parametrize("timeout", ["0.000001", "0.3"])
def test_a_deadline_between_engine_starts_still_ends_the_run(timeout):
    """Pre-copy starts the engine many times: a stop that lands between two starts used
    to be lost, and the guest ran on forever after the move."""
    from helpers import minivmm_cli
    done = minivmm_cli("run", "dirty_loop", "--memory", "64M", "--migrate", "westmere@checkpoint:1",
                       "--timeout", timeout, timeout=60)
    assert done.returncode == 124, done.stderr


def test_endless_loop_hits_the_instruction_budget_exactly(asm_guest):
    result = VM(asm_guest("l: inc rbx\njmp l"), "nehalem").run(max_insns=100_001)
    assert result.stop.reason == "limit" and result.instructions == 100_001


def test_vmm_stays_healthy_after_crashes_in_the_same_process(run_asm):
    for source in ("jmp qword ptr [0x40000000]", "ud2", "l: jmp l"):
        assert run_asm(source, timeout=0.3).stop.reason in ("crashed", "limit")
    assert run_asm("mov al, 9\nout 0xf4, al").stop.status == 9


def test_an_exception_in_the_vmm_is_raised_not_swallowed(asm_guest, monkeypatch):
    vm = VM(asm_guest("cpuid\nhlt"), "nehalem")

    def broken(*_):
        raise RuntimeError("view exploded")

    monkeypatch.setattr(vm.view, "answer", broken)
    with pytest.raises(RuntimeError, match="view exploded"):
        vm.run(timeout=2)


def test_an_exception_in_a_tlb_fill_is_raised_not_swallowed(asm_guest, monkeypatch):
    """The fill is a raw C callback: what it raises must still reach the caller."""
    from minivmm.vmm.exits import traps

    def broken(*_):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(traps.InstructionExits, "_decode_page", broken)
    with pytest.raises(RuntimeError, match="decoder exploded"):
        VM(asm_guest("hlt"), "nehalem").run(timeout=2)


@pytest.mark.parametrize("text, size", [("16M", 16 << 20), ("1G", 1 << 30), ("65536", 65536), ("64MiB", 64 << 20)])
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_memory_option_moves_the_stack(run_asm):
    result = run_asm("mov rax, rsp\nshr rax, 20\nout 0xf4, al", memory="64M")
    assert result.stop.status == 64
