"""Guest images (SPEC section 2): assembly source, flat binaries and static ELF64.

Every loader returns a :class:`GuestImage` of ``(address, bytes)`` segments and an
entry point; a bad file raises :class:`MinivmmError` naming the file and the fault.
"""

from __future__ import annotations

import functools
import re
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import MinivmmError

LOAD_ADDRESS = 0x100000
ASM_SUFFIXES = (".asm", ".s", ".S")
SHIPPED_SUFFIXES = (".asm", ".S", ".s", ".bin", ".elf")


@dataclass(frozen=True)
class GuestImage:
    name: str
    kind: str  # "asm", "flat" or "elf"
    segments: tuple[tuple[int, bytes], ...]
    entry: int

    @property
    def end(self) -> int:
        return max(addr + len(data) for addr, data in self.segments)


# ---- finding a guest ------------------------------------------------------------------

def shipped_guests_dir():
    return resources.files("minivmm").joinpath("guests", "shipped")


def shipped_guests() -> list[str]:
    return sorted(p.name for p in shipped_guests_dir().iterdir()
                  if p.is_file() and p.name.endswith(SHIPPED_SUFFIXES))


def find_guest(spec: str) -> Path:
    """A path, or the name of a shipped guest with or without its extension."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise MinivmmError(f"guest '{spec}' is not a regular file")
    if "/" not in spec:
        shipped = shipped_guests_dir()
        for candidate in (spec, *(spec + s for s in SHIPPED_SUFFIXES)):
            entry = shipped.joinpath(candidate)
            if entry.is_file():
                return Path(str(entry))
    raise MinivmmError(f"guest '{spec}' not found: no such file and no shipped guest of that name "
                       f"(shipped: {', '.join(n.rsplit('.', 1)[0] for n in shipped_guests())})")


def load_guest(spec: str) -> GuestImage:
    path = find_guest(spec)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MinivmmError(f"cannot read guest {path}: {e.strerror}") from None
    if path.suffix in ASM_SUFFIXES:
        try:
            source = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise MinivmmError(f"{path}: assembly source is not UTF-8 text (byte {e.start})") from None
        return GuestImage(spec, "asm", ((LOAD_ADDRESS, assemble(source, str(path))),), LOAD_ADDRESS)
    if data[:4] == b"\x7fELF":
        return load_elf(data, spec)
    if not data:
        raise MinivmmError(f"{path}: empty guest image")
    return GuestImage(spec, "flat", ((LOAD_ADDRESS, data),), LOAD_ADDRESS)


# ---- assembly -------------------------------------------------------------------------

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
        text = strip_comments(raw)
        m = _INCLUDE.match(text)
        if not m:
            lines.append((text, origin, lineno))
            continue
        path = Path(origin).parent / m[1]
        if not path.exists():  # then the shipped guests' library, as a system include path
            path = Path(str(shipped_guests_dir().joinpath(m[1])))
        if depth > 8:
            raise MinivmmError(f"{origin}:{lineno}: .include nested too deeply")
        try:
            included = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise MinivmmError(f"{origin}:{lineno}: cannot include {m[1]}: {getattr(e, 'strerror', e)}") from None
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


def assemble(source: str, origin: str = "<asm>", address: int = LOAD_ADDRESS) -> bytes:
    located = preprocess(source, origin)
    lines = [text for text, _, _ in located]
    code, error = _try_assemble(lines, address)
    if error is not None:
        index, error = _locate_error(lines, address, error)
        message = re.sub(r"\s*\(KS_ERR_\w+\)", "", str(error))
        if index:
            text, file, lineno = located[index - 1]
            raise MinivmmError(f"{file}:{lineno}: assembler error: {message}: {text.strip()}")
        raise MinivmmError(f"{origin}: assembler error: {message}")
    if not code:
        raise MinivmmError(f"{origin}: assembles to nothing")
    return code


# ---- ELF64 ----------------------------------------------------------------------------

PT_LOAD = 1
ET_EXEC = 2
EM_X86_64 = 62


def load_elf(data: bytes, name: str) -> GuestImage:
    """A static ELF64 x86-64 executable, loaded by its PT_LOAD program headers."""
    def fail(msg):
        raise MinivmmError(f"{name}: {msg}")

    if len(data) < 64:
        fail(f"truncated ELF: {len(data)} bytes, the ELF64 header alone is 64")
    if data[4] != 2:
        fail("not an ELF64 file (EI_CLASS is not ELFCLASS64): minivmm runs x86-64 guests")
    if data[5] != 1:
        fail("not a little-endian ELF file")
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    e_entry, e_phoff = struct.unpack_from("<QQ", data, 24)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    if e_machine != EM_X86_64:
        fail(f"ELF machine {e_machine} is not x86-64 (62)")
    if e_type != ET_EXEC:
        fail(f"ELF type {e_type} is not a static executable (ET_EXEC); link with -static -no-pie")
    if e_phnum == 0:
        fail("ELF has no program headers")
    if e_phentsize < 56:
        fail(f"ELF program header size {e_phentsize} is smaller than 56")
    if e_phoff + e_phnum * e_phentsize > len(data):
        fail(f"truncated ELF: program headers end at byte {e_phoff + e_phnum * e_phentsize}, "
             f"file has {len(data)}")
    segments = []
    for i in range(e_phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz, p_memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", data, e_phoff + i * e_phentsize)
        if p_type != PT_LOAD:
            continue
        if p_filesz > p_memsz:
            fail(f"program header {i}: p_filesz {p_filesz} exceeds p_memsz {p_memsz}")
        if p_offset + p_filesz > len(data):
            fail(f"truncated ELF: segment {i} needs bytes {p_offset}..{p_offset + p_filesz}, "
                 f"file has {len(data)}")
        body = data[p_offset:p_offset + p_filesz] + bytes(p_memsz - p_filesz)
        segments.append((p_vaddr, body))
    if not segments:
        fail("ELF has no PT_LOAD segment")
    return GuestImage(name, "elf", tuple(segments), e_entry)
