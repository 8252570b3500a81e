"""The README's console examples are run and compared, so the README cannot drift.

In a ```console block, a line starting with "$ " is a command (run by bash, in a fresh
directory where guests/ is the shipped guests, on an 80-column terminal); the lines
after it are its output, stdout and stderr as a terminal shows them (for a pipeline,
what it prints on stdout: where its stderr lands on a terminal is up to timing). Elisions are
explicit: a line "[...]" stands for any number of lines, and "[...]" inside a line for
any text (timings, for instance). Nothing else may differ.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ELISION = "[...]"


def console_blocks(text: str):
    """(first line number, [(command, expected output lines)]) per console block."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```console":
            start, steps, i = i + 2, [], i + 1
            while lines[i].strip() != "```":
                if lines[i].startswith("$ "):
                    steps.append((lines[i][2:], []))
                elif steps:
                    steps[-1][1].append(lines[i])
                i += 1
            blocks.append((start, steps))
        i += 1
    return blocks


def _structural(line: str) -> bool:
    """A command, an output line or a blank: where wrapped prose ends."""
    return not line.strip() or line.strip()[:1] in ("$", "|") or line.strip() == ELISION


def pattern(expected: list[str]) -> re.Pattern:
    """Each line exactly, with [...] for any text in it and a [...] line for any lines.
    Prose with an elided value in it (a measured number) is wrapped where that value's
    width puts the breaks: from that line to the end of its paragraph, any run of
    whitespace matches any other."""
    parts, k = [], 0
    while k < len(expected):
        line = expected[k]
        if line.strip() == ELISION:
            parts.append(r"(?:[^\n]*\n)*?")
        elif ELISION in line and not _structural(line):
            paragraph = [line]
            while k + 1 < len(expected) and not _structural(expected[k + 1]):
                k += 1
                paragraph.append(expected[k])
            words = " ".join(p.strip() for p in paragraph).split()
            parts.append(r"[ \t]*" + r"\s+".join(".*?".join(re.escape(piece) for piece in word.split(ELISION))
                                                for word in words) + r"\n")
        else:
            parts.append(".*?".join(re.escape(piece) for piece in line.rstrip().split(ELISION)) + r"\n")
        k += 1
    return re.compile("".join(parts))


BLOCKS = console_blocks((REPO / "README.md").read_text())


def test_the_readme_has_examples_and_the_matcher_can_fail():
    assert len(BLOCKS) >= 10
    assert pattern(["a [...] c", ELISION, "z"]).fullmatch("a b c\nx\ny\nz\n")
    assert not pattern(["a b c"]).fullmatch("a b d\n")          # negative controls
    assert not pattern(["a", "z"]).fullmatch("a\nx\nz\n")       # no silent elision
    wrapped = ["  took [...] ms). The check", "  passed."]            # prose reflowed around a number
    assert pattern(wrapped).fullmatch("  took 12.34 ms). The\n  check passed.\n")
    assert not pattern(wrapped).fullmatch("  took 12.34 ms). The\n  check failed.\n")


@pytest.mark.parametrize("start, steps", BLOCKS, ids=[f"README.md:{start}" for start, _ in BLOCKS])
def test_readme_console_example(start, steps, tmp_path):
    if any(re.search(r"\b(minivmm cc|gcc)\b", command) for command, _ in steps) and not shutil.which("gcc"):
        pytest.skip("this example builds a C program: gcc is not installed")
    (tmp_path / "guests").symlink_to(REPO / "minivmm" / "guests" / "shipped")
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb", "NO_COLOR": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command, expected in steps:
        piped = re.search(r"[^|]\|[^|]", command.split(" #")[0])
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL if piped else subprocess.STDOUT, text=True, timeout=120)
        actual = "".join(line.rstrip() + "\n" for line in done.stdout.splitlines())
        assert pattern(expected).fullmatch(actual), (
            f"README.md:{start}: `{command}` printed:\n{actual}\nThe README says:\n" + "\n".join(expected))
