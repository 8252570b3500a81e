"""minivmm matrix: the cross product, its verdicts, JUnit XML pytest's way, replay."""

import json
import os
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from helpers import minivmm_cli
from hypothesis import given, settings

from minivmm.cpu.profiles import builtin_names
from minivmm.testing import strategies as mst
from minivmm.testing.checks import audit_problems
from minivmm.testing.matrix import Cell, cells, run_cell, run_cells

MEROM = "core2,penryn,nehalem"


def test_cross_product_and_its_names():
    plain = cells(["hello", "detect_cpuid"], hosts="all")
    assert len(plain) == 2 * len(builtin_names()) and plain[0] == Cell("hello", "core2")
    pairs = cells(["hello"], hosts=MEROM, evc="intel-merom", migrate="all-pairs")
    assert [c.id for c in pairs][:2] == ["core2-intel-merom-to-penryn@checkpoint:1",
                                         "core2-intel-merom-to-nehalem@checkpoint:1"]
    assert len(pairs) == 6
    listed = cells(["hello"], hosts=MEROM, migrate="nehalem>penryn")
    assert [(c.host, c.migrate) for c in listed] == [("nehalem", "penryn@checkpoint:1")]
    with pytest.raises(Exception, match="SOURCE:DESTINATION"):
        cells(["hello"], hosts=MEROM, migrate="nehalem")


def test_random_points_come_from_the_seed():
    one = cells(["hello"], hosts=MEROM, migrate="all-pairs", at="random", seed=1)
    assert one == cells(["hello"], hosts=MEROM, migrate="all-pairs", at="random", seed=1)
    assert one != cells(["hello"], hosts=MEROM, migrate="all-pairs", at="random", seed=2)
    assert all(c.migrate.split("@")[1].startswith("insn:") for c in one)


def test_verdicts_and_readable_failures():
    ok = run_cell(Cell("dispatch_cpuid", "penryn", "intel-merom", (), "core2@checkpoint:1"))
    assert ok.status == "passed" and not ok.message
    bad = run_cell(Cell("dispatch_ud", "penryn", "intel-merom", (), "core2@checkpoint:1"))
    assert bad.status == "failed"
    assert "guest used sse4_1 path on penryn where CPUID hides sse4_1" in bad.message
    assert "crashed on core2 after migrating from penryn" in bad.message
    skipped = run_cell(Cell("dispatch_cpuid", "core2", "intel-nehalem"))
    assert skipped.status == "skipped" and "does not support" in skipped.message
    refused = run_cell(Cell("dispatch_cpuid", "nehalem", None, (), "core2@checkpoint:1"))
    assert refused.status == "passed" and "refused" in refused.message   # the VMM protected the VM


def test_a_cell_replays_with_its_printed_command():
    outcome = run_cells(cells(["dispatch_ud"], hosts=MEROM, evc="intel-merom", migrate="penryn>core2"), jobs=1)[0]
    done = minivmm_cli(*shlex.split(outcome.to_dict()["replay"])[1:], "--json")
    replayed = json.loads(done.stdout)
    assert replayed["console"] == outcome.console and replayed["stop"] == outcome.report["stop"]


def test_stop_and_copy_cells_move_without_pre_copy_and_replay_so():
    outcome = run_cells(cells(["dispatch_ud"], hosts=MEROM, evc="intel-merom", migrate="penryn>core2",
                              stop_and_copy=True), jobs=1)[0]
    assert [m["mode"] for m in outcome.report["migrations"]] == ["stop-and-copy"]
    replay = outcome.to_dict()["replay"]
    assert "--stop-and-copy" in shlex.split(replay)
    replayed = json.loads(minivmm_cli(*shlex.split(replay)[1:], "--json").stdout)
    assert [m["mode"] for m in replayed["migrations"]] == ["stop-and-copy"]
    default = run_cells(cells(["dispatch_ud"], hosts=MEROM, evc="intel-merom", migrate="penryn>core2"), jobs=1)[0]
    assert [m["mode"] for m in default.report["migrations"]] != ["stop-and-copy"]  # the control: pre-copy


def pytest_junit_vocabulary(tmp_path) -> dict[str, set[str]]:
    """Element -> attribute names in the JUnit XML pytest itself writes (pass, fail, skip)."""
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_pass(): print('out')\n"
        "def test_fail(): assert 0, 'boom'\n"
        "def test_skip(): pytest.skip('why')\n")
    xml = tmp_path / "pytest.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_logging=system-out",
                    f"--junitxml={xml}", str(tmp_path / "test_sample.py")], capture_output=True, cwd=tmp_path)
    return vocabulary(ET.parse(xml).getroot())


def vocabulary(root) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for element in root.iter():
        found.setdefault(element.tag, set()).update(element.attrib)
    return found


def test_matrix_over_all_builtins_for_three_guests_writes_pytests_junit(tmp_path):
    junit, report = tmp_path / "m.xml", tmp_path / "m.json"
    done = minivmm_cli("matrix", "detect_cpuid", "detect_ud", "detect_both", "--hosts", "all",
                       "--junit", str(junit), "--report", str(report), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ours, pytests = vocabulary(ET.parse(junit).getroot()), pytest_junit_vocabulary(tmp_path)
    for element, attributes in ours.items():
        assert element in pytests, f"pytest writes no <{element}>"
        assert attributes <= pytests[element], f"<{element}>: {attributes - pytests[element]} not pytest's"
    suite = ET.parse(junit).getroot().find("testsuite")
    assert int(suite.get("tests")) == 3 * len(builtin_names()) == len(suite.findall("testcase"))
    data = json.loads(report.read_text())
    assert data["summary"]["passed"] == 3 * len(builtin_names())


def test_failing_cells_in_junit_carry_the_message_and_the_replay(tmp_path):
    junit = tmp_path / "m.xml"
    done = minivmm_cli("matrix", "dispatch_ud", "--hosts", MEROM, "--evc", "intel-merom", "--migrate",
                       "all-pairs", "--junit", str(junit), "--jobs", "2")
    assert done.returncode == 1
    failures = {case.get("name"): case.find("failure") for case in ET.parse(junit).getroot().iter("testcase")}
    failed = sorted(name for name, f in failures.items() if f is not None)
    assert failed == sorted(f"{a}-intel-merom-to-{b}@checkpoint:1" for a in ("penryn", "nehalem")
                            for b in ("core2", "penryn", "nehalem") if a != b)
    text = failures["penryn-intel-merom-to-core2@checkpoint:1"].text
    assert "where CPUID hides sse4_1" in text and "replay: minivmm run dispatch_ud --host penryn" in text


@settings(max_examples=15)
@given(mst.cells(guest="detect_cpuid", migrate=False, masks=mst.hiding_masks()))
def test_a_cpuid_guided_guest_never_executes_what_its_view_hides(cell):
    """The property a user states with the public strategies; detect_ud is the control."""
    assert not audit_problems(cell.run(audit=True))


def test_negative_control_a_probing_guest_executes_hidden_instructions():
    result = Cell("detect_ud", "nehalem", "intel-penryn").run(audit=True)
    assert any("popcnt" in p for p in audit_problems(result))


@pytest.mark.parametrize("args, says", [
    (("--migrate", "core2>nosuch"), "nosuch"), (("--at", "bogus"), "--at"), (("--at", "ms:5"), "irreproducible"),
    (("--evc", "bogus"), "bogus"), (("--hosts", "core2,nosuch"), "nosuch"),
    (("--junit", "/nonexistent/dir/m.xml"), "--junit"), (("--report", "/nonexistent/dir/m.json"), "--report"),
    (("--cpuid-mask", "-nosuchfeature"), "nosuchfeature"), (("nosuchguest",), "nosuchguest"),
])
def test_bad_input_is_refused_before_any_cell_runs(args, says):
    done = minivmm_cli("matrix", "hello", "--hosts", "core2", *args) if "--hosts" not in args else \
        minivmm_cli("matrix", "hello", *args)
    assert done.returncode == 2 and says in done.stderr and len(done.stderr.splitlines()) == 1
    assert "cells" not in done.stdout


@pytest.mark.parametrize("spelling", ["penryn:core2", "penryn>core2", "dump:Xeon-X5460:core2"])
def test_migration_pairs_need_no_shell_quoting(spelling):
    from minivmm.testing.matrix import _migrations
    source = "dump:Xeon-X5460" if spelling.startswith("dump") else "penryn"
    assert _migrations(spelling, [source, "core2"]) == [(source, "core2")]


def test_without_dask_the_scheduler_says_how_to_get_it(tmp_path):
    """A Python where Dask does not import: --scheduler is one line naming the extra;
    --jobs runs as ever."""
    (tmp_path / "distributed").mkdir()
    (tmp_path / "distributed" / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "minivmm", "matrix", "detect_cpuid", "--hosts", "penryn",
                           "--scheduler", "local:2"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "minivmm: error: --scheduler needs Dask, which is not installed: pip install 'minivmm[distributed]'"]
    done = subprocess.run([sys.executable, "-m", "minivmm", "matrix", "detect_cpuid", "--hosts", "penryn",
                           "--jobs", "1"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
