"""Threads under emulated hosts: clone of a thread, futex, tgkill, per-thread state, and
the scheduler that runs them on the VM's one vCPU, deterministically. qemu-user (with
the matching -cpu) and the machine's kernel are the oracles."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import SYSTEM_PYTHON, minivmm_cli, needs_avx2, needs_python

from minivmm.guests import shipped_guests_dir
from minivmm.vmm.migration import PreCopy
from minivmm.vmm.snapshot import load as load_snapshot
from minivmm.vmm.vm import VM

SOURCES = Path(__file__).parent / "data" / "linux"
pytestmark = pytest.mark.skipif(not shutil.which("gcc"), reason="gcc is not installed: cannot build a Linux program")
QEMU = shutil.which("qemu-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-user (qemu-x86_64) is not installed: no peer to compare with")


def build(folder: Path, source: Path) -> str:
    out = folder / source.stem
    done = subprocess.run(["gcc", "-static", "-O1", "-pthread", "-o", str(out), str(source)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"gcc -static -pthread failed (no static glibc?): {done.stderr.strip()[:200]}")
    return str(out)


@pytest.fixture(scope="module")
def programs(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("threads")
    return {"checksum": build(folder, shipped_guests_dir() / "linux" / "threads_checksum.c"),
            "futex": build(folder, SOURCES / "futex_calls.c"), "racy": build(folder, SOURCES / "racy_threads.c")}


def qemu(program: str, cpu: str) -> str:
    done = subprocess.run([QEMU, "-cpu", cpu, program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@needs_qemu
@pytest.mark.parametrize("host, cpu, path", [("penryn", "Penryn", "plain"),
                                             pytest.param("haswell", "Haswell", "avx2", marks=needs_avx2)])
def test_four_threads_choose_their_path_from_cpuid_as_under_qemu_user(programs, host, cpu, path):
    result = VM(programs["checksum"], host).run(timeout=120)
    assert result.exit_code == 0, result.stop.message
    assert result.console == qemu(programs["checksum"], cpu)
    assert result.console.count(f"path={path}") == 4
    assert result.syscalls["counts"]["clone3"] == 4 and result.syscalls["counts"]["exit"] == 4


def test_futex_and_thread_calls_answer_as_the_machines_kernel(programs):
    natively = subprocess.run([programs["futex"]], capture_output=True, text=True, timeout=60)
    result = VM(programs["futex"], "penryn").run(timeout=60)
    assert result.exit_code == natively.returncode == 0, result.stop.message
    assert result.console == natively.stdout
    assert "handled by the waiter: yes" in result.console     # tgkill reached that thread's handler


@needs_avx2
def test_a_migration_carries_every_thread(programs):
    """Mid-run, the four threads at work: under the Sandy Bridge baseline they took the
    plain path on the Haswell, and finish on the Sandy Bridge as a run that never moved;
    forced without the mode, the threads that chose AVX2 die there of SIGILL."""
    alone = VM(programs["checksum"], "haswell", evc="intel-sandybridge").run(timeout=120)
    middle = alone.syscalls["total"] // 2
    assert alone.syscalls["sample"][middle - 1] == "clock_nanosleep"   # the threads are at work then
    moved = VM(programs["checksum"], "haswell", evc="intel-sandybridge").run(
        migrations=[f"sandybridge@syscall:{middle}"], timeout=120)
    assert moved.migrations[0]["ok"] and moved.hosts == ["haswell", "sandybridge"]
    assert moved.console == alone.console and moved.exit_code == 0
    forced = VM(programs["checksum"], "haswell").run(migrations=[f"sandybridge@syscall:{middle}"], force=True,
                                                      precopy=PreCopy(enabled=False), timeout=120)
    assert (forced.stop.signal, forced.exit_code) == ("SIGILL", 132)
    assert forced.stop.missing_features == ["avx2"] and forced.migrations[0]["forced"]


def test_the_same_run_twice_gives_the_same_report_and_a_seed_changes_the_interleaving(programs):
    once, again = (minivmm_cli("run", programs["racy"], "--host", "penryn", "--json") for _ in range(2))
    assert once.returncode == 0 and once.stdout == again.stdout       # byte for byte
    seeded = {VM(programs["racy"], "penryn", seed=seed).run(timeout=60).console for seed in (1, 2, 3)}
    assert len(seeded) > 1                                            # where slices end moved the switches
    assert VM(programs["racy"], "penryn", seed=2).run(timeout=60).console in seeded


@needs_avx2
def test_a_snapshot_of_four_threads_resumes_in_another_process(programs, tmp_path):
    """Taken mid-run (the threads at work, one of them waiting in a system call, which it
    makes again), resumed by another minivmm process: the output of a run that never
    stopped."""
    snapshot = tmp_path / "threads.snap"
    alone = VM(programs["checksum"], "haswell").run(timeout=120)
    taken = VM(programs["checksum"], "haswell").run(snapshot_at=f"syscall:{alone.syscalls['total'] // 2}",
                                                     snapshot_file=str(snapshot), timeout=120)
    assert taken.snapshots[0].get("refused") is None and taken.console == alone.console
    resumed = minivmm_cli("resume", str(snapshot), "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["console"] == alone.console
    kept = load_snapshot(str(snapshot)).process["threads"]
    assert len(kept) == 5 and kept[0]["regs"] is None and all(t["regs"]["RIP"] for t in kept[1:])


@needs_python
def test_python_threads_run_on_a_penryn():
    python = SYSTEM_PYTHON
    script = ("import threading, time\nout = []\ndef work(i):\n    time.sleep(0.05 * (4 - i))\n    out.append(i)\n"
              "threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]\n"
              "[t.start() for t in threads]\n[t.join() for t in threads]\nprint(out, threading.active_count())\n")
    natively = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=60)
    result = VM(python, "penryn", argv=["-c", script], mounts=["/"]).run(timeout=120)
    assert result.exit_code == 0, result.stderr[-500:]
    assert result.console == natively.stdout == "[3, 2, 1, 0] 1\n"


def test_report_counts_system_calls_over_all_threads(programs):
    report = json.loads(minivmm_cli("run", programs["checksum"], "--host", "penryn", "--json").stdout)
    assert report["syscalls"]["counts"]["clock_nanosleep"] == 4 * 40
