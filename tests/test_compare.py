"""minivmm compare: the side-by-side of CPUID-guided and #UD-guided detection."""

import json
import shutil
import subprocess

import pytest
from helpers import minivmm_cli, png_colours

from minivmm.teaching.compare import ADVERTISED_BUT_ABSENT, ADVERTISED_BUT_UD, MASKED_BUT_EXECUTABLE, compare
from minivmm.teaching.html import comparison_page

HOSTS = ["core2", "penryn", "nehalem"]
YELLOW, RED = (0xFF, 0xD8, 0x4D), (0xD7, 0x26, 0x3D)   # html.py: masked, crash


@pytest.fixture(scope="module")
def merom():
    return compare(["guests/detect_both.asm"], HOSTS, evc="intel-merom")


def test_sse4_1_on_penryn_is_physical_hidden_and_found_by_the_probe(merom):
    cell = merom.cell("guests/detect_both.asm", "sse4_1", "penryn")
    assert (cell.physical, cell.cpuid, cell.probe, cell.uses) == (True, False, True, "generic")
    assert cell.disagreement == MASKED_BUT_EXECUTABLE
    core2 = merom.cell("guests/detect_both.asm", "sse4_1", "core2")
    assert (core2.physical, core2.cpuid, core2.probe, core2.disagreement) == (False, False, False, None)


def test_negative_control_without_evc_nothing_is_masked():
    plain = compare(["guests/detect_both.asm"], ["penryn"])
    cell = plain.cell("guests/detect_both.asm", "sse4_1", "penryn")
    assert (cell.physical, cell.cpuid, cell.probe, cell.disagreement) == (True, True, True, None)


def test_cli_table_and_json(monkeypatch):
    """Without colour, on 80 columns, a highlighted cell still says what it is: it ends
    with its kind's mark, and the legend names each mark shown."""
    for name, value in (("NO_COLOR", "1"), ("TERM", "dumb"), ("COLUMNS", "80")):
        monkeypatch.setenv(name, value)
    args = ("compare", "guests/detect_both.asm", "--hosts", ",".join(HOSTS), "--evc", "intel-merom")
    shown = minivmm_cli(*args)
    assert shown.returncode == 0, shown.stderr
    row = next(line for line in shown.stdout.splitlines() if "sse4_1" in line)
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells == ["sse4_1", "✗ ✗ ✗ generic", "✓ ✗ ✓ generic *", "✓ ✗ ✓ generic *"]
    assert "* masked but executable: CPUID hides what the host runs (yellow)" in shown.stdout.splitlines()
    assert "advertised" not in shown.stdout  # the legend names the marks shown, no others
    assert max(len(line) for line in shown.stdout.splitlines()) <= 80
    report = json.loads(minivmm_cli(*args, "--json").stdout)
    penryn = next(c for c in report["cells"] if (c["feature"], c["host"]) == ("sse4_1", "penryn"))
    assert (penryn["physical"], penryn["cpuid"], penryn["probe"]) == (True, False, True)
    assert penryn["disagreement"] == "masked but executable"


def test_advertised_but_ud_and_advertised_but_absent_are_kinds_of_their_own(monkeypatch):
    """Sandy Bridge has AVX and CPUID says so, yet detect_ud's VADDPS raises #UD (the boot
    state enables no AVX state in XCR0): advertised but #UD. A mask that shows SSE4.2 on
    a Penryn, which lacks it: advertised but absent. Both in the table and the JSON."""
    for name, value in (("NO_COLOR", "1"), ("TERM", "dumb"), ("COLUMNS", "80")):
        monkeypatch.setenv(name, value)
    args = ("compare", "detect_ud", "--hosts", "sandybridge,penryn", "--cpuid-mask=+sse4_2")
    report = json.loads(minivmm_cli(*args, "--json").stdout)
    cells = {(c["feature"], c["host"]): c for c in report["cells"]}
    avx, sse4_2 = cells["avx", "sandybridge"], cells["sse4_2", "penryn"]
    assert (avx["physical"], avx["cpuid"], avx["probe"], avx["disagreement"]) == (True, True, False, ADVERTISED_BUT_UD)
    assert (sse4_2["physical"], sse4_2["cpuid"], sse4_2["disagreement"]) == (False, True, ADVERTISED_BUT_ABSENT)
    assert cells["sse4_1", "sandybridge"]["disagreement"] is None  # negative control: all three agree
    lines = minivmm_cli(*args).stdout.splitlines()
    avx_row = [c.strip() for c in next(line for line in lines if "│ avx " in line).strip("│ ").split("│")]
    sse4_2_row = [c.strip() for c in next(line for line in lines if "sse4_2" in line).strip("│ ").split("│")]
    assert avx_row == ["avx", "✓ ✓ ✗ generic !", "✗ ✗ ✗ generic"]
    assert sse4_2_row == ["sse4_2", "✓ ✓ ✓ sse4_2", "✗ ✓ ✗ generic +"]
    assert "! advertised but #UD: CPUID shows it, the probe faulted (red)" in lines
    assert "+ advertised but absent: CPUID shows what the host lacks (red)" in lines


def test_migration_outcomes_per_guest():
    result = compare(["dispatch_cpuid", "dispatch_ud"], ["penryn"], evc="intel-merom", migrate_to="core2")
    assert result.cell("dispatch_cpuid", "sse4_1", "penryn").after == "ok"
    assert result.cell("dispatch_ud", "sse4_1", "penryn").after == "#UD crash"
    runs = {r["guest"]: r for r in result.to_dict()["runs"]}
    assert runs["dispatch_ud"]["migration"]["stop"]["missing_features"] == ["sse4_1"]
    refused = compare(["dispatch_cpuid"], ["nehalem"], migrate_to="core2")
    assert refused.cell("dispatch_cpuid", "sse4_1", "nehalem").after == "refused"


def test_the_html_timeline_tells_what_happened():
    """A guest without a checkpoint was never migrated: its timeline says so from the
    start, not "runs to checkpoint 1" then "no checkpoint"; one with a checkpoint runs
    to it, moves and crashes."""
    page = comparison_page(compare(["detect_cpuid", "dispatch_ud"], ["penryn"], evc="intel-merom",
                                   migrate_to="core2"))
    detecting = page[page.index("<h3>detect_cpuid: migration timeline"):page.index("<h2>dispatch_ud</h2>")]
    assert "checkpoint 1" not in detecting
    assert "runs to its end without reaching a checkpoint" in detecting
    assert "not migrated: no checkpoint" in detecting
    probing = page[page.index("<h3>dispatch_ud: migration timeline"):]
    assert "runs to checkpoint 1" in probing and "migrate to core2" in probing and "#UD crash" in probing


@pytest.mark.parametrize("args", [("--hosts", "core2,nosuch"), ("--hosts", "core2", "--html", "/nonexistent/d/x.html"),
                                  ("--hosts", "core2", "--evc", "intel-nehalem"), ("--hosts", "penryn", "--migrate-to", "x")])
def test_bad_input_is_one_line(args):
    done = minivmm_cli("compare", "hello", *args)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def screenshot(html: str, tmp_path):
    page, png = tmp_path / "page.html", tmp_path / "page.png"
    page.write_text(html)
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1000,700",
                    f"--screenshot={png}", page.as_uri()], capture_output=True, timeout=60, check=True)
    return png_colours(png)


@pytest.mark.skipif(not CHROMIUM, reason="Chromium is not installed (CI installs it: apt install chromium)")
def test_html_page_renders_in_headless_chromium(tmp_path):
    """The matrix shows highlighted cells: yellow where CPUID hides an executable
    feature, red where the probing guest crashed after migrating. On a page of the same
    guest without EVC and without a migration only the legend has those colours: they
    come from the data, not the template."""
    result = compare(["dispatch_ud"], ["penryn"], evc="intel-merom", migrate_to="core2")
    colours = screenshot(comparison_page(result), tmp_path)
    plain = screenshot(comparison_page(compare(["dispatch_ud"], ["penryn"])), tmp_path)
    assert colours.get(YELLOW, 0) > plain.get(YELLOW, 0) + 1000
    assert colours.get(RED, 0) > plain.get(RED, 0) + 1000
    for page in (colours, plain):
        assert page.get((255, 255, 255), 0) < sum(page.values()) * 0.98, "the page rendered blank"
