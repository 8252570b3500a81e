"""docs/api.md is the public Python API: every name it documents is exported, every
export is documented, and its examples run. The reference ships with the package:
`minivmm docs` lists and prints it."""

import ast
import importlib
import re
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

import pytest
from helpers import minivmm_cli

import minivmm
from minivmm.guests import shipped_guests_dir
from minivmm.testing import plugin

REPO = Path(__file__).resolve().parent.parent
API = (REPO / "docs" / "api.md").read_text()
MODULES = ("minivmm", "minivmm.testing", "minivmm.testing.strategies")


def documented() -> dict[str, set[str]]:
    """Headings "### `MODULE.NAME`" by module, and "### fixture `NAME`" / "### marker `NAME`"."""
    found: dict[str, set[str]] = {}
    for kind, name in re.findall(r"^### (fixture |marker )?`([\w.]+)`$", API, re.M):
        module, _, attribute = name.rpartition(".") if not kind else (kind.strip(), "", name)
        found.setdefault(module, set()).add(attribute)
    return found


def plugin_fixtures_and_markers() -> tuple[set[str], set[str]]:
    """What the plugin defines, read from its source: functions decorated with
    pytest.fixture, and the markers its pytest_configure registers."""
    tree = ast.parse(Path(plugin.__file__).read_text())
    fixtures = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                for decorator in node.decorator_list
                if "pytest.fixture" in ast.unparse(decorator.func if isinstance(decorator, ast.Call) else decorator)}
    markers = {call.args[1].value.split("(")[0].split(":")[0] for call in ast.walk(tree)
               if isinstance(call, ast.Call) and ast.unparse(call.func).endswith("addinivalue_line")
               and ast.literal_eval(call.args[0]) == "markers"}
    return fixtures, markers


def test_every_documented_name_is_exported_and_every_export_documented():
    names = documented()
    assert set(names) == {*MODULES, "fixture", "marker"}
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        assert names[module_name] == set(module.__all__), module_name
        for name in names[module_name]:
            assert getattr(module, name) is not None, f"{module_name}.{name}"
    fixtures, markers = plugin_fixtures_and_markers()
    assert names["fixture"] == fixtures and names["marker"] == markers == {"minivmm"}


def test_the_check_can_fail():
    """Negative controls: a name documented but not exported, and an export left out."""
    global API
    saved = API
    try:
        API = saved + "\n### `minivmm.NoSuchThing`\n"
        with pytest.raises(AssertionError):
            test_every_documented_name_is_exported_and_every_export_documented()
        API = saved.replace("### `minivmm.run_cells`\n", "")
        with pytest.raises(AssertionError):
            test_every_documented_name_is_exported_and_every_export_documented()
    finally:
        API = saved


EXAMPLES = re.findall(r"^```python\n(.*?)^```", API, re.M | re.S)


def test_api_md_has_examples_and_is_linked_from_the_index():
    assert len(EXAMPLES) >= 10
    assert "[api.md](api.md)" in (REPO / "docs" / "README.md").read_text()


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_api_md_example_runs(code, tmp_path):
    """Each example as a script, where guests/ is the shipped guests; one that opens with
    "# test_NAME.py" is a test file, run by pytest with the plugin as installed."""
    (tmp_path / "guests").symlink_to(shipped_guests_dir())
    test_file = re.match(r"# (test_\w+\.py)", code)
    if test_file:
        (tmp_path / test_file[1]).write_text(code)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", test_file[1]]
    else:
        command = [sys.executable, "-c", code]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_minivmm_docs_lists_the_topics_and_prints_one():
    listed = minivmm_cli("docs")
    assert listed.returncode == 0
    topics = dict(line.split(None, 1) for line in listed.stdout.splitlines()[1:])
    assert {"abi", "api", "cli", "linux", "masks", "security"} <= set(topics)
    assert topics["api"] == "The Python API" and topics["cli"] == "The command line"
    assert minivmm_cli("docs", "api").stdout == API
    wrong = minivmm_cli("docs", "nosuch")
    assert wrong.returncode == 2 and "no documentation topic 'nosuch' (topics: abi," in wrong.stderr


def test_the_docs_are_package_data():
    """Every docs/*.md is inside the package (minivmm/docs), and pyproject ships them in
    the wheel (pip wheel . builds one with minivmm/docs/*.md in it)."""
    shipped = resources.files("minivmm").joinpath("docs")
    for page in (REPO / "docs").glob("*.md"):
        assert shipped.joinpath(page.name).read_text() == page.read_text()
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "docs/*.md" in package_data["minivmm"]
    assert Path(minivmm.__file__).parent.joinpath("docs").resolve() == (REPO / "docs").resolve()
