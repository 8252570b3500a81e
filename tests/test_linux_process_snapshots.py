"""A VM of several processes, snapshotted and migrated whole: every process's memory,
threads and descriptors, the pipes between them with the bytes they hold, the zombies
their parents have yet to reap. The machine's own run of the same command is the
oracle."""

import base64
import json
import shutil
import subprocess

import pytest
from helpers import minivmm_cli, needs_avx2, one_line_error, pack_snapshot, snapshot_sections

from minivmm.vmm import snapshot as snapshot_mod
from minivmm.vmm.migration import PreCopy
from minivmm.vmm.vm import VM

SHELL = shutil.which("sh")
pytestmark = pytest.mark.skipif(SHELL is None, reason="no sh on this machine")
SLEEP_CALLS = ("nanosleep", "clock_nanosleep")
HELD = "echo x | (sleep 1; cat); echo done"   # the pipe holds "x\n" while its reader sleeps


def sleeping_at(result) -> int:
    """The syscall:N point of the first sleep of a run (a child's, the others waiting)."""
    sample = result.syscalls["sample"]
    return next(i for i, name in enumerate(sample) if name in SLEEP_CALLS) + 1


def pipeline(host: str = "penryn", script: str = HELD, **options) -> VM:
    return VM(SHELL, host, argv=["-c", script], mounts=["/"], **options)


def with_process_state(path, out, change) -> str:
    """The snapshot file at ``path`` with its process section changed by ``change``
    (valid checksums, the rest byte for byte)."""
    sections = []
    for name, compression, stored, length in snapshot_sections(path.read_bytes()):
        if name == "process":
            stored = json.dumps(change(json.loads(stored))).encode()
            length = len(stored)
        sections.append((name, compression, stored, length))
    out.write_bytes(pack_snapshot(sections))
    return str(out)


@pytest.mark.parametrize("script", ["sleep 1 | cat", HELD])
def test_a_snapshot_of_a_pipeline_resumes_in_another_process(script, tmp_path):
    natively = subprocess.run([SHELL, "-c", script], capture_output=True, text=True, timeout=60)
    point = sleeping_at(pipeline(script=script).run(timeout=120))
    path = tmp_path / "pipeline.snap"
    taken = pipeline(script=script).run(snapshot_at=f"syscall:{point}", snapshot_file=str(path), timeout=120)
    assert taken.snapshots[0].get("refused") is None and taken.console == natively.stdout
    state = snapshot_mod.load(str(path)).process
    assert len(state["machine"]["processes"]) >= 1 and state["machine"]["pipes"]   # several processes, a pipe
    if script == HELD:
        assert [pipe[1] for pipe in state["machine"]["pipes"]] == [base64.b64encode(b"x\n").decode()]
    resumed = minivmm_cli("resume", str(path), "--mount", "/", "--json", timeout=120)
    assert resumed.returncode == natively.returncode, resumed.stderr
    assert json.loads(resumed.stdout)["console"] == natively.stdout


def test_the_bytes_a_pipe_held_come_from_the_snapshot(tmp_path):
    """Negative control: the same snapshot with another byte in its pipe prints that byte."""
    path = tmp_path / "pipeline.snap"
    pipeline().run(snapshot_at=f"syscall:{sleeping_at(pipeline().run(timeout=120))}", snapshot_file=str(path),
                   timeout=120)

    def other_byte(state):
        state["machine"]["pipes"][0][1] = base64.b64encode(b"y\n").decode()
        return state
    changed = with_process_state(path, tmp_path / "changed.snap", other_byte)
    resumed = minivmm_cli("resume", changed, "--mount", "/", "--json", timeout=120)
    assert json.loads(resumed.stdout)["console"] == "y\ndone\n"


@pytest.mark.parametrize("change, says", [
    (lambda s: s["machine"]["pipes"].clear(), "names a pipe that does not exist"),
    (lambda s: s["machine"]["processes"][0].update(tid=s["tid"]), "process or thread ids repeat"),
    (lambda s: s["machine"]["processes"][0].update(clock=s["clock"]), "is not a process's own state"),
    (lambda s: s["machine"]["processes"].pop(), "other processes' memory is"),
    (lambda s: s["files"].update({"50": {"kind": "Epoll", "path": "anon_inode:[eventpoll]", "flags": 0, "offset": 0,
                                         "id": 999, "interest": [[50, 999, 1, 0]]}}), "epolls watch one another"),
    (lambda s: s["machine"]["pipes"][0].__setitem__(0, 1), "pipes are malformed"),   # a pipe minivmm never makes
    (lambda s: s["threads"][0].update(resume="vfork", result=s["tid"]), "waits on vfork for a process that is not"),
])
def test_a_snapshot_whose_processes_disagree_is_refused_in_one_line(tmp_path, change, says):
    path = tmp_path / "pipeline.snap"
    pipeline().run(snapshot_at=f"syscall:{sleeping_at(pipeline().run(timeout=120))}", snapshot_file=str(path),
                   timeout=120)

    def changed(state):
        change(state)
        return state
    done = minivmm_cli("resume", with_process_state(path, tmp_path / "bad.snap", changed), "--mount", "/")
    assert one_line_error(done) and says in done.stderr


@needs_avx2   # (the shell's glibc on a Haswell view runs AVX2 on the machine's CPU)
@pytest.mark.parametrize("stop_and_copy", [False, True])
@pytest.mark.parametrize("blocked_in", [SLEEP_CALLS, ("wait4",)])
def test_a_pipeline_migrates_whole(stop_and_copy, blocked_in):
    """At a call that blocks its thread (a child's sleep; the shell's wait4, whose
    result is its child's), the VM moves whole and goes on as if it had not."""
    natively = subprocess.run([SHELL, "-c", HELD], capture_output=True, text=True, timeout=60)
    sample = pipeline("haswell", evc="intel-sandybridge").run(timeout=120).syscalls["sample"]
    points = [i + 1 for i, name in enumerate(sample) if name in blocked_in and i > 60]
    moved_processes = []
    for point in points[:1] if blocked_in == SLEEP_CALLS else points:
        moved = pipeline("haswell", evc="intel-sandybridge").run(
            migrations=[f"sandybridge@syscall:{point}"], precopy=PreCopy(enabled=not stop_and_copy), timeout=120)
        record = moved.migrations[0]
        assert (moved.console, moved.exit_code) == (natively.stdout, natively.returncode), point
        if "stopped on the source" in record.get("reason", ""):
            continue   # the program ended while its pages were in flight: nothing to move
        assert record["ok"] and moved.hosts == ["haswell", "sandybridge"], point
        moved_processes.append(record["processes"])
    assert max(moved_processes) >= 2


@needs_avx2
def test_after_a_forced_move_a_process_using_avx2_dies_of_sigill():
    """The shell's glibc chose its AVX2 string functions from the Haswell view; moved
    while it waits for its child, it uses one on the Sandy Bridge and dies of SIGILL."""
    script = "sleep 1; echo done"
    stays = pipeline("haswell", script).run(timeout=120)
    assert stays.console == "done\n"
    forced = pipeline("haswell", script).run(migrations=[f"sandybridge@syscall:{sleeping_at(stays)}"], force=True,
                                             timeout=120)
    assert forced.migrations[0]["forced"] and forced.migrations[0]["processes"] == 2
    assert (forced.stop.signal, forced.exit_code, forced.console) == ("SIGILL", 132, "")
    assert "avx2" in forced.stop.missing_features
