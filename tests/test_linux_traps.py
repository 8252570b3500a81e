"""Traps and kernel entries as Linux takes them: the x87 exception flags the engine
leaves out (FCOMI, FUCOMI, FISTTP) and the #MF an unmasked one raises; INT n through
the kernel's IDT, the 32-bit system calls (INT $0x80, SYSENTER), SYSCALL whatever RSP
holds; the XSAVE features arch_prctl reports and permits, and sigaltstack's checks. The
oracle is the machine's own kernel and CPU: each program prints the same lines, and
ends the same way, natively and under minivmm."""

import subprocess
from pathlib import Path

import pytest
from test_linux import needs_gcc
from test_linux_kernel_checks import native, under_minivmm

DATA = Path(__file__).parent / "data" / "linux"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """program name -> its static binary, built once."""
    out = tmp_path_factory.mktemp("traps")

    def build(name: str) -> str:
        target = out / name
        if not target.exists():
            done = subprocess.run(["gcc", "-static", "-O1", "-o", str(target), str(DATA / f"{name}.c")],
                                  capture_output=True, text=True, check=False)
            if done.returncode:
                pytest.skip(f"gcc -static failed (no static glibc?): {done.stderr.strip()[:200]}")
        return str(target)
    return build


@needs_gcc
def test_x87_exception_flags_and_their_mf_are_the_machines(built):
    """Masked: FCOMI's #IA for any NaN, FUCOMI's for a signalling one, both for an
    unsupported format or an empty register (#IS), #D for a denormal; FISTTP's #P when
    it truncates, #IA and the integer indefinite when the value does not fit. Unmasked:
    SIGFPE at the next FWAIT with the exception's si_code, the compare's EFLAGS set but
    no pop, FISTTP neither storing nor popping (SDM Vol. 2A, FCOMI, FISTTP; Vol. 1, 8.6)."""
    program = built("x87_flags")
    assert under_minivmm(program, "haswell") == native(program)


@needs_gcc
@pytest.mark.parametrize("host", ["nehalem", "haswell"])
def test_a_handler_reads_and_changes_the_x87_stack_in_its_frame(built, host):
    """The frame's ST(0)..ST(7) are in stack order, the abridged tag word by physical
    register (SDM Vol. 1, Table 10-2), and the program starts with every register empty
    (fpstate_init); what the handler writes to ST(0) is ST(0) after rt_sigreturn. On
    FXSAVE (nehalem) and XSAVE (haswell) frames."""
    program = built("x87_frame")
    assert under_minivmm(program, host) == native(program)


@needs_gcc
def test_int_n_int_0x80_sysenter_and_syscall_are_the_kernels(built):
    """INT n through a gate of DPL 0 is #GP(n * 8 + 2) at the INT, SIGSEGV (INT $6
    included, which the engine reports as #UD); INT3, INT $3 and INT $4 trap after it
    (arch/x86/kernel/idt.c); INT $0x80 is the 32-bit write, getpid, brk, and ENOSYS for
    what the table lacks; SYSENTER, on the machine's vendor, is the 32-bit call with its
    return faulting in 32-bit code at the vDSO's landing pad (Intel) or #UD (AMD); SYSCALL
    needs no user stack. On the "native" host, whose vendor is the machine's."""
    program = built("gates")
    assert under_minivmm(program, "native") == native(program)


@needs_gcc
def test_xsave_permissions_and_sigaltstack_are_the_kernels(built):
    """ARCH_GET_XCOMP_SUPP/PERM and their guest forms from the view as Linux computes
    them (arch/x86/kernel/fpu/xstate.c); ARCH_REQ_XCOMP_PERM: EOPNOTSUPP but for AMX's
    tile data where the CPU has it, EINVAL past the last feature, ENOSPC while the
    alternate stack would not hold the frame. sigaltstack: ENOMEM below MINSIGSTKSZ (and,
    with AMX permitted, up to the frame), EINVAL for an unknown mode, EPERM on it; a frame
    that does not fit (AVX-512's, where the machine has it) is SIGSEGV. On the "native"
    host: the machine's own features."""
    program = built("xstate_perm")
    expected = native(program)
    if expected[0].startswith("this kernel predates"):
        pytest.skip("this machine's kernel predates ARCH_GET_XCOMP_SUPP (Linux 5.16)")
    assert under_minivmm(program, "native") == expected
