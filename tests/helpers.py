"""Helpers shared by the tests (oracles read straight from the data files)."""

import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib import resources
from pathlib import Path

import pytest

from minivmm.cpu.native import machine_features

RAW_LINE_FIELDS = ("eax", "ebx", "ecx", "edx")


def minivmm_cli(*args, timeout=60, input=None):
    """The installed console script, as a user runs it (standard input ``input``, else
    empty); a --json report of run or resume is checked against docs/report.schema.json."""
    done = subprocess.run([sys.executable, "-m", "minivmm", *args], capture_output=True, text=True, timeout=timeout,
                          input=input, stdin=None if input is not None else subprocess.DEVNULL)
    if args and args[0] in ("run", "resume") and "--json" in args and done.returncode != 2:
        import json

        from conftest import report_validator
        report_validator().validate(json.loads(done.stdout))
    return done


def dump_registers(name: str) -> dict[tuple[int, int], tuple[int, int, int, int]]:
    """A real dump read straight from its XML: the oracle, independent of minivmm's parser."""
    path = resources.files("minivmm").joinpath("data", "cpuid-dumps", f"x86_64-cpuid-{name}.xml")
    root = ET.fromstring(path.read_text())
    return {(int(e.get("eax_in"), 16), int(e.get("ecx_in"), 16)): tuple(int(e.get(r), 16) for r in RAW_LINE_FIELDS)
            for e in root.iter("cpuid")}


def parse_raw_lines(text: str) -> dict[tuple[int, int], tuple[int, int, int, int]]:
    table = {}
    for line in text.splitlines():
        if not line.strip() or line.strip().startswith("CPU"):
            continue
        head, _, regs = line.partition(":")
        leaf, sub = (int(x, 16) for x in head.split())
        values = dict(kv.split("=") for kv in regs.split())
        table[(leaf, sub)] = tuple(int(values[r], 16) for r in RAW_LINE_FIELDS)
    return table


def png_colours(path) -> dict[tuple[int, int, int], int]:
    """Pixel counts per RGB colour of an 8-bit RGB/RGBA PNG (no imaging library needed)."""
    import struct
    import zlib
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, chunks, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + length
    width, height, depth, colour_type = header[:4]
    assert depth == 8 and colour_type in (2, 6), f"unsupported PNG format {header}"
    bpp = 3 if colour_type == 2 else 4
    raw, stride = zlib.decompress(b"".join(chunks)), width * bpp
    previous, counts = bytearray(stride), {}
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up, corner = previous[i], previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 0xFF
        for x in range(0, stride, bpp):
            rgb = (line[x], line[x + 1], line[x + 2])
            counts[rgb] = counts.get(rgb, 0) + 1
        previous = line
    return counts


# The peak of this process alone: VmHWM, reset first ("5" to clear_refs). getrusage's
# ru_maxrss survives exec, so it would report the forking pytest worker's peak.
_MEASURED = """
import sys
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
from minivmm.cli import main
sys.argv = ["minivmm", *sys.argv[1:]]
try:
    main()
finally:
    hwm = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    sys.stderr.write(f"\\nMAXRSS {hwm}\\n")
"""


def measured_cli(*args, timeout=60, **kwargs):
    """The command line in a fresh process, with its peak RSS (MiB) and wall time (s):
    (CompletedProcess with the RSS line removed from stderr, rss_mib, seconds)."""
    import time
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _MEASURED, *args], capture_output=True, text=True,
                          timeout=timeout, **kwargs)
    seconds = time.monotonic() - started
    lines = done.stderr.splitlines()
    rss = next(int(line.split()[1]) for line in reversed(lines) if line.startswith("MAXRSS "))
    done.stderr = "\n".join(line for line in lines if line and not line.startswith("MAXRSS ")) + "\n"
    return done, rss / 1024, seconds


def pack_snapshot(sections) -> bytes:
    """A snapshot file from ``[(name, compression, stored bytes, payload length)]`` with
    correct checksums: hostile contents that pass every integrity check."""
    import zlib

    from minivmm.vmm import snapshot
    out = [snapshot.HEADER.pack(snapshot.MAGIC, snapshot.VERSION, len(sections))]
    for name, compression, stored, length in sections:
        out.append(snapshot.SECTION.pack(name.encode().ljust(8, b"\0"), compression, len(stored), length,
                                         zlib.crc32(stored)))
        out.append(stored)
    return b"".join(out)


def snapshot_sections(data: bytes) -> list:
    """The sections of a snapshot file as stored: [(name, compression, stored bytes,
    payload length)], as ``pack_snapshot`` takes them."""
    from minivmm.vmm import snapshot
    _, _, count = snapshot.HEADER.unpack_from(data, 0)
    at, sections = snapshot.HEADER.size, []
    for _ in range(count):
        name, compression, stored, length, _ = snapshot.SECTION.unpack_from(data, at)
        at += snapshot.SECTION.size
        sections.append((name.rstrip(b"\0").decode(), compression, data[at:at + stored], length))
        at += stored
    return sections


def one_line_error(done) -> bool:
    """Exit 2, one line on stderr, no traceback, nothing on stdout."""
    return (done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
            and done.stdout == "")


# the distribution's own interpreter (a development one may be a wrapper that runs others)
SYSTEM_PYTHON = "/usr/bin/python3"
needs_python = pytest.mark.skipif(not Path(SYSTEM_PYTHON).exists(), reason="no /usr/bin/python3 on this machine")

# A haswell host's glibc picks AVX2 string functions, which run on the machine's own CPU:
# a machine without AVX2 cannot run that host (the run would end as unsupported).
needs_avx2 = pytest.mark.skipif("avx2" not in machine_features(),
                                reason="this machine has no AVX2: it cannot run a haswell host's glibc")
HASWELL = pytest.param("haswell", marks=needs_avx2)
