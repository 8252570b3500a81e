"""Assembly guests: keystone, with NASM-style comments, ``.include`` and errors that
name the file and line.

keystone runs in a forked child with a deadline: some inputs (a line holding only
``*`` or ``:``) make it loop forever inside C, where neither a timeout nor Ctrl-C can
reach it. The child reports each line before trying it alone, so a hang names its line.
"""

from __future__ import annotations

import functools
import os
import re
import select
import signal
import time
from pathlib import Path

from ..errors import MinivmmError
from ..files import MiB, read_text
from . import LOAD_ADDRESS, shipped_guests_dir

MAX_SOURCE = 16 * MiB             # one assembly source or .include file
DEADLINE = 5.0                    # seconds keystone may take for one source

@functools.cache
def _keystone():
    from keystone import KS_ARCH_X86, KS_MODE_64, Ks
    return Ks(KS_ARCH_X86, KS_MODE_64)


def strip_comments(line: str) -> str:
    """``;`` comments (outside strings) and ``#`` lines removed: keystone would read
    ``;`` as a statement separator."""
    if line.lstrip().startswith("#"):
        return ""
    out, quote, escaped = [], None, False
    for ch in line:
        if quote:
            escaped = ch == "\\" and not escaped
            if ch == quote and not escaped:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == ";":
            break
        out.append(ch)
    return "".join(out).rstrip()


_INCLUDE = re.compile(r'^\s*\.include\s+"([^"]+)"\s*$')


def preprocess(source: str, origin: str, depth: int = 0) -> list[tuple[str, str, int]]:
    """Lines as ``(text, file, line number)``, comments stripped and ``.include "FILE"``
    expanded (relative to the including file, else to the shipped guests, so any guest
    can use ``lib/console.inc``), so errors name the right place."""
    lines = []
    for lineno, raw in enumerate(source.splitlines(), 1):
        if "\0" in raw:  # keystone would silently stop reading at it
            raise MinivmmError(f"{origin}:{lineno}: a NUL byte in assembly source (column {raw.index(chr(0)) + 1})")
        text = strip_comments(raw)
        m = _INCLUDE.match(text)
        if not m:
            lines.append((text, origin, lineno))
            continue
        path = Path(origin).parent / m[1]
        if not os.path.lexists(path):  # then the shipped guests' library, as a system include path
            path = Path(str(shipped_guests_dir().joinpath(m[1])))
        if depth > 8:
            raise MinivmmError(f"{origin}:{lineno}: .include nested too deeply")
        try:
            included = read_text(path, "include file", MAX_SOURCE)
        except MinivmmError as e:
            raise MinivmmError(f"{origin}:{lineno}: {e}") from None
        lines.extend(preprocess(included, str(path), depth + 1))
    return lines


def _try_assemble(lines: list[str], address: int):
    """(bytes, None) or (None, KsError)."""
    from keystone import KsError
    try:
        encoding, _ = _keystone().asm("\n".join(lines), address)
        return bytes(encoding or b""), None
    except KsError as e:
        return None, e


def _symbol_missing(error) -> bool:
    from keystone import KS_ERR_ASM_SYMBOL_MISSING
    return error.errno == KS_ERR_ASM_SYMBOL_MISSING


def _locate_error(lines: list[str], address: int, error):
    """(1-based line, its error): keystone reports no line numbers, so re-assemble."""
    if _symbol_missing(error):
        # The line whose removal cures the error is the one naming the missing symbol.
        for i, line in enumerate(lines):
            if line.strip() and not line.strip().endswith(":"):
                trial = lines[:i] + [""] + lines[i + 1:]
                _, e = _try_assemble(trial, address)
                if e is None:
                    return i + 1, error
        return 0, error
    # Otherwise the shortest failing prefix ends at the culprit; forward references in
    # a prefix fail as missing symbols and do not count.
    lo, hi, first = 1, len(lines), error
    while lo < hi:
        mid = (lo + hi) // 2
        _, e = _try_assemble(lines[:mid], address)
        if e is not None and not _symbol_missing(e):
            hi, first = mid, e
        else:
            lo = mid + 1
    return lo, first


def _assemble_here(lines: list[str], address: int, progress) -> tuple[bytes | None, int, str]:
    """(code, 0, "") or (None, 1-based line or 0, message); ``progress(i)`` before line i
    is tried alone, so that a hang can be blamed on it."""
    for i, line in enumerate(lines, 1):
        if line.strip():
            progress(i)
            _try_assemble([line], address)
    progress(0)
    code, error = _try_assemble(lines, address)
    if error is None:
        return code, 0, ""
    index, error = _locate_error(lines, address, error)
    return None, index, re.sub(r"\s*\(KS_ERR_\w+\)", "", str(error))


def _assemble_guarded(lines: list[str], address: int, deadline: float) -> tuple[bytes | None, int, str]:
    """``_assemble_here`` in a forked child, killed at the deadline."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running the parent's cleanup
        try:
            os.close(read_end)
            out = os.fdopen(write_end, "wb", buffering=0)
            code, index, message = _assemble_here(lines, address, lambda i: out.write(f"L{i}\n".encode()))
            out.write(b"R" + (code.hex() if code is not None else "").encode() + f" {index} {message}".encode()
                      + b"\n")
        finally:
            os._exit(0)
    os.close(write_end)
    chunks, ends = [], time.monotonic() + deadline
    try:
        while True:
            left = ends - time.monotonic()
            if left <= 0 or not select.select([read_end], [], [], left)[0]:
                break
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
    records = b"".join(chunks).decode("utf-8", "replace").splitlines()
    if records and records[-1].startswith("R"):
        code_hex, index, message = (records[-1][1:].split(" ", 2) + ["", ""])[:3]
        return (bytes.fromhex(code_hex) if code_hex else None), int(index), message
    trying = [int(r[1:]) for r in records if r.startswith("L") and r[1:].isdigit()]
    line = trying[-1] if trying else 0
    return None, line, f"the assembler did not finish within {deadline:g} s on this input"


def assemble(source: str, origin: str = "<asm>", address: int = LOAD_ADDRESS) -> bytes:
    located = preprocess(source, origin)
    lines = [text for text, _, _ in located]
    code, index, message = _assemble_guarded(lines, address, DEADLINE)
    if code is None:
        if index:
            text, file, lineno = located[index - 1]
            raise MinivmmError(f"{file}:{lineno}: assembler error: {message}: {text.strip()}")
        raise MinivmmError(f"{origin}: assembler error: {message}")
    if not code:
        raise MinivmmError(f"{origin}: assembles to nothing")
    return code
