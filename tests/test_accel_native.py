"""--accel native: a Linux program as a process of this machine, its CPUID answered by a
ptrace supervisor through CPUID faulting, /proc/cpuinfo and AT_HWCAP from the same view.

The point EVC rests on, on the real CPU with nothing emulated: what the view hides
still executes. Tests that run a program skip where the CPU or kernel has no CPUID
faulting (AMD before Zen 4, most VMs); the refusals hold everywhere.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import minivmm_cli, one_line_error

from minivmm.cpu.native import machine_features
from minivmm.cpu.profiles import load_profile
from minivmm.errors import MinivmmError
from minivmm.guests import shipped_guests_dir
from minivmm.guests.toolchain import build_c
from minivmm.linux.cpuinfo import cpuinfo
from minivmm.masking.view import GuestCpuidView
from minivmm.vmm import supervised
from minivmm.vmm.vm import VM

REASON = supervised.unusable_reason()
needs_faulting = pytest.mark.skipif(REASON is not None, reason=f"--accel native cannot run here: {REASON}")
needs_gcc = pytest.mark.skipif(not shutil.which("gcc"), reason="gcc is not installed: cannot build a Linux program")
DATA = Path(__file__).parent / "data" / "linux"
LD_SO = "/lib64/ld-linux-x86-64.so.2"


def shipped(name: str, *cflags: str) -> str:
    try:
        return str(build_c([shipped_guests_dir().joinpath("linux", name)], cflags=cflags, linux=True))
    except MinivmmError as error:
        pytest.skip(f"gcc -static failed (no static glibc?): {error}")


def lines(console: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in console.splitlines())


@pytest.fixture(scope="module")
def detect_both():
    return shipped("detect_both.c")


@needs_faulting
@needs_gcc
def test_a_prober_finds_on_the_real_cpu_what_the_evc_mode_hides(detect_both):
    """PTEST, CRC32, POPCNT and VPADDD ymm under a SIGILL handler: the Penryn baseline
    hides SSE4.2, POPCNT and AVX2 from CPUID and the machine executes them all."""
    result = VM(detect_both, evc="intel-penryn", accel="native").run(timeout=30)
    assert result.accel == "native" and result.exit_code == 0, result.stop.message
    assert lines(result.console) == {"sse4_1": "cpuid=1 probe=1 uses=sse4_1", "sse4_2": "cpuid=0 probe=1 uses=sse4_2",
                                     "popcnt": "cpuid=0 probe=1 uses=popcnt", "avx2": "cpuid=0 probe=1 uses=avx2"}
    assert result.cpuid_totals[(1, 0)] >= 1 and result.cpuid_exits[0]["host"] == "native"
    # negative control: without the mode CPUID shows what the machine has
    plain = VM(detect_both, accel="native").run(timeout=30)
    assert all(line.startswith("cpuid=1 probe=1") for line in lines(plain.console).values())


@needs_faulting
@needs_gcc
def test_every_cpuid_answer_is_the_emulators_for_the_same_view(detect_both):
    """The same static program on the emulated native profile and on the machine under
    the supervisor asks the same leaves in the same order and is told the same."""
    native = VM(detect_both, evc="intel-penryn", accel="native").run(timeout=30)
    emulated = VM(detect_both, "native", evc="intel-penryn").run(timeout=60)
    assert emulated.exit_code == 0, emulated.stop.message
    assert native.cpuid_exits == emulated.cpuid_exits and len(native.cpuid_exits) > 20
    assert native.cpuid_totals == emulated.cpuid_totals
    # One probe differs, and it is XCR0's doing: the emulator's Linux start enables the
    # state components the view shows (no AVX under Penryn, so VPADDD ymm is #UD); on the
    # machine XCR0 is its operating system's, and AVX state is on.
    on_cpu, emulator = lines(native.console), lines(emulated.console)
    differs = {k: (on_cpu[k], emulator[k]) for k in on_cpu if on_cpu[k] != emulator[k]}
    assert differs == {"avx2": ("cpuid=0 probe=1 uses=avx2", "cpuid=0 probe=0 uses=generic")}


@needs_faulting
@needs_gcc
def test_every_thread_and_child_sees_the_masked_view():
    """Four threads, a fork()ed child and a posix_spawn()ed one (vfork, then execve,
    which turns faulting off until the supervisor arms it again)."""
    tasks = shipped("cpuid_tasks.c", "-pthread")
    masked = VM(tasks, masks=["-avx2,-popcnt"], accel="native").run(timeout=30)
    seen = lines(masked.console)
    assert sorted(seen) == ["fork", "main", "spawn", "thread0", "thread1", "thread2", "thread3"]
    assert set(seen.values()) == {"avx2=0 popcnt=0"}
    plain = VM(tasks, accel="native").run(timeout=30)   # negative control
    assert set(lines(plain.console).values()) == {"avx2=1 popcnt=1"}


def _sh(script: str, masks=(), evc=None):
    return VM("/bin/sh", masks=masks, evc=evc, argv=["-c", script], accel="native").run(timeout=30)


@needs_faulting
def test_proc_cpuinfo_shows_the_view_in_every_process_of_a_pipeline(tmp_path):
    result = _sh("grep -c avx2 /proc/cpuinfo | cat", masks=["-avx2"])
    assert result.console == "0\n" and result.exit_code == 0
    assert _sh("grep -c avx2 /proc/cpuinfo | cat").console == "1\n"     # negative control


@needs_faulting
def test_proc_cpuinfo_is_the_emulators_however_the_path_reaches_it(tmp_path):
    """An absolute path, a relative one from /proc, a symbolic link, and /proc/self/root:
    each is the emulator's text for the same view, byte for byte."""
    (tmp_path / "link").symlink_to("/proc/cpuinfo")
    view = GuestCpuidView.for_host(load_profile("native"), "intel-haswell")
    expected = cpuinfo(load_profile("native"), view)
    for how in ("cat /proc/cpuinfo", "cd /proc && cat cpuinfo", f"cat {tmp_path}/link",
                "cat /proc/self/root/proc/./cpuinfo"):
        result = _sh(how, evc="intel-haswell")
        assert result.console == expected, how
    assert _sh("cat /proc/version").console == Path("/proc/version").read_text()   # other files are the machine's


@needs_faulting
@pytest.mark.skipif(not os.path.exists(LD_SO), reason=f"no {LD_SO} on this machine")
def test_glibcs_dynamic_loader_finds_avx2_unusable_and_the_auxv_follows_the_view():
    """ld.so --list-diagnostics (glibc 2.33+): its leaf 7 EBX 'active' word, its ISA
    level (x86-64-v3 needs AVX2) and the AT_HWCAP/AT_HWCAP2 it was given."""
    def diagnostics(evc=None):
        result = VM(LD_SO, evc=evc, argv=["--list-diagnostics"], accel="native").run(timeout=30)
        if result.exit_code:
            pytest.skip(f"{LD_SO} has no --list-diagnostics (glibc before 2.33)")
        return dict(re.findall(r"^(\S+?)=(\S+)$", result.console, re.MULTILINE))

    hidden, shown = diagnostics("intel-sandybridge"), diagnostics()
    avx2, v3 = 1 << 5, 1 << 2
    assert not int(hidden["x86.cpu_features.features[0x1].active[0x1]"], 16) & avx2
    assert not int(hidden["x86.cpu_features.isa_1"], 16) & v3
    assert int(shown["x86.cpu_features.features[0x1].active[0x1]"], 16) & avx2     # negative control
    assert int(shown["x86.cpu_features.isa_1"], 16) & v3
    view = GuestCpuidView.for_host(load_profile("native"), "intel-sandybridge")
    auxv = {int(hidden[f"auxv[{i}].a_type"], 16): hidden.get(f"auxv[{i}].a_val")
            for i in sorted({k[5:k.index("]")] for k in hidden if k.startswith("auxv[")})}
    assert int(auxv[16], 16) == view.answer(1, 0, 0)[3]         # AT_HWCAP: CPUID.1:EDX of the view
    assert int(auxv[26], 16) & 2 == 0                            # AT_HWCAP2: no FSGSBASE on a Sandy Bridge


@needs_faulting
@needs_gcc
def test_the_program_cannot_turn_the_supervisor_off():
    """ARCH_SET_CPUID is refused as on a machine without CPUID faulting, and CPUID stays
    the view's (natively, the same call succeeds)."""
    program = str(build_c([DATA / "cpuid_prctl.c"], linux=True))
    result = VM(program, masks=["-popcnt"], accel="native").run(timeout=30)
    assert result.console == "get=1 set=-1 errno=19 popcnt=0\n"
    natively = subprocess.run([program], check=False, capture_output=True, text=True, timeout=30)
    assert natively.stdout.startswith("get=1 set=0 errno=0")


@needs_faulting
@needs_gcc
def test_a_seccomp_filter_of_the_programs_own_cannot_keep_faulting_off():
    """The filter makes the supervisor's arch_prctl after execve return 0 without running:
    the run ends as unsupported, every task killed, before the new image runs on."""
    program = str(build_c([DATA / "seccomp_exec.c"], linux=True))
    prober = shipped("detect_both.c")
    result = VM(program, evc="intel-penryn", argv=[prober], accel="native").run(timeout=30)
    assert result.stop.reason == "unsupported" and "seccomp filter" in result.stop.message
    assert result.console == ""
    control = VM(program, evc="intel-penryn", argv=["-", prober], accel="native").run(timeout=30)
    assert control.exit_code == 0 and lines(control.console)["sse4_2"].startswith("cpuid=0")


@needs_faulting
@pytest.mark.skipif(not shutil.which("unshare"), reason="no unshare(1) on this machine")
def test_proc_cpuinfo_of_a_procfs_mounted_in_a_new_namespace_is_the_views_too():
    natively = subprocess.run(["unshare", "-Urpf", "--mount-proc", "true"], capture_output=True, timeout=30)
    if natively.returncode:
        pytest.skip(f"unprivileged namespaces are not available here: {natively.stderr.decode().strip()[:100]}")
    result = _sh('unshare -Urpf --mount-proc sh -c "grep -c avx2 /proc/cpuinfo"', masks=["-avx2"])
    assert result.console == "0\n"
    assert _sh('unshare -Urpf --mount-proc sh -c "grep -c avx2 /proc/cpuinfo"').console == "1\n"   # control


@needs_faulting
@needs_gcc
def test_a_real_sigsegv_is_the_programs():
    """A write to a read-only page: the program's handler gets it (as natively); without
    a handler the run ends as the emulator ends it, SIGSEGV from #PF, 139."""
    program = shipped("readonly.c")
    handled = VM(program, accel="native").run(timeout=30)
    natively = subprocess.run([program], check=False, capture_output=True, text=True, timeout=30)
    assert handled.exit_code == 0 and handled.console == natively.stdout
    assert [e["vector"] for e in handled.exceptions] == [14, 14] and all(e["delivered"] for e in handled.exceptions)
    killed = VM(program, argv=["x"], accel="native").run(timeout=30)
    assert killed.stop.reason == "signaled" and killed.exit_code == 139 and killed.stop.vector == 14
    assert killed.stop.message.startswith("SIGSEGV from #PF at ")


@needs_faulting
def test_the_timeout_kills_the_whole_tree():
    result = VM("/bin/sh", argv=["-c", "sleep 100 & echo $!; sleep 100"], accel="native").run(timeout=1)
    assert result.stop.reason == "limit" and result.exit_code == 124
    background = int(result.console)
    try:
        state = Path(f"/proc/{background}/stat").read_text().split(")")[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z")


def test_refusals_are_one_line():
    with pytest.raises(MinivmmError, match="use --host native"):
        VM("/bin/sh", "penryn", accel="native")
    with pytest.raises(MinivmmError, match="guest ABI"):
        VM("detect_both", "native", accel="native")
    absent = "sse4a" if "sse4a" not in machine_features() else "avx512_fp16"
    with pytest.raises(MinivmmError, match=f"shows {absent}, which this machine lacks"):
        VM("/bin/sh", masks=[f"+{absent}"], accel="native")
    with pytest.raises(MinivmmError, match="--mount does not apply"):
        VM("/bin/sh", mounts=["/"], accel="native")
    done = minivmm_cli("run", "/bin/sh", "--accel", "native", "--host", "penryn")
    assert one_line_error(done)


@needs_faulting
def test_migration_and_exact_budgets_are_refused():
    with pytest.raises(MinivmmError, match="--accel native: an exact --max-insns"):
        VM("/bin/sh", accel="native").run(max_insns=10)


@needs_faulting
@needs_gcc
def test_compare_runs_on_the_machines_own_cpu(detect_both):
    """compare --accel native: its host column is the machine, and what the mode hides
    is highlighted as masked but executable, found by the real CPU."""
    done = minivmm_cli("compare", detect_both, "--accel", "native", "--evc", "intel-penryn", "--json")
    assert done.returncode == 0, done.stderr
    cells = {c["feature"]: c for c in json.loads(done.stdout)["cells"]}
    assert {c["host"] for c in cells.values()} == {"native"}
    assert cells["popcnt"]["disagreement"] == "masked but executable" and cells["popcnt"]["probe"] is True
    assert cells["sse4_1"]["disagreement"] is None     # negative control: shown by the mode
    refused = minivmm_cli("compare", detect_both, "--accel", "native", "--migrate-to", "penryn")
    assert one_line_error(refused)


@needs_faulting
def test_the_command_line_reports_as_for_an_emulated_run():
    """One JSON report of the schema's shape (minivmm_cli validates it), the program's
    exit status as the command's, its stdin passed through."""
    done = minivmm_cli("run", "/bin/sh", "--accel", "native", "--json", "--", "-c", "read line; echo $line; exit 3",
                       input="through\n")
    report = json.loads(done.stdout)
    assert done.returncode == 3 and report["accel"] == "native" and report["console"] == "through\n"
    assert report["stop"]["reason"] == "exited" and report["host"] == "native" and report["syscalls"] is None
