"""Helpers shared by the tests (oracles read straight from the data files)."""

import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib import resources

RAW_LINE_FIELDS = ("eax", "ebx", "ecx", "edx")


def minivmm_cli(*args, timeout=60):
    """The installed console script, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "minivmm", *args], capture_output=True, text=True, timeout=timeout)


def dump_registers(name: str) -> dict[tuple[int, int], tuple[int, int, int, int]]:
    """A real dump read straight from its XML: the oracle, independent of minivmm's parser."""
    path = resources.files("minivmm").joinpath("data", "cpuid-dumps", f"x86_64-cpuid-{name}.xml")
    root = ET.fromstring(path.read_text())
    return {(int(e.get("eax_in"), 16), int(e.get("ecx_in"), 16)): tuple(int(e.get(r), 16) for r in RAW_LINE_FIELDS)
            for e in root.iter("cpuid")}


def parse_raw_lines(text: str) -> dict[tuple[int, int], tuple[int, int, int, int]]:
    table = {}
    for line in text.splitlines():
        head, _, regs = line.partition(":")
        leaf, sub = (int(x, 16) for x in head.split())
        values = dict(kv.split("=") for kv in regs.split())
        table[(leaf, sub)] = tuple(int(values[r], 16) for r in RAW_LINE_FIELDS)
    return table
