"""Unmodified Linux programs as guests: real glibc startup, libgcc and /proc/cpuinfo
under any host and EVC mode, system calls with Linux's semantics, faults as signals."""

import json
import shutil
import struct
import subprocess

import pytest
from helpers import minivmm_cli, one_line_error

from minivmm.errors import MinivmmError
from minivmm.guests import shipped_guests_dir
from minivmm.linux.cpuinfo import cpuinfo
from minivmm.masking.view import GuestCpuidView
from minivmm.cpu.profiles import load_profile
from minivmm.vmm.vm import VM

needs_gcc = pytest.mark.skipif(not shutil.which("gcc"), reason="gcc is not installed: cannot build a Linux program")
FEATURES = ("sse4_1", "sse4_2", "popcnt", "avx2")


def build(tmp_path_factory, source: str, name: str) -> str:
    out = tmp_path_factory.mktemp("linux") / name
    src = shipped_guests_dir().joinpath("linux", source)
    done = subprocess.run(["gcc", "-static", "-O1", "-o", str(out), str(src)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"gcc -static failed (no static glibc?): {done.stderr.strip()[:200]}")
    return str(out)


@pytest.fixture(scope="module")
def detect(tmp_path_factory):
    return build(tmp_path_factory, "detect.c", "detect")


@pytest.fixture(scope="module")
def popcnt_ud(tmp_path_factory):
    return build(tmp_path_factory, "popcnt_ud.c", "popcnt_ud")


def columns(console: str) -> dict[str, tuple[int, int, int]]:
    rows = {}
    for line in console.splitlines():
        feature, *cells = line.split()
        rows[feature] = tuple(int(cell.split("=")[1]) for cell in cells)
    return rows


@needs_gcc
@pytest.mark.parametrize("host, evc", [("penryn", None), ("nehalem", None), ("nehalem", "intel-penryn"),
                                       ("westmere", "intel-merom"), ("opteron-g3", None)])
def test_glibc_libgcc_and_proc_cpuinfo_follow_the_cpuid_view(detect, host, evc):
    """A static glibc program: libgcc's __builtin_cpu_supports, glibc's
    CPU_FEATURE_ACTIVE and the flags of /proc/cpuinfo, each equal to the VM's view."""
    result = VM(detect, host, evc=evc).run(timeout=60)
    assert result.stop.reason == "exited" and result.exit_code == 0, result.stop.message
    rows = columns(result.console)
    for feature in FEATURES:
        seen = int(feature in result.view_features)
        assert rows[feature] == (seen, seen, seen), (feature, rows[feature])
    assert result.syscalls["total"] > 10 and result.syscalls["counts"]["openat"] == 4


@needs_gcc
def test_the_mask_changes_what_the_program_detects_negative_control(detect):
    """The same host without the mask shows what the mask hid: the columns really move."""
    plain = columns(VM(detect, "nehalem").run(timeout=60).console)
    masked = columns(VM(detect, "nehalem", evc="intel-penryn").run(timeout=60).console)
    assert plain["popcnt"] == (1, 1, 1) and masked["popcnt"] == (0, 0, 0)


@needs_gcc
def test_a_program_executing_an_absent_instruction_dies_with_sigill(popcnt_ud):
    """#UD is SIGILL (arch/x86/kernel/traps.c do_error_trap): exit status 128 + 4."""
    result = VM(popcnt_ud, "penryn").run(timeout=60)
    assert (result.stop.reason, result.stop.signal, result.exit_code) == ("signaled", "SIGILL", 132)
    assert result.stop.missing_features == ["popcnt"] and "popcnt" in result.stop.instruction
    fine = VM(popcnt_ud, "nehalem").run(timeout=60)
    assert fine.exit_code == 0 and fine.console == "popcnt(0x101010101010101) = 8\n"
    masked = VM(popcnt_ud, "nehalem", evc="intel-penryn").run(timeout=60)
    assert masked.exit_code == 0  # a mask hides, it does not disable


@needs_gcc
def test_the_cli_passes_arguments_environment_and_exit_status(detect, popcnt_ud):
    done = minivmm_cli("run", popcnt_ud, "--host", "nehalem", "--", "a", "b")
    assert done.returncode == 0 and done.stdout == "popcnt(0x303030303030303) = 16\n"
    done = minivmm_cli("run", popcnt_ud, "--host", "penryn", "--json")
    report = json.loads(done.stdout)
    assert done.returncode == 132 and report["stop"]["signal"] == "SIGILL"


@needs_gcc
def test_an_unknown_system_call_returns_enosys_and_is_counted(tmp_path):
    src = tmp_path / "unknown.c"
    src.write_text('#include <unistd.h>\n#include <sys/syscall.h>\n#include <stdio.h>\n#include <errno.h>\n'
                   'int main(void) { long r = syscall(999, 1, 2, 3); printf("%ld %d\\n", r, errno); return 0; }\n')
    exe = tmp_path / "unknown"
    subprocess.run(["gcc", "-static", "-O1", "-o", str(exe), str(src)], check=True)
    result = VM(str(exe), "nehalem").run(timeout=60)
    assert result.console == "-1 38\n" and {"number": 999, "count": 1} in result.syscalls["unknown"]


def _elf(e_type=2, klass=2, machine=62, osabi=0, interp=False, path=b"/lib64/ld-linux-x86-64.so.2\0"):
    """A minimal ELF: one PT_LOAD (and a PT_INTERP naming ``path`` when asked)."""
    phnum = 2 if interp else 1
    header = b"\x7fELF" + bytes([klass, 1, 1, osabi]) + bytes(8)
    header += struct.pack("<HHIQQQIHHHHHH", e_type, machine, 1, 0x401000, 64, 0, 0, 64, 56, phnum, 0, 0, 0)
    body_at = 64 + 56 * phnum
    load = struct.pack("<IIQQQQQQ", 1, 5, 0, 0x400000, 0x400000, body_at + len(path) + 8, 0x2000, 0x1000)
    phdrs = load + (struct.pack("<IIQQQQQQ", 3, 4, body_at, 0, 0, len(path), len(path), 1) if interp else b"")
    return header + phdrs + path + b"\xf4" * 8


@pytest.mark.parametrize("kind, says", [
    (dict(interp=True), "its interpreter /lib64/ld-linux-x86-64.so.2 is not in the program's file system"),
    (dict(interp=True, path=b"/lib64/ld-linux-x86-64.so.2"), "corrupt interpreter path"),
    (dict(interp=True, path=b"\0"), "corrupt interpreter path"),
    (dict(klass=1), "not an ELF64 file"),
    (dict(machine=183), "not x86-64"), (dict(e_type=1), "not a static executable"),
])
def test_bad_linux_programs_are_one_line(tmp_path, kind, says):
    path = tmp_path / "prog"
    path.write_bytes(_elf(**kind))
    done = minivmm_cli("run", str(path), "--linux")
    assert one_line_error(done) and says in done.stderr, done.stderr


def test_linux_is_chosen_by_the_file_and_never_for_a_minivmm_guest(tmp_path):
    gnu = tmp_path / "gnu"
    gnu.write_bytes(_elf(osabi=3))
    plain = tmp_path / "plain"
    plain.write_bytes(_elf())
    assert VM(str(gnu), "nehalem").image.kind == "linux"
    assert VM(str(plain), "nehalem").image.kind == "elf"
    assert VM(str(plain), "nehalem", linux=True).image.kind == "linux"
    with pytest.raises(MinivmmError, match="arguments, environment and mounts are for Linux programs"):
        VM(str(plain), "nehalem", argv=["x"])


def test_proc_cpuinfo_is_linux_s_format_from_the_view():
    nehalem = load_profile("nehalem")
    text = cpuinfo(nehalem, GuestCpuidView.for_host(nehalem, "intel-penryn"))
    lines = dict(line.split("\t", 1) for line in text.splitlines() if "\t" in line)
    assert lines["model name"] == ": Intel(R) Xeon(R) CPU           W3520  @ 2.67GHz"  # the brand string's blanks
    assert lines["cpu family"] == ": 6" and lines["model"] == "\t: 26" and lines["stepping"] == ": 5"
    flags = lines["flags"].split(": ", 1)[1].split()
    assert "sse4_1" in flags and "sse4_2" not in flags and "popcnt" not in flags and "hypervisor" in flags
    assert flags[:3] == ["fpu", "vme", "de"] and text.endswith("power management:\n\n")


@needs_gcc
@pytest.mark.parametrize("precopy", [False, True])
def test_a_linux_program_migrates_live_mid_run_and_keeps_its_view(detect, precopy):
    """The kernel's state lives in the VMM and the view travels: moved to a Penryn at an
    exact instruction count, the program finishes there with the output it has unmoved.
    With pre-copy the program runs (and makes system calls that write its memory) while
    pages are in flight: what the kernel wrote must be sent again too."""
    from minivmm.vmm.migration import PreCopy
    alone = VM(detect, "nehalem", evc="intel-penryn").run(max_insns=10**9, timeout=60)
    params = PreCopy(guest_insns_per_s=2e4) if precopy else PreCopy(enabled=False)  # rounds of ~40k instructions
    moved = VM(detect, "nehalem", evc="intel-penryn").run(migrations=[f"penryn@insn:{alone.instructions // 4}"],
                                                          precopy=params, timeout=60)
    assert moved.hosts == ["nehalem", "penryn"] and moved.migrations[0]["ok"]
    assert moved.console == alone.console and moved.exit_code == 0 and moved.instructions == alone.instructions


@pytest.fixture(scope="module")
def rounds(tmp_path_factory):
    return build(tmp_path_factory, "rounds.c", "rounds")


@needs_gcc
@pytest.mark.parametrize("resume_on", [None, "westmere"])
def test_a_snapshot_mid_loop_resumes_in_another_process_to_the_same_end(rounds, tmp_path, resume_on):
    """Saved between two rounds (an open file at an offset, a signal handler, the heap,
    the brk and mmap areas, the random generator, the clock), resumed by another
    process: the whole console and the exit status are those of a run never stopped."""
    data = tmp_path / "data.txt"
    data.write_text("".join(f"line {i:03d} of the mounted file\n" for i in range(40)))
    args = ("--mount", f"{tmp_path}:/in", "--", "/in/data.txt")
    alone = json.loads(minivmm_cli("run", rounds, "--json", *args).stdout)
    point = [i + 1 for i, name in enumerate(alone["syscalls"]["sample"]) if name == "write"][3]
    snap = tmp_path / "mid.snap"
    saved = minivmm_cli("run", rounds, "--json", "--snapshot-at", f"syscall:{point}", "--snapshot-file", str(snap),
                        *args)
    assert json.loads(saved.stdout)["snapshots"][0]["when"] == f"syscall:{point}"
    resumed = minivmm_cli("resume", str(snap), "--json", "--mount", f"{tmp_path}:/in",
                          *(("--host", resume_on) if resume_on else ()))
    report = json.loads(resumed.stdout)
    assert resumed.returncode == alone["stop"]["status"] == report["stop"]["status"], resumed.stderr
    assert report["console"] == alone["console"] and report["console"].count("round") == 8
    assert report["syscalls"]["counts"] == alone["syscalls"]["counts"]  # rt_sigreturn: the handler ran
    assert report["hosts"] == ["nehalem", resume_on or "nehalem"]


@needs_gcc
def test_a_resume_refuses_a_file_that_changed_or_a_mount_that_is_gone(rounds, tmp_path):
    data = tmp_path / "in" / "data.txt"
    data.parent.mkdir()
    data.write_text("x" * 200)
    snap = tmp_path / "mid.snap"
    VM(rounds, "nehalem", mounts=[f"{data.parent}:/in"], argv=["/in/data.txt"]).run(
        snapshot_at="syscall:22", snapshot_file=str(snap), timeout=60)
    data.write_text("y" * 201)
    done = minivmm_cli("resume", str(snap), "--mount", f"{data.parent}:/in")
    assert one_line_error(done) and "/in/data.txt (fd 3) changed since the snapshot was taken" in done.stderr
    shutil.rmtree(data.parent)
    done = minivmm_cli("resume", str(snap), "--mount", f"{data.parent}:/in")
    assert one_line_error(done) and "does not exist on this machine" in done.stderr


@needs_gcc
def test_a_snapshot_s_process_section_is_validated_before_anything_runs(rounds, tmp_path):
    """A hostile process section (valid checksums, lying contents) is one line."""
    from minivmm.vmm import snapshot as snapshot_mod
    snap = tmp_path / "s.snap"
    VM(rounds, "nehalem").run(snapshot_at="syscall:22", snapshot_file=str(snap), timeout=60)
    good = snapshot_mod.load(str(snap))
    memory = bytearray(good.meta["memory"])
    good.load_memory(memory)
    for field, value in (("maps", [[0, 1 << 40, 7, "", 0, False]]), ("files", {"3": {"same_as": 9}}),
                         ("random", [1, 2]), ("brk", -1), ("signals", {"actions": {"99": [0, 0, 0, 0]}})):
        hostile = dict(good.process, **{field: value})
        bad = snapshot_mod.Snapshot(good.meta, good.regs, good.cpuid, good.console, bytes(memory), process=hostile)
        (tmp_path / "bad.snap").write_bytes(bad.to_bytes())
        done = minivmm_cli("resume", str(tmp_path / "bad.snap"))
        assert one_line_error(done) and "process:" in done.stderr, (field, done.stderr)


@needs_gcc
@pytest.mark.skipif(not shutil.which("qemu-x86_64"), reason="qemu-user is not installed (apt install qemu-user)")
@pytest.mark.parametrize("host, model", [("penryn", "Penryn"), ("nehalem", "Nehalem")])
def test_glibc_and_libgcc_agree_with_qemu_user_on_the_same_cpu(detect, host, model):
    """qemu-user runs the same binary on its model of the CPU: libgcc's and glibc's
    answers match minivmm's (qemu's /proc/cpuinfo is the machine's, so it is not compared:
    that contradiction is what minivmm's synthesized file avoids)."""
    qemu = subprocess.run(["qemu-x86_64", "-cpu", model, detect], capture_output=True, text=True, timeout=60)
    ours = VM(detect, host).run(timeout=60)
    theirs = columns(qemu.stdout)
    assert qemu.returncode == 0 and {f: c[:2] for f, c in columns(ours.console).items()} == \
        {f: c[:2] for f, c in theirs.items()}


@pytest.mark.skipif(not shutil.which("musl-gcc"), reason="musl-gcc is not installed (apt install musl-tools)")
@pytest.mark.parametrize("host, evc", [("nehalem", None), ("nehalem", "intel-penryn")])
def test_a_musl_program_sees_the_view(tmp_path_factory, host, evc):
    out = tmp_path_factory.mktemp("musl") / "detect-musl"
    subprocess.run(["musl-gcc", "-static", "-O1", "-o", str(out), str(shipped_guests_dir().joinpath("linux", "detect.c"))],
                   check=True)
    result = VM(str(out), host, evc=evc, linux=True).run(timeout=60)
    assert result.exit_code == 0, result.stop.message
    for feature, (libgcc, glibc, proc) in columns(result.console).items():
        seen = int(feature in result.view_features)
        assert (libgcc, glibc, proc) == (seen, -1, seen), feature


@pytest.mark.skipif(not shutil.which("busybox"), reason="busybox is not installed (apt install busybox-static)")
def test_debian_s_static_busybox_runs_shell_arithmetic_as_natively():
    script = "echo $((6 * 7)); printf '%s-%s\\n' a b"
    native = subprocess.run(["busybox", "sh", "-c", script], capture_output=True, text=True).stdout
    done = minivmm_cli("run", shutil.which("busybox"), "--linux", "--", "sh", "-c", script)
    assert done.returncode == 0 and done.stdout == native == "42\na-b\n"


KERNEL_WRITES = r"""
#include <stdio.h>
#include <sys/random.h>
static unsigned char buf[65536];
int main(void) {
    unsigned long sum = 0;
    getrandom(buf, sizeof buf, 0);              /* the kernel writes the buffer, once */
    for (int pass = 0; pass < 20; pass++)       /* then millions of instructions read it */
        for (int j = 0; j < (int)sizeof buf; j++) sum = sum * 31 + buf[j];
    printf("%lu\n", sum);
    return 0;
}
"""


@needs_gcc
def test_pages_the_kernel_writes_during_pre_copy_are_sent_again(tmp_path, monkeypatch):
    """getrandom fills a buffer from the VMM's side, where the engine's write tracking
    cannot see it: such writes are reported to pre-copy as dirty pages, or the program
    would read stale bytes on the destination (the negative control shows it does).
    The move starts at libc's first system call; the first round (the pages written so
    far over a slow link: several 100k instructions) covers the getrandom, the
    switchover falls in the long loop after it."""
    from minivmm.vmm.exits.traps import InstructionExits
    from minivmm.vmm.migration import PreCopy
    src = tmp_path / "k.c"
    src.write_text(KERNEL_WRITES)
    exe = tmp_path / "k"
    subprocess.run(["gcc", "-static", "-O1", "-o", str(exe), str(src)], check=True)
    alone = VM(str(exe), "nehalem", evc="intel-penryn").run(timeout=60)

    def moved():
        return VM(str(exe), "nehalem", evc="intel-penryn").run(
            migrations=["penryn@syscall:1"], timeout=60,
            precopy=PreCopy(guest_insns_per_s=2e6, bandwidth_bytes_per_s=1.25e6))  # a slow link: a long first round
    result = moved()
    assert result.hosts == ["nehalem", "penryn"] and result.console == alone.console
    monkeypatch.setattr(InstructionExits, "note_write", lambda self, address, size: None)
    assert moved().console != alone.console


@pytest.fixture(scope="module")
def probe_popcnt(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "probe_popcnt"
    src = shipped_guests_dir().joinpath("linux", "probe_popcnt.c")
    # -mno-popcnt: the generic path must not contain POPCNT itself
    done = subprocess.run(["gcc", "-static", "-O1", "-mno-popcnt", "-o", str(out), str(src)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"gcc -static failed: {done.stderr.strip()[:200]}")
    return str(out)


@needs_gcc
def test_a_sigill_probe_catches_the_fault_and_finds_what_the_mask_hides(probe_popcnt):
    """sigaction + sigsetjmp/siglongjmp around POPCNT: on a Penryn the handler runs on an
    rt_sigframe and the program takes the generic path; on a Nehalem under the Penryn
    baseline the probe finds the masked POPCNT (cpuid=0 probe=1)."""
    penryn = VM(probe_popcnt, "penryn").run(timeout=60)
    assert penryn.console.startswith("popcnt: cpuid=0 probe=0 uses=generic") and penryn.exit_code == 0
    assert [e["delivered"] for e in penryn.exceptions] == [True] and penryn.exceptions[0]["vector"] == 6
    masked = VM(probe_popcnt, "nehalem", evc="intel-penryn").run(timeout=60)
    assert masked.console.startswith("popcnt: cpuid=0 probe=1 uses=popcnt") and not masked.exceptions
    assert masked.console.split("\n")[1] == penryn.console.split("\n")[1]  # both paths compute the same


@needs_gcc
def test_the_prober_dies_of_sigill_after_migrating_and_its_cpuid_twin_survives(probe_popcnt):
    """The seed's story on a real program: moved mid-loop to a Penryn, the probing build
    dies with SIGILL (exit 132) naming popcnt; the CPUID-guided run finishes there with
    the checksum of a run that never moved."""
    from minivmm.vmm.migration import PreCopy
    alone = VM(probe_popcnt, "nehalem", evc="intel-penryn").run(timeout=60)
    point = f"penryn@syscall:{alone.syscalls['sample'].index('write') + 1}"  # right after the detection line
    prober = VM(probe_popcnt, "nehalem", evc="intel-penryn").run(migrations=[point], precopy=PreCopy(enabled=False),
                                                                 timeout=60)
    assert (prober.stop.signal, prober.exit_code, prober.host) == ("SIGILL", 132, "penryn")
    assert prober.stop.missing_features == ["popcnt"] and prober.migrations[0]["ok"]
    twin = VM(probe_popcnt, "nehalem", evc="intel-penryn", argv=["--cpuid"]).run(
        migrations=[point], precopy=PreCopy(enabled=False), timeout=60)
    unmoved = VM(probe_popcnt, "nehalem", evc="intel-penryn", argv=["--cpuid"]).run(timeout=60)
    assert twin.exit_code == 0 and twin.host == "penryn" and twin.console == unmoved.console
    assert "path: generic" in twin.console


@needs_gcc
def test_abort_is_sigabrt_and_a_handler_can_return_through_rt_sigreturn(tmp_path):
    src = tmp_path / "s.c"
    src.write_text(r"""
        #define _GNU_SOURCE
        #include <signal.h>
        #include <stdio.h>
        #include <stdlib.h>
        #include <ucontext.h>
        static volatile int seen;
        static void *volatile where;
        static void on_segv(int signo, siginfo_t *info, void *context) {
            ucontext_t *uc = context;
            seen = signo;
            where = info->si_addr;
            uc->uc_mcontext.gregs[REG_RIP] += 2;          /* skip the faulting load (8b 00) */
        }
        int main(int argc, char **argv) {
            struct sigaction sa = {0};
            sa.sa_sigaction = on_segv;
            sa.sa_flags = SA_SIGINFO;
            sigaction(SIGSEGV, &sa, NULL);
            __asm__ volatile("mov (%%rax), %%eax" ::"a"(0x7f0000000000ul + 5));  /* 2 bytes: 8b 00 */
            printf("seen %d at %p\n", seen, where);
            fflush(stdout);
            if (argc > 1) abort();
            return 0;
        }
    """)
    exe = tmp_path / "s"
    subprocess.run(["gcc", "-static", "-O1", "-o", str(exe), str(src)], check=True)
    ok = VM(str(exe), "nehalem").run(timeout=60)
    assert ok.exit_code == 0 and ok.console == "seen 11 at 0x7f0000000005\n", ok.console
    aborted = VM(str(exe), "nehalem", argv=["abort"]).run(timeout=60)
    assert (aborted.stop.signal, aborted.exit_code) == ("SIGABRT", 134)


@pytest.mark.skipif(not shutil.which("rustc"), reason="rustc is not installed")
@pytest.mark.parametrize("host, evc", [("nehalem", None), ("nehalem", "intel-penryn")])
def test_a_rust_static_pie_sees_the_view(tmp_path_factory, host, evc):
    """Rust's +crt-static builds are static-pie (ET_DYN, no interpreter): loaded at a
    base of their own, they relocate themselves; std's start-up polls fds 0-2."""
    out = tmp_path_factory.mktemp("rust") / "detect"
    src = shipped_guests_dir().joinpath("linux", "detect.rs")
    done = subprocess.run(["rustc", "-O", "-C", "target-feature=+crt-static", "-o", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    if done.returncode:
        pytest.skip(f"rustc cannot build a static-pie here: {done.stderr.strip()[:200]}")
    result = VM(str(out), host, evc=evc).run(timeout=60)
    assert result.exit_code == 0, result.stop.message
    assert result.console == "".join(f"{f} rust={int(f in result.view_features)}\n" for f in FEATURES)


@needs_gcc
def test_the_signal_frame_s_fpstate_is_fxsave_or_xsave_as_the_cpu_saves_it(tmp_path_factory):
    """Without XSAVE the fpstate is FXSAVE's (no magic); with XSAVE it is the standard
    XSAVE layout of XCR0's components, sw_reserved naming them and their size (576
    bytes of x87/SSE state and header, plus CPUID.0xD.2's 256 for YMM), FP_XSTATE_MAGIC2
    after it, 64-byte aligned; a handler's change to XMM0 comes back with rt_sigreturn.
    The machine's own kernel builds the same structure natively (for its XCR0)."""
    exe = build(tmp_path_factory, "sigframe.c", "sigframe")

    def fields(text):
        return dict(item.split("=") for item in text.split())
    mine = fields(subprocess.run([exe], capture_output=True, text=True, timeout=60).stdout)
    assert mine["magic1"] == "46505853" and mine["magic2"] == "46505845" and mine["xmm0"] == "12345678"
    assert int(mine["extended"]) == int(mine["xstate_size"]) + 4
    plain = fields(VM(exe, "nehalem").run(timeout=60).console)
    assert plain["magic1"] == "0" and plain["xmm0"] == "12345678" and plain["aligned"] == "1"
    xsave = fields(VM(exe, "sandybridge").run(timeout=60).console)
    assert xsave == {"magic1": "46505853", "extended": "836", "xfeatures": "7", "xstate_size": "832",
                     "magic2": "46505845", "aligned": "1", "xmm0": "12345678"}
