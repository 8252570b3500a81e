"""minivmm demo: every demo runs, and its steps show what the story says they show."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import minivmm_cli

from minivmm.guests import shipped_guests_dir
from minivmm.teaching import demo


@pytest.fixture(scope="module")
def steps():
    return {name: list(demo.steps(name)) for name in demo.DEMOS}


def test_evc_cpuid_guided_guest_survives_with_the_same_checksum(steps):
    hidden, plain, moved = steps["evc"]
    assert hidden.facts == {"physical": True, "cpuid": False}
    assert plain.facts["path"] == "sse2" and moved.facts["path"] == "sse2"
    assert moved.facts["migration"]["ok"] and moved.facts["host"] == "core2" and moved.facts["stop"] == "exited"
    assert moved.facts["checksum"] == plain.facts["checksum"] and moved.facts["same_as_unmigrated"]


def test_ud_probe_crashes_on_the_destination_naming_sse4_1(steps):
    found, plain, moved = steps["ud-probe"]
    assert found.facts["detections"]["sse4_1"] == {"cpuid": False, "probe": True, "uses": "generic"}
    assert plain.facts["path"] == "sse4_1" and plain.facts["stop"] == "exited"
    assert moved.facts["migration"]["ok"] and not moved.facts["migration"]["forced"]
    assert (moved.facts["stop"], moved.facts["vector"], moved.facts["host"]) == ("crashed", 6, "core2")
    assert moved.facts["missing_features"] == ["sse4_1"]


def test_override_refused_then_forced_crash(steps):
    check, refused, forced = steps["override"]
    assert {"sse4_1", "sse4_2", "popcnt"} <= set(check.facts["missing"])
    assert not refused.facts["migration"]["ok"] and refused.facts["host"] == "nehalem"
    assert refused.facts["stop"] == "exited" and refused.facts["checksum"] == "0x853a8100"
    assert forced.facts["migration"]["forced"] and forced.facts["stop"] == "crashed"
    assert forced.facts["missing_features"] == ["sse4_1"]


def test_cold_migration_redetects(steps):
    (moved,) = steps["cold"]
    assert moved.facts["migration"]["mode"] == "cold" and moved.facts["stop"] == "exited"
    assert moved.facts["path"] == "sse2" and moved.facts["checksum"] == "0x853a8100"


def test_lzcnt_is_silently_wrong_without_abm(steps):
    haswell, nehalem = steps["lzcnt"]
    assert haswell.facts["value"] == 31 and nehalem.facts["value"] == 0
    assert nehalem.facts["audit"] and nehalem.facts["audit"][0]["features"] == ["abm"]


def test_avx_complete_check(steps):
    plain, masked = steps["avx"]
    assert (plain.facts["naive"], plain.facts["complete"], plain.facts["naive_vaddps"]) == ("avx", "sse2", "#UD")
    assert (masked.facts["naive"], masked.facts["complete"], masked.facts["naive_vaddps"]) == ("sse2", "sse2", None)


def test_linux_real_programs_follow_the_view_and_the_prober_dies_after_migrating(steps):
    if steps["linux"][0].facts.get("skipped"):
        pytest.skip(steps["linux"][0].facts["skipped"])
    plain, masked, probe, dies, twin = steps["linux"]
    assert plain.facts["columns"]["popcnt"] == "libgcc=1 glibc=1 cpuinfo=1"
    assert masked.facts["columns"]["popcnt"] == "libgcc=0 glibc=0 cpuinfo=0"
    assert probe.console.startswith("popcnt: cpuid=0 probe=1 uses=popcnt")
    assert (dies.facts["stop"], dies.facts["host"], dies.facts["missing_features"]) == ("signaled", "penryn", ["popcnt"])
    assert dies.facts["migration"]["ok"] and dies.facts["status"] == 132
    assert twin.facts["stop"] == "exited" and twin.facts["host"] == "penryn"
    assert twin.facts["checksum"] == re.search(r"checksum: (\d+)", probe.console)[1]


def test_avx2_probe_dies_after_migrating_to_sandybridge_and_its_twin_survives(steps):
    if steps["avx2"][0].facts.get("skipped"):
        pytest.skip(steps["avx2"][0].facts["skipped"])
    probe, dies, twin = steps["avx2"]
    assert probe.console.startswith("avx2: cpuid=0 probe=1 uses=avx2")
    assert (dies.facts["stop"], dies.facts["host"], dies.facts["missing_features"]) == \
        ("signaled", "sandybridge", ["avx2"])
    assert twin.facts["stop"] == "exited" and twin.facts["host"] == "sandybridge"
    assert twin.facts["checksum"] == re.search(r"checksum: (\d+)", probe.console)[1]


def test_prefetchw_is_found_by_executing_it_where_cpuid_never_reported_it(steps):
    if steps["prefetchw"][0].facts.get("skipped"):
        pytest.skip(steps["prefetchw"][0].facts["skipped"])
    seen = {step.facts["host"]: (step.facts["cpuid"], step.facts["probe"]) for step in steps["prefetchw"]
            if step.facts["stop"] != "unsupported"}   # a later host's glibc may need what this machine lacks
    expected = {"core2": (False, True), "haswell": (False, True), "broadwell": (True, True)}
    assert "core2" in seen and seen == {host: expected[host] for host in seen}
    assert "Broadwell" in steps["prefetchw"][0].narration


def test_each_steps_command_reproduces_it(steps, tmp_path):
    """The printed command is the run: in a shell where guests/ is the shipped guests (as
    the README's examples run), after its demo's setups (the builds of the programs it
    runs), it gives the same console. No command names a file by an absolute path: a
    program built into the cache is ./NAME, built as a setup says."""
    for step in (step for demo_steps in steps.values() for step in demo_steps):
        assert not any(word.startswith("/") for word in shlex.split(f"{step.setup} {step.command}")), step.command
    (tmp_path / "guests").symlink_to(shipped_guests_dir())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    linux = [] if steps["linux"][0].facts.get("skipped") else [steps["linux"][3]]
    linux += [] if steps["avx2"][0].facts.get("skipped") else [steps["avx2"][1]]
    for step in (steps["ud-probe"][2], steps["override"][1], steps["avx"][0], *linux):
        setups = [s.setup for s in steps[step.demo] if s.setup]
        done = subprocess.run(["bash", "-c", " && ".join([*setups, f"{step.command} --json"])], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)
        assert json.loads(done.stdout)["console"] == step.console, (step.command, done.stderr)


def test_cli_json_and_text():
    done = minivmm_cli("demo", "ud-probe", "--json")
    assert done.returncode == 0
    report = json.loads(done.stdout)
    assert [s["demo"] for s in report] == ["ud-probe"] * 3 and report[2]["facts"]["stop"] == "crashed"
    text = minivmm_cli("demo", "lzcnt")
    assert "$ minivmm run lzcnt_pitfall --host nehalem --audit" in text.stdout
    assert [line for line in text.stdout.splitlines() if line.endswith(" ")] == []  # no blanks to the edge
    assert "  On nehalem (abm absent) lzcnt(1) returned 0." in text.stdout
    bad = minivmm_cli("demo", "nosuch")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1


def test_help_splits_no_word_at_80_columns(monkeypatch):
    """No demo's name is broken at its hyphen ("ud-" / "probe") and no line is wider than 80."""
    monkeypatch.setenv("COLUMNS", "80")
    lines = minivmm_cli("demo", "--help").stdout.splitlines()
    assert max(map(len, lines)) <= 80 and not [line for line in lines if line.endswith("-")]
    assert lines[0] == "Usage: minivmm demo [OPTIONS] [NAME]" and any("  ud-probe  " in line for line in lines)


def test_pace_waits_for_a_key_between_steps():
    """On a terminal, --pace holds each next step until a key is pressed."""
    import os
    import pty
    import select
    import subprocess
    import sys
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "minivmm", "demo", "lzcnt", "--pace"],
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    seen = b""

    def read_until(text: bytes, seconds: float = 30) -> bool:
        nonlocal seen
        deadline = time.monotonic() + seconds
        while text not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break
        return text in seen

    try:
        assert read_until(b"press any key")
        time.sleep(0.5)
        assert read_until(b"press any key", 0.2) and b"lzcnt(1) on nehalem" not in seen  # still waiting
        os.write(master, b"x")
        assert read_until(b"lzcnt(1) on nehalem")
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        os.close(master)
