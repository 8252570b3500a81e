"""What Linux refuses, minivmm refuses: a signal frame rt_sigreturn must not restore
(bad CS or SS, a non-canonical RIP, reserved MXCSR bits, a bad XSAVE header), a frame
that cannot be written, an instruction only CPL 0 may execute. The oracle is the
machine's own kernel: refusals.c prints the same lines, and dies of the same signal,
natively and under minivmm. Costs grow with the work: the address space's structure
is checked against brute force, and a runaway ABI guest stays small."""

import os
import random
import re
import subprocess
from pathlib import Path

import pytest
from helpers import measured_cli
from test_linux import build, needs_gcc

from minivmm.cpu.native import machine_features
from minivmm.linux import memory
from minivmm.linux.errno import SyscallError
from minivmm.vmm.vm import VM

# MODE of refusals.c: a broken frame, a frame that cannot be written, a CPL 0 instruction
FRAMES = ["cs", "ss", "ss-lenient", "rip", "eflags", "mxcsr", "fpnull", "magic", "xcomp", "xstate-bv",
          "reserved"]
NO_ROOM = ["read-only", "unmapped", "unmapped-ud", "nested"]
RING0 = ["rdmsr", "wrmsr", "movcr4", "movcr0", "rdpmc", "hlt", "cli", "out"]
# Without XSAVE the frame has no XSAVE header, and its smaller frames nest deeper on the
# alternate stack than the machine's do before they overflow it.
FXSAVE_ONLY = [m for m in FRAMES + NO_ROOM + RING0 if m not in ("magic", "xcomp", "xstate-bv", "reserved", "nested")]


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    return build(tmp_path_factory, "refusals.c", "refusals")


def native(program: str, *args: str) -> tuple[str, int]:
    """stdout and the exit status as a shell reports it (128 + a signal that killed it)."""
    done = subprocess.run([program, *args], capture_output=True, text=True, timeout=60)
    return done.stdout, done.returncode if done.returncode >= 0 else 128 - done.returncode


def under_minivmm(program: str, host: str, *args: str) -> tuple[str, int]:
    result = VM(program, host, argv=list(args)).run(timeout=60)
    if result.stop.reason == "unsupported":
        pytest.skip(f"this machine cannot run the {host} profile's instructions: {result.stop.message}")
    assert result.stop.reason in ("exited", "signaled"), result.stop.message
    return result.console, result.exit_code


@needs_gcc
@pytest.mark.parametrize("handled", [False, True], ids=["killed", "handled"])
@pytest.mark.parametrize("host, mode", [("skylake-client", m) for m in FRAMES + NO_ROOM + RING0]
                         + [("nehalem", m) for m in FXSAVE_ONLY])
def test_what_linux_refuses_ends_as_it_ends_natively(refusals, host, mode, handled):
    """skylake-client has XSAVE and XSAVES, as this machine's kernel does (it restores
    its initial state with XRSTORS); nehalem has FXSAVE frames. A SIGSEGV that Linux
    forces runs the program's handler, or kills (force_sig); a frame it cannot write for
    SIGSEGV kills (force_sigsegv)."""
    if "xsaves" not in machine_features():
        pytest.skip("this machine's kernel restores its initial FPU state without XRSTORS")
    args = (mode, "handle") if handled else (mode,)
    assert under_minivmm(refusals, host, *args) == native(refusals, *args)


@needs_gcc
def test_the_kill_says_why_linux_forced_sigsegv(refusals):
    """One line names the refusal; a fault whose handler has no room dies of SIGSEGV, not
    of the fault's own signal (force_sigsegv)."""
    cases = {("cs",): "SIGSEGV: returning from a signal handler: CS 0x13 is no user code segment (IRET's #GP)",
             ("rip",): "is not canonical (IRET's #GP)",
             ("mxcsr",): "rt_sigreturn: its fpstate at",
             ("unmapped-ud",): "SIGSEGV: no room for the frame of signal 4 at"}
    for args, says in cases.items():
        result = VM(refusals, "nehalem", argv=list(args)).run(timeout=60)
        assert (result.stop.signal, result.exit_code) == ("SIGSEGV", 139) and says in result.stop.message, \
            result.stop.message


def test_an_abi_guest_at_cpl_0_keeps_its_msrs(run_asm):
    """The guest ABI runs at CPL 0: WRMSR and RDMSR of GS_BASE are carried out."""
    result = run_asm("""
        mov ecx, 0xc0000101
        mov eax, 0x12345678
        xor edx, edx
        wrmsr
        xor eax, eax
        rdmsr
        out 0xf4, al
    """)
    assert (result.stop.reason, result.exit_code) == ("exited", 0x78), result.stop.message


RING3 = """
    lea rax, [rip + gdt]
    mov qword ptr [rip + gdtr + 2], rax
    lgdt [rip + gdtr]
    lea rax, [rip + on_gp]
    mov ecx, 13
    call install_gate
    mov rax, rsp
    push 0x23
    push rax
    pushfq
    push 0x1b
    lea rax, [rip + user]
    push rax
    iretq
user:
    mov ecx, 0xc0000101
    xor eax, eax
    xor edx, edx
    {instruction}
    mov al, 1
    out 0xf4, al
on_gp:
    mov al, 13
    out 0xf4, al
.align 8
gdt:
    .quad 0, 0x00209A0000000000, 0x0000920000000000, 0x0020FA0000000000, 0x0000F20000000000
gdtr:
    .word 39
    .quad 0
.include "lib/idt.inc"
"""


@pytest.mark.parametrize("instruction", ["wrmsr", "rdmsr", "xor ecx, ecx\n    rdpmc", "mov cr0, rax", "xsetbv"],
                         ids=["wrmsr", "rdmsr", "rdpmc", "mov-cr0", "xsetbv"])
def test_an_abi_guest_that_entered_ring_3_gets_gp_for_what_needs_cpl_0(run_asm, instruction):
    """An IRETQ to its own ring-3 segments, then an instruction only CPL 0 may execute
    (RDPMC with CR4.PCE clear): #GP(0), its handler powers off with 13."""
    result = run_asm(RING3.format(instruction=instruction), host="sandybridge")
    assert (result.stop.reason, result.exit_code) == ("exited", 13), result.stop.message


def test_infinite_recursion_of_an_abi_guest_stays_small(asm_guest):
    """`f: call f` at CPL 0: the stack runs down over the guest's own code, which then
    executes the return addresses (megabytes of code, each instruction once) until it
    reaches past RAM: #PF, and no IDT. The engine's translated code is bounded (it took
    1 GiB); what the CPU does is not shortened."""
    done, rss, _ = measured_cli("run", asm_guest("f:\n    call f\n"), timeout=120)
    assert done.returncode == 125 and "crashed: #PF at" in done.stderr and "no IDT loaded" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert rss < 400, f"peak RSS {rss:.0f} MiB"


@pytest.mark.parametrize("seed", range(6))
def test_the_address_space_is_what_brute_force_says(seed, monkeypatch):
    """Random map, unmap and protect over a small address space, in chunks of 2 (so
    that they split and join): the mappings stay sorted, disjoint, alike neighbours
    merged and agreeing with the page bytes; look-ups and the top-down search for free
    pages answer what a scan of the page bytes does."""
    monkeypatch.setattr(memory, "CHUNK", 2)
    rng = random.Random(seed)
    pages = 2048
    space = memory.AddressSpace(bytearray(pages * memory.PAGE))
    for _ in range(300):
        start, length = rng.randrange(pages) * memory.PAGE, rng.choice([1, 3, 17, 600]) * memory.PAGE
        try:
            rng.choice([lambda: space.map(start, length, rng.choice([0, 1, 3, 5]), rng.choice(["", "", "/f"])),
                        lambda: space.unmap(start, length),
                        lambda: space.protect(start, length, rng.choice([1, 3]))])()
        except SyscallError:
            pass
        maps = list(space.maps)
        assert all(a.end <= b.start and not memory._alike(a, b) for a, b in zip(maps, maps[1:]))
        marked = bytearray(pages)
        for m in maps:
            marked[m.start // memory.PAGE:m.end // memory.PAGE] = bytes([memory.effective(m.prot) | memory.MAPPED]) * \
                ((m.end - m.start) // memory.PAGE)
        assert marked == space.pages
        address = rng.randrange(pages * memory.PAGE)
        assert space.mapping_at(address) == next((m for m in maps if m.start <= address < m.end), None)
        count, top, bottom = rng.choice([1, 2, 40]), rng.randrange(pages + 1), rng.randrange(pages)
        fits = [p * memory.PAGE for p in range(bottom, top - count + 1) if not any(space.pages[p:p + count])]
        try:
            assert space.find_free(count * memory.PAGE, top * memory.PAGE, bottom * memory.PAGE) == fits[-1]
        except SyscallError:
            assert not fits


# ---- system calls single-process programs make -----------------------------------------

@needs_gcc
def test_sysinfo_prctl_getgroups_fadvise_and_xattrs_answer_as_linux_does(tmp_path):
    """glibc's sysconf(_SC_PHYS_PAGES) reads sysinfo (0 before, so sort failed), prctl
    keeps the name, the rest answer as for an unprivileged process on a file system
    without extended attributes. The same binary natively prints the same, but for the
    machine's number of processes."""
    program = tmp_path / "calls"
    source = Path(__file__).parent / "data" / "linux" / "single_process_calls.c"
    subprocess.run(["gcc", "-static", "-O1", "-o", str(program), str(source)], check=True)
    native = subprocess.run([str(program)], capture_output=True, text=True, timeout=30).stdout
    result = VM(str(program), "haswell").run(timeout=60)
    assert result.stop.reason == "exited", result.stop.message
    procs = lambda text: re.sub(r"procs \d+", "procs N", text)  # noqa: E731
    assert procs(result.console) == procs(native)
    assert "procs 1 " in result.console


@pytest.mark.skipif(not os.path.exists("/usr/bin/sort"), reason="coreutils' sort is not installed")
def test_sort_of_a_file_runs_on_haswell(tmp_path):
    """sort sizes its buffer from sysconf(_SC_AVPHYS_PAGES), which reads sysinfo, and
    sorts a file under the mounted machine."""
    data = tmp_path / "words.txt"
    data.write_text("pear\napple\nfig\n")
    result = VM("/usr/bin/sort", "haswell", linux=True, argv=[str(data)], mounts=["/"]).run(timeout=120)
    assert (result.stop.reason, result.console) == ("exited", "apple\nfig\npear\n"), result.stop.message


def test_only_calls_whose_handlers_never_see_the_cpu_skip_moving_rip_first():
    """SYSCALL's RIP is moved past the call before the handler runs only where the
    handler can see it: those that read or save registers (execve, clone, rt_sigreturn,
    sigaltstack, arch_prctl) are not CPU_FREE; getpid, read and fork (whose child's
    context is taken after the call returned) are."""
    from minivmm.linux.calls import CPU_FREE, TABLE
    from minivmm.linux.calls.base import reads_cpu
    by_name = {name: number for number, (name, _) in TABLE.items()}
    for name in ("execve", "execveat", "clone", "clone3", "rt_sigreturn", "sigaltstack", "arch_prctl"):
        assert by_name[name] not in CPU_FREE, name
    for name in ("getpid", "read", "write", "fork", "mmap", "futex", "clock_gettime"):
        assert by_name[name] in CPU_FREE, name
    # the rule itself, on a handler that names its engine only inside a closure
    def nested(k, uc, *_):
        return (lambda: uc.reg_read(0))()
    assert reads_cpu(nested) and reads_cpu(lambda k, uc: uc) and not reads_cpu(lambda k, uc, fd: fd)
