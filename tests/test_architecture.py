"""Privileged mistakes fault as the manuals say, on every profile, through the guest IDT.

Each case cites the Intel SDM (Vol. 2 instruction pages, Vol. 3A system chapters) or the
AMD APM. The harness installs handlers that power off with the vector as status and
print the error code's low byte; a body that runs to its end powers off with 1.
"""

import pytest

from minivmm.cpu.native import machine_features
from minivmm.cpu.profiles import builtin_names

HARNESS = """
    lea rax, [rip + on_ud]
    mov ecx, 6
    call install_gate
    lea rax, [rip + on_df]
    mov ecx, 8
    call install_gate
    lea rax, [rip + on_np]
    mov ecx, 11
    call install_gate
    lea rax, [rip + on_gp]
    mov ecx, 13
    call install_gate
    lea rax, [rip + on_pf]
    mov ecx, 14
    call install_gate
{body}
    mov al, 1
    out 0xf4, al
on_ud:
    mov al, 6
    out 0xf4, al
on_df:
    pop rbx
    mov al, bl
    out 0xe9, al
    mov al, 8
    out 0xf4, al
on_np:
    pop rbx
    mov al, bl
    out 0xe9, al
    mov al, 11
    out 0xf4, al
on_gp:
    pop rbx
    mov al, bl
    out 0xe9, al
    mov al, 13
    out 0xf4, al
on_pf:
    pop rbx
    mov al, bl
    out 0xe9, al
    mov al, 14
    out 0xf4, al
.include "lib/idt.inc"
"""


def outcome(run_asm, body, host="nehalem", **options):
    result = run_asm(HARNESS.format(body=body), host, **options)
    assert result.stop.reason == "exited", result.stop.message
    return result.stop.status, result.console.encode("latin-1")


ALL = builtin_names()


@pytest.mark.parametrize("host", ALL)
def test_rdmsr_and_wrmsr_of_an_msr_that_does_not_exist_are_gp0(run_asm, host):
    """SDM Vol. 2B, RDMSR/WRMSR: #GP(0) if ECX specifies a reserved or unimplemented MSR."""
    assert outcome(run_asm, "mov ecx, 0x12345678\nrdmsr", host) == (13, b"\0")
    assert outcome(run_asm, "mov ecx, 0x12345678\nxor eax, eax\nxor edx, edx\nwrmsr", host) == (13, b"\0")


@pytest.mark.parametrize("host", ["penryn", "epyc"])
def test_msrs_that_exist_still_work(run_asm, host):
    """The control: EFER reads and writes back; STAR takes a value and returns it."""
    body = """
        mov ecx, 0xc0000080
        rdmsr
        wrmsr
        mov ecx, 0xc0000081
        mov eax, 0x11223344
        mov edx, 0x00230010
        wrmsr
        xor eax, eax
        rdmsr
        cmp eax, 0x11223344
        jne bad
        mov al, 1
        out 0xf4, al
    bad:
        mov al, 2
        out 0xf4, al
    """
    assert outcome(run_asm, body, host) == (1, b"")


def test_wrmsr_of_a_non_canonical_base_or_reserved_efer_bits_is_gp0(run_asm):
    """SDM Vol. 2B, WRMSR: #GP(0) for a non-canonical value in an address MSR, or a 1 in
    a reserved bit (EFER bit 3 is reserved, Vol. 4 Table 2-2)."""
    assert outcome(run_asm, "mov ecx, 0xc0000100\nxor eax, eax\nmov edx, 0x00800000\nwrmsr")[0] == 13
    assert outcome(run_asm, "mov ecx, 0xc0000080\nrdmsr\nor eax, 8\nwrmsr")[0] == 13


@pytest.mark.parametrize("host", ALL)
def test_mov_cr0_zero_in_long_mode_is_gp0(run_asm, host):
    """SDM Vol. 2B, MOV to CR0 (64-bit mode exceptions): #GP(0) for an attempt to clear
    CR0.PG or to leave protected mode, or an invalid combination (NW=1, CD=0)."""
    assert outcome(run_asm, "xor eax, eax\nmov cr0, rax", host) == (13, b"\0")
    assert outcome(run_asm, "mov rax, cr0\nbts eax, 29\nbtr eax, 30\nmov cr0, rax", host)[0] == 13
    assert outcome(run_asm, "mov rax, cr0\nmov cr0, rax", host) == (1, b"")  # the control


@pytest.mark.parametrize("host", ALL)
def test_reserved_cr4_bits_are_gp0(run_asm, host):
    """SDM Vol. 3A, 2.5: setting a reserved CR4 bit (bit 15 on every CPU) is #GP(0)."""
    assert outcome(run_asm, "mov rax, cr4\nbts eax, 15\nmov cr4, rax", host) == (13, b"\0")
    assert outcome(run_asm, "mov rax, cr4\nmov cr4, rax", host) == (1, b"")


def test_cr4_bits_of_features_the_cpu_lacks_are_reserved(run_asm):
    """SDM Vol. 3A, 2.5: CR4.PKE (bit 22) exists only with CPUID.7.0:ECX.PKU; likewise
    FSGSBASE (16) with CPUID.7.0:EBX[0]. Penryn has neither."""
    assert outcome(run_asm, "mov rax, cr4\nbts eax, 22\nmov cr4, rax", "penryn")[0] == 13
    assert outcome(run_asm, "mov rax, cr4\nbts eax, 16\nmov cr4, rax", "penryn")[0] == 13


def test_cr3_beyond_the_physical_address_width_is_gp0(run_asm):
    """SDM Vol. 2B, MOV to CR3: #GP(0) if a reserved bit (above MAXPHYADDR) is set."""
    assert outcome(run_asm, "mov rax, 0x4000000000000000\nmov cr3, rax") == (13, b"\0")


@pytest.mark.parametrize("host", ["nehalem", "epyc", "opteron-g2"])
def test_syscall_with_efer_sce_clear_is_ud(run_asm, host):
    """SDM Vol. 2B, SYSCALL: #UD if IA32_EFER.SCE = 0 (the boot state)."""
    assert outcome(run_asm, "syscall", host)[0] == 6


def test_syscall_with_sce_set_enters_lstar_with_the_return_address_in_rcx(run_asm):
    """SDM Vol. 2B, SYSCALL: RCX <- RIP of the next instruction, R11 <- RFLAGS,
    RIP <- IA32_LSTAR, RFLAGS &= ~IA32_FMASK."""
    body = """
        mov ecx, 0xc0000080
        rdmsr
        or eax, 1
        wrmsr
        mov ecx, 0xc0000082
        lea rax, [rip + entry]
        mov rdx, rax
        shr rdx, 32
        wrmsr
        mov ecx, 0xc0000081
        xor eax, eax
        mov edx, 0x00000008
        wrmsr
        syscall
    after:
        mov al, 3
        out 0xf4, al
    entry:
        lea rax, [rip + after]
        cmp rcx, rax
        jne wrong
        mov al, 42
        out 0xf4, al
    wrong:
        mov al, 4
        out 0xf4, al
    """
    assert outcome(run_asm, body)[0] == 42


@pytest.mark.parametrize("host", ["opteron-g3", "epyc", "epyc-rome", "dump:Hygon-C86-7185-32-core"])
def test_sysenter_in_long_mode_on_amd_is_ud(run_asm, host):
    """AMD APM Vol. 3, SYSENTER: #UD in long mode (Hygon's Dhyana is AMD's Zen)."""
    assert outcome(run_asm, "mov ecx, 0x174\nmov eax, 8\nxor edx, edx\nwrmsr\nsysenter", host)[0] == 6


def test_sysenter_on_intel_with_a_null_sysenter_cs_is_gp0(run_asm):
    """SDM Vol. 2B, SYSENTER: #GP(0) if IA32_SYSENTER_CS[15:2] = 0."""
    assert outcome(run_asm, "sysenter", "haswell") == (13, b"\0")


@pytest.mark.parametrize("host", ["nehalem", "haswell", "epyc"])
def test_rdpmc_at_cpl0_is_not_ud(run_asm, host):
    """SDM Vol. 2B, RDPMC: at CPL 0 it reads the counter; #GP(0) only for an index the
    CPU does not have. QEMU's TCG raises #UD for every RDPMC; the hardware does not."""
    assert outcome(run_asm, "xor ecx, ecx\nrdpmc", host) == (1, b"")
    assert outcome(run_asm, "mov ecx, 0x1000\nrdpmc", host) == (13, b"\0")


GATE_WITH_SELECTOR = """
    lea rax, [rip + never]
    mov ecx, 3
    call install_gate
    lea rdi, [rip + idt_table + 3 * 16]
    mov word ptr [rdi + 2], {selector}
    int3
    mov al, 1
    out 0xf4, al
never:
    mov al, 99
    out 0xf4, al
"""


@pytest.mark.parametrize("selector, error", [(0x18, 0x18), (0x10, 0x10), (0x0c, 0x0c)])
def test_a_gate_with_a_bad_selector_raises_gp_with_the_selector(run_asm, selector, error):
    """SDM Vol. 3A, 6.12.1.1 and 6.14: a gate's selector beyond the GDT (0x18), naming
    a data segment (0x10) or the LDT (TI=1, kept in the error code) is #GP(selector); INT3 is a software
    interrupt, so EXT is 0."""
    status, console = outcome(run_asm, GATE_WITH_SELECTOR.format(selector=selector))
    assert (status, console) == (13, bytes([error]))


def test_a_gate_whose_code_segment_is_not_present_raises_np(run_asm):
    """SDM Vol. 3A, 6.12.1.1: a not-present code segment is #NP(selector). The guest's
    own GDT adds, at 0x18, a 64-bit code segment with P = 0."""
    body = """
        lea rdi, [rip + gdt]
        mov [rip + gdtr + 2], rdi
        lgdt [rip + gdtr]
    """ + GATE_WITH_SELECTOR.format(selector=0x18) + """
    .align 8
    gdt: .quad 0, 0x00209A0000000000, 0x0000920000000000, 0x00201A0000000000
    gdtr: .word 31
        .quad 0
    """
    assert outcome(run_asm, body) == (11, b"\x18")


def test_a_fault_delivered_through_a_bad_gate_after_gp_is_a_double_fault(run_asm):
    """SDM Vol. 3A, 6.15 Table 6-5: #GP while delivering #GP (both contributory) is #DF."""
    body = """
        lea rdi, [rip + idt_table + 13 * 16]
        mov word ptr [rdi + 2], 0x18
        mov ecx, 0x12345678
        rdmsr
    """
    assert outcome(run_asm, body)[0] == 8


def test_a_fetch_past_the_end_of_ram_saves_the_faulting_instructions_rip(run_asm):
    """SDM Vol. 3A, 6.5: a fault's saved RIP is the faulting instruction. Here an
    instruction straddles the end of RAM; the engine reports the start of its block."""
    body = """
        mov rsp, 0x1f0000
        mov rdi, 0x1ffffc
        mov dword ptr [rdi], 0xb8909090
        lea rax, [rip + saved_rip]
        mov ecx, 14
        call install_gate
        jmp rdi
    saved_rip:
        pop rbx
        pop rax
        cmp rax, 0x1fffff
        jne wrong
        cmp rbx, 0x10
        jne wrong
        mov al, 0
        out 0xf4, al
    wrong:
        mov al, 5
        out 0xf4, al
    """
    assert outcome(run_asm, body, memory="2M")[0] == 0


def test_every_iced_feature_maps_to_the_catalogue_or_is_listed_with_a_reason():
    import iced_x86

    from minivmm.cpu import isa
    from minivmm.cpu.features import catalogue
    unmapped = sorted(name for name in vars(iced_x86.CpuidFeature) if name.isupper()
                      and name not in isa.BASELINE and name not in isa.DELIBERATELY_UNMAPPED
                      and catalogue().get(isa.ICED_TO_LINUX.get(name, name.lower())) is None)
    assert unmapped == []
    assert all(catalogue().get(isa.ICED_TO_LINUX.get(name, name.lower())) is None
               for name in isa.DELIBERATELY_UNMAPPED), "a listed feature has a catalogue name now: map it"


def test_vpmadd52luq_on_icelake_server_needs_avx512ifma_which_the_host_has(run_asm):
    """Ice Lake server has AVX512_IFMA: with the AVX-512 state enabled, the instruction
    runs on the machine's CPU where it has AVX512_IFMA, and otherwise reaches the
    engine's limit (unsupported, naming avx512ifma), never a #UD claiming that
    icelake-server lacks it."""
    result = run_asm("""
        xor ecx, ecx
        xor edx, edx
        mov eax, 0xe7
        xsetbv
        .byte 0x62, 0xf2, 0xf5, 0x48, 0xb4, 0xc2   ; vpmadd52luq zmm0, zmm1, zmm2
        hlt
    """, "icelake-server")
    if "avx512ifma" in machine_features():
        assert result.stop.reason == "halted", result.stop
    else:
        assert result.stop.reason == "unsupported" and "avx512ifma" in result.stop.missing_features, result.stop
