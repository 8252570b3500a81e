"""Guest images (docs/abi.md): assembly source, flat binaries and static ELF64.

Every loader returns a :class:`GuestImage` of ``(address, bytes, size in memory)``
segments (the rest of a segment beyond its bytes is zero, as guest RAM starts) and an
entry point; a bad file raises :class:`MinivmmError` naming the file and the fault.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import MinivmmError
from ..files import MiB, read_bytes, read_text
from . import LOAD_ADDRESS, shipped_guests_dir
from .assembler import MAX_SOURCE, assemble

ASM_SUFFIXES = (".asm", ".s", ".S")
SHIPPED_SUFFIXES = (".asm", ".S", ".s", ".bin", ".elf")
MAX_IMAGE = 256 * MiB             # a guest file (image or assembly source)
MAX_ADDRESS = 1 << 32             # no segment lies beyond the largest guest RAM (4 GiB)


@dataclass(frozen=True)
class GuestImage:
    name: str
    kind: str  # "asm", "flat" or "elf"
    segments: tuple[tuple[int, bytes, int], ...]
    entry: int
    path: str | None = None       # the file it came from, which no output may overwrite
    memory: str | None = None     # the RAM the guest declares it needs ("; minivmm: memory 64M")
    linux: dict | None = None     # a Linux program: where its program headers are, its name

    def __post_init__(self):
        # (address, bytes) is accepted too: a segment as long as its bytes.
        object.__setattr__(self, "segments", tuple((seg[0], seg[1], seg[2] if len(seg) > 2 else len(seg[1]))
                                                   for seg in self.segments))

    @property
    def end(self) -> int:
        return max(addr + size for addr, _, size in self.segments)


# ---- finding a guest ------------------------------------------------------------------

def shipped_guests() -> list[str]:
    return sorted(p.name for p in shipped_guests_dir().iterdir()
                  if p.is_file() and p.name.endswith(SHIPPED_SUFFIXES))


def find_guest(spec: str) -> Path:
    """A path, or the name of a shipped guest with or without its extension."""
    if len(os.fsencode(spec)) > os.pathconf("/", "PC_PATH_MAX") or any(
            len(part) > os.pathconf("/", "PC_NAME_MAX") for part in os.fsencode(spec).split(b"/")):
        raise MinivmmError(f"guest name '{spec[:40]}...' is longer than the operating system allows "
                           f"for a file name")
    if "\0" in spec:
        raise MinivmmError(f"guest name {spec!r} contains a NUL byte")
    path = Path(spec).expanduser()
    if os.path.lexists(path):
        return path  # read_bytes says what is wrong with anything but a regular file
    if "/" not in spec:
        shipped = shipped_guests_dir()
        for candidate in (spec, *(spec + s for s in SHIPPED_SUFFIXES)):
            entry = shipped.joinpath(candidate)
            if entry.is_file():
                return Path(str(entry))
    raise MinivmmError(f"guest '{spec}' not found: no such file and no shipped guest of that name "
                       f"(shipped: {', '.join(n.rsplit('.', 1)[0] for n in shipped_guests())})")


def load_guest(spec: str, linux: bool | None = None) -> GuestImage:
    """``linux``: run an ELF as a Linux program (None: when the file says it is one)."""
    path = find_guest(spec)
    if path.suffix in ASM_SUFFIXES:
        source = read_text(path, "assembly source", MAX_SOURCE)
        code = assemble(source, str(path))
        return GuestImage(spec, "asm", ((LOAD_ADDRESS, code, len(code)),), LOAD_ADDRESS, str(path),
                          declared_memory(source))
    data = read_bytes(path, "guest", MAX_IMAGE)
    if data[:4] == b"\x7fELF":
        return load_elf(data, spec, str(path), linux)
    if data[:2] == b"#!" and (linux or linux is None and path.suffix != FLAT_SUFFIX):
        # A Linux script: its interpreter is found in the program's file system when it starts.
        info = {"script": True, "execfn": spec, "exe": os.path.abspath(path)}
        return GuestImage(spec, "linux", (), 0, str(path), LINUX_MEMORY, info)
    if linux:
        raise MinivmmError(f"{path}: a Linux program must be an ELF executable or a #! script")
    if not data or (path.suffix != FLAT_SUFFIX and is_text(data)):
        raise MinivmmError(f"{path}: not a guest: {'an empty file' if not data else 'a text file'}; "
                           f"{ACCEPTED}")
    return GuestImage(spec, "flat", ((LOAD_ADDRESS, data, len(data)),), LOAD_ADDRESS, str(path))


FLAT_SUFFIX = ".bin"
ACCEPTED = ("minivmm runs assembly source (.asm, .s, .S), ELF64 executables (static guests, which "
            "'minivmm cc' builds from C, and Linux programs) and flat binaries of machine code")
_CONTROL = re.compile(rb"[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f]")   # all but tab, line breaks and ESC


def is_text(data: bytes) -> bool:
    """Readable text: UTF-8 without control bytes but line breaks, tabs and escapes.
    Machine code is almost never that (a zero byte, a ModRM or an immediate above 0x7F
    that starts no UTF-8 sequence): a C source, /etc/passwd or a README given as a
    guest is refused instead of executed. Code that does read as text (alphanumeric
    shellcode) runs as a flat binary when its name ends in .bin."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return _CONTROL.search(data) is None


_MEMORY_PRAGMA = re.compile(r"^\s*;\s*minivmm:\s*memory\s+(\S+)\s*$", re.MULTILINE)


def declared_memory(source: str) -> str | None:
    """An assembly guest may say how much RAM it needs in a comment line of its own:
    ``; minivmm: memory 64M``. It is the VM's default size, as if given by --memory."""
    m = _MEMORY_PRAGMA.search(source)
    return m[1] if m else None


# ---- ELF64 ----------------------------------------------------------------------------

PT_LOAD = 1
ET_EXEC = 2
EM_X86_64 = 62


PT_INTERP, PT_PHDR, PT_TLS = 3, 6, 7
PF_X, PF_W, PF_R = 1, 2, 4
PATH_MAX = 4096
ET_DYN = 3
ELFOSABI_GNU = 3
PIE_BASE = 0x1000000              # where a static-pie (ET_DYN) Linux program is placed
LINUX_MEMORY = "256M"             # a Linux program's default RAM (its heap, mmap area and stack)


def load_elf(data: bytes, name: str, path: str | None = None, linux: bool | None = None,
             base: int | None = None) -> GuestImage:
    """An ELF64 x86-64 executable, loaded by its PT_LOAD program headers: a static
    guest of minivmm's ABI, or a Linux program (``linux``; None decides by the file:
    PT_INTERP, PT_TLS or the GNU/Linux OS ABI make it one). ``base``: where an ET_DYN
    image goes (default PIE_BASE). A Linux program's ``linux`` info has its program
    headers' address, its interpreter and each segment's PROT_* bits."""
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
    if e_phnum == 0:
        fail("ELF has no program headers")
    if e_phentsize < 56:
        fail(f"ELF program header size {e_phentsize} is smaller than 56")
    if e_phoff + e_phnum * e_phentsize > len(data):
        fail(f"truncated ELF: program headers end at byte {e_phoff + e_phnum * e_phentsize}, "
             f"file has {len(data)}")
    headers = [struct.unpack_from("<IIQQQQQQ", data, e_phoff + i * e_phentsize) for i in range(e_phnum)]
    kinds = {h[0] for h in headers}
    if linux is None:
        linux = bool(kinds & {PT_INTERP, PT_TLS}) or data[7] == ELFOSABI_GNU
    interp = _interpreter(headers, data, fail) if PT_INTERP in kinds and linux else None
    if e_type not in (ET_EXEC, ET_DYN) or (e_type == ET_DYN and not linux):
        fail(f"ELF type {e_type} is not a static executable (ET_EXEC); link with -static -no-pie")
    if base is None:
        base = PIE_BASE if e_type == ET_DYN else 0
    segments, prots, offsets = [], [], []
    for i, (p_type, p_flags, p_offset, p_vaddr, _paddr, p_filesz, p_memsz, _align) in enumerate(headers):
        if p_type != PT_LOAD:
            continue
        if p_filesz > p_memsz:
            fail(f"program header {i}: p_filesz {p_filesz} exceeds p_memsz {p_memsz}")
        if p_offset + p_filesz > len(data):
            fail(f"truncated ELF: segment {i} needs bytes {p_offset}..{p_offset + p_filesz}, "
                 f"file has {len(data)}")
        if base + p_vaddr + p_memsz > MAX_ADDRESS:  # nothing is allocated for p_memsz: RAM starts zeroed
            fail(f"segment {i} at {p_vaddr:#x} of {p_memsz:#x} bytes lies beyond the largest guest RAM")
        segments.append((base + p_vaddr, data[p_offset:p_offset + p_filesz], p_memsz))
        prots.append((1 if p_flags & PF_R else 0) | (2 if p_flags & PF_W else 0) | (4 if p_flags & PF_X else 0))  # PROT_*
        offsets.append(p_offset)
    if not segments:
        fail("ELF has no PT_LOAD segment")
    if not linux:
        return GuestImage(name, "elf", tuple(segments), e_entry, path)
    phdr = next((base + h[3] for h in headers if h[0] == PT_PHDR), None)
    if phdr is None:  # the headers as loaded: inside the segment that maps file offset e_phoff
        phdr = next((base + h[3] + e_phoff - h[2] for h in headers
                     if h[0] == PT_LOAD and h[2] <= e_phoff < h[2] + h[5]), 0)
    info = {"phdr": phdr, "phnum": e_phnum, "execfn": name, "exe": os.path.abspath(path or name),
            "interp": interp, "prot": prots, "offset": offsets, "dynamic": e_type == ET_DYN}
    return GuestImage(name, "linux", tuple(segments), base + e_entry, path, LINUX_MEMORY, info)


def _interpreter(headers, data: bytes, fail) -> str:
    """PT_INTERP's path, checked as the kernel checks it (fs/binfmt_elf.c
    load_elf_binary: 2 to PATH_MAX bytes, inside the file, NUL-terminated)."""
    _, _, offset, _, _, size, _, _ = next(h for h in headers if h[0] == PT_INTERP)
    if not 2 <= size <= PATH_MAX or offset + size > len(data):
        fail(f"corrupt interpreter path: PT_INTERP holds {size} bytes at offset {offset} "
             f"(a path of 2 to {PATH_MAX} bytes inside the file)")
    raw = data[offset:offset + size]
    if raw[-1:] != b"\0":
        fail(f"corrupt interpreter path {raw[:80]!r}: not NUL-terminated")
    return raw.split(b"\0")[0].decode("utf-8", "surrogateescape")
