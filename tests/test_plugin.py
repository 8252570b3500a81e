"""The pytest plugin, used the way an outside project uses it: examples/simdlib's own
tests run in a separate pytest that finds minivmm through its pytest11 entry point."""

import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from helpers import minivmm_cli

from minivmm.guests.toolchain import build_c

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "simdlib"
needs_gcc = pytest.mark.skipif(not shutil.which("gcc"), reason="gcc is not installed: the example cannot be built")


def test_the_plugin_is_registered_as_a_pytest11_entry_point():
    assert "minivmm.testing.plugin" in {e.value for e in entry_points(group="pytest11")}


def run_example(tmp_path, *args):
    junit = tmp_path / "example.xml"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                           *args], cwd=EXAMPLE, capture_output=True, text=True, timeout=600)
    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    return done, cases


@needs_gcc
def test_the_example_projects_tests_pass(tmp_path):
    done, cases = run_example(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    assert len(cases) == 17 and "test_paths_follow_cpuid_on_every_generation[opteron-g3]" in cases


@needs_gcc
def test_the_probing_variant_fails_where_it_should_and_says_why(tmp_path):
    done, cases = run_example(tmp_path, "--simdlib-detect=probe", "-k", "evc_baseline or survives")
    assert done.returncode == 1
    failed = {name: case.find("failure").get("message") for name, case in cases.items()
              if case.find("failure") is not None}
    # Penryn and Nehalem have features the Merom baseline hides; a Core 2 has none to find.
    assert sorted(failed) == sorted(
        [f"test_paths_follow_the_evc_baseline[{h}-intel-merom]" for h in ("penryn", "nehalem")]
        + [f"test_survives_live_migration_in_an_intel_merom_cluster[{a}-intel-merom-to-{b}@checkpoint:1]"
           for a in ("penryn", "nehalem") for b in ("core2", "penryn", "nehalem") if a != b])
    assert "guest used sse4_1 path on penryn where CPUID hides sse4_1" in \
        failed["test_paths_follow_the_evc_baseline[penryn-intel-merom]"]
    crash = failed["test_survives_live_migration_in_an_intel_merom_cluster[penryn-intel-merom-to-core2@checkpoint:1]"]
    assert "needs sse4_1, which core2 lacks" in crash


@needs_gcc
def test_cells_spread_over_xdist_workers_with_the_same_verdicts(tmp_path):
    """No runner of ours: the cells are ordinary items, so pytest-xdist distributes them."""
    pytest.importorskip("xdist")
    done, cases = run_example(tmp_path, "--simdlib-detect=probe", "-k", "evc_baseline", "-n", "2", "-v")
    assert done.returncode == 1 and "[gw0]" in done.stdout and "[gw1]" in done.stdout
    failed = sorted(name for name, case in cases.items() if case.find("failure") is not None)
    assert failed == [f"test_paths_follow_the_evc_baseline[{h}-intel-merom]" for h in ("nehalem", "penryn")]


@needs_gcc
def test_the_probing_variant_under_minivmm_matrix(tmp_path):
    src = EXAMPLE / "src"
    guests = {d: str(build_c([src / "guest.c", src / "simd.c", src / f"detect_{d}.c"], tmp_path / f"{d}.elf",
                             cflags=(f"-I{src}",))) for d in ("cpuid", "probe")}
    good = minivmm_cli("matrix", guests["cpuid"], "--hosts", "core2,penryn,nehalem", "--evc", "intel-merom",
                       "--migrate", "all-pairs", "--json")
    assert good.returncode == 0, good.stdout[-2000:]
    bad = minivmm_cli("matrix", guests["probe"], "--hosts", "core2,penryn,nehalem", "--evc", "intel-merom",
                      "--migrate", "all-pairs")
    assert bad.returncode == 1
    assert "4 passed" not in bad.stdout and "2 passed, 4 failed, 0 skipped" in bad.stdout
    assert "guest used popcnt path on nehalem where CPUID hides popcnt" in bad.stdout


def outside_pytest(folder, timeout=120) -> subprocess.CompletedProcess:
    """pytest run on ``folder`` as another project runs it (the plugin from its entry point)."""
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)],
                          capture_output=True, text=True, cwd=folder, timeout=timeout)


def test_marker_without_the_fixture_and_fixture_without_the_marker(tmp_path):
    (tmp_path / "test_misuse.py").write_text(
        "def test_no_marker(minivmm_cell):\n    pass\n")
    done = outside_pytest(tmp_path)
    assert done.returncode != 0 and "@pytest.mark.minivmm" in done.stdout


def test_minivmm_run_fixture_with_a_shipped_guest(tmp_path):
    (tmp_path / "test_shipped.py").write_text(
        "from minivmm.testing import assert_follows_cpuid\n"
        "def test_detect(minivmm_run):\n"
        "    result = minivmm_run('detect_cpuid', 'penryn', evc='intel-merom')\n"
        "    assert_follows_cpuid(result)\n"
        "    assert result.detections['sse4_1'].cpuid is False\n")
    done = outside_pytest(tmp_path)
    assert done.returncode == 0, done.stdout


@needs_gcc
def test_a_cell_can_be_a_linux_program_with_arguments(tmp_path):
    """The marker's args reach the program: the SIGILL prober fails its cell where the
    Penryn baseline hides the POPCNT it uses; its --cpuid twin passes every cell, the
    migration to a Penryn at its 19th system call included."""
    from minivmm.guests import shipped_guests_dir
    prober = tmp_path / "prober"
    subprocess.run(["gcc", "-static", "-O1", "-mno-popcnt", "-o", str(prober),
                    str(shipped_guests_dir().joinpath("linux", "probe_popcnt.c"))], check=True)
    (tmp_path / "test_prober.py").write_text(
        "import pytest\n"
        "from minivmm.testing import assert_follows_cpuid, assert_survives_migration\n"
        f"PROBER = {str(prober)!r}\n"
        "@pytest.mark.minivmm(hosts='nehalem', evc='intel-penryn', migrate='nehalem:penryn', at='syscall:19',\n"
        "                     args=('--cpuid',))\n"
        "def test_twin(minivmm_cell):\n"
        "    result = minivmm_cell.run(PROBER)\n"
        "    assert_survives_migration(result)\n"
        "    assert_follows_cpuid(result)\n"
        "@pytest.mark.minivmm(hosts='nehalem', evc='intel-penryn')\n"
        "def test_prober(minivmm_cell):\n"
        "    assert_follows_cpuid(minivmm_cell.run(PROBER))\n")
    done = outside_pytest(tmp_path, timeout=300)
    assert "1 failed, 1 passed" in done.stdout, done.stdout[-2000:]
    assert "guest used popcnt path on nehalem where CPUID hides popcnt" in done.stdout
