"""Full-state snapshots of a running VM, and the file format that stores them.

A snapshot is everything a faithful continuation needs: the vCPU registers (general,
segment and descriptor tables, control and debug registers, x87, SSE, MSRs), all guest
memory, the frozen guest CPUID view and mask, and the run's counters.

File format (never pickle, never the engine's raw context struct):

    magic  b"MINIVMM\\x00"   version u16 (little-endian)   section count u16
    section*: name (8 bytes, NUL padded) | compression u8 (0 none, 1 zstandard)
              | stored length u64 | payload length u64 | CRC-32 of the stored bytes u32 | stored bytes

Sections: ``meta`` and ``regs`` (JSON), ``cpuid`` (JSON), ``console`` (bytes),
``memory`` (zstandard: twenty times zlib's speed on RAM), and for a Linux program
``process`` (JSON: the kernel state of its processes, :mod:`minivmm.linux.state`) and,
when it runs several, ``memories`` (zstandard: the other processes' RAM, one after
another, in the order the state lists them). Every length is checked
against the file and against limits before anything is allocated, every CRC before
anything is used, the lists and values of a JSON section before it is parsed, and every
field by type and by the bound of what minivmm writes there: a damaged or hostile file
is refused with a clear error and nothing runs. Memory is decompressed only when a VM
resumes, straight into its RAM and never past the length the header declares, so
``inspect`` reads a snapshot of any size in the space of its file.
"""

from __future__ import annotations

import io
import json
import mmap
import re
import struct
import zlib
from dataclasses import dataclass, field

import unicorn.x86_const as x86
import zstandard

from ..cpu.table import MAX_ENTRIES, CpuidTable
from ..errors import MinivmmError
from ..files import MiB, read_bytes, write_atomically
from ..linux import state as process_state
from ..linux.scheduler import MAX_VM_MEMORY
from ..linux.vfs import PATH_MAX, Mount
from ..masking.formats import MAX_MASK
from . import MAX_MASKS, MAX_MEMORY, MIN_MEMORY
from .exits.io import CONSOLE_KEPT
from .ram import PAGE, touched_pages

MAGIC = b"MINIVMM\x00"
VERSION = 1
HEADER = struct.Struct("<8sHH")
SECTION = struct.Struct("<8sBQQI")
# Each section, list and string is bounded by what minivmm writes there; ``save``
# refuses a snapshot past a bound, so every snapshot minivmm writes, it reads.
MAX_SECTION = {"meta": 8 << 20,                       # masks stored by content: templates of up to 1 MiB
               "regs": 1 << 20,                       # about 200 registers of at most 512 bits
               "cpuid": 1 << 20,                      # MAX_ENTRIES leaves of six 32-bit numbers: 300 KB
               "console": CONSOLE_KEPT,               # the console keeps no more
               "memory": MAX_MEMORY, "process": process_state.MAX_STATE,
               "memories": MAX_VM_MEMORY}                # the VM's processes' RAM together is bounded
MAX_FILE = MAX_VM_MEMORY + 128 * MiB  # zstandard's worst case on incompressible RAM, plus the rest
MAX_HOSTS = 4096                  # hosts a VM ran on, one more per migration and resume
MAX_NAME = len("file:") + PATH_MAX  # a guest or host: a name, a path or file:PATH
REQUIRED = ("meta", "regs", "cpuid", "console", "memory")
POLICIES = ("live", "offline", "disabled")
CHUNK = 1 << 20                   # memory is decompressed this much at a time

# Restore order matters: control registers and MSRs first (EFER, then the modes they
# enable), descriptor tables before selectors, selectors before bases (a selector write
# reloads its base), then FPU/SSE, general registers, RIP last (ENGINE-NOTES).
CONTROL = ("CR0", "CR2", "CR3", "CR4", "CR8", "DR0", "DR1", "DR2", "DR3", "DR6", "DR7")
MSRS = {"EFER": 0xC0000080, "STAR": 0xC0000081, "LSTAR": 0xC0000082, "CSTAR": 0xC0000083,
        "FMASK": 0xC0000084, "KERNEL_GS_BASE": 0xC0000102, "TSC_AUX": 0xC0000103,
        "SYSENTER_CS": 0x174, "SYSENTER_ESP": 0x175, "SYSENTER_EIP": 0x176, "PAT": 0x277}
TABLES = ("GDTR", "IDTR", "LDTR", "TR")
SELECTORS = ("ES", "CS", "SS", "DS", "FS", "GS")
BASES = ("FS_BASE", "GS_BASE")
X87 = tuple(f"FP{i}" for i in range(8)) + ("FPCW", "FPSW", "FPTAG", "FIP", "FCS", "FDP", "FDS", "FOP")
SSE = ("MXCSR",) + tuple(f"XMM{i}" for i in range(16))
YMM = tuple(f"YMM{i}" for i in range(16))   # whole, upper halves included; written after XMM
ZMM = tuple(f"ZMM{i}" for i in range(32))   # AVX-512 hosts: whole, written after YMM
OPMASK = tuple(f"K{i}" for i in range(8))   # the engine has none: the native executor holds them
GENERAL = ("RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "RSP") + tuple(f"R{i}" for i in range(8, 16)) + ("RFLAGS",)
ORDER = (CONTROL, tuple(MSRS), TABLES, SELECTORS, BASES, X87, SSE, YMM, ZMM, GENERAL, ("RIP",))
ENGINE_REGISTERS = tuple(name for group in ORDER for name in group)
REGISTERS = ENGINE_REGISTERS + OPMASK
# YMM: snapshots written before minivmm kept YMM's upper halves lack them; ZMM and the
# opmask registers are there only from hosts with AVX-512
OPTIONAL = frozenset(YMM + ZMM + OPMASK)
# (elements, bits of each): descriptor tables are (selector, base, limit, flags), x87
# registers (mantissa, exponent); everything else one number.
SHAPES = {**{name: (4, 64) for name in TABLES}, **{f"FP{i}": (2, 64) for i in range(8)},
          **{f"XMM{i}": (1, 128) for i in range(16)}, **{name: (1, 256) for name in YMM},
          **{name: (1, 512) for name in ZMM}}
# (lists and objects, values) json.loads may build of each JSON section of a snapshot
# within those bounds: counted before it parses one, since a few bytes such as "[],"
# make a hundred bytes of Python objects.
MAX_OBSERVED = 1024              # feature names in meta.observed's lists: the catalogue has fewer
JSON_BOUNDS = {"meta": (6, 67 + MAX_MASKS + MAX_HOSTS + 2 * MAX_OBSERVED), "regs": (1 + len(SHAPES), 4 * len(REGISTERS)),
               "cpuid": (2 + MAX_ENTRIES, 2 + 7 * MAX_ENTRIES),
               "process": (process_state.JSON_CONTAINERS, process_state.JSON_VALUES)}
JSON_BOUNDS["offer"] = tuple(m + c + 1 for m, c in zip(JSON_BOUNDS["meta"], JSON_BOUNDS["cpuid"]))  # remote.py
# A string, or what opens a list or an object or separates values: at most three of
# these (a comma, a key, a value) for each value JSON holds.
JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[{,]', re.DOTALL)


def read_registers(uc, wide: bool = False) -> dict:
    """The engine's registers; ZMM0-31 too if ``wide`` (the host has AVX-512)."""
    regs = {}
    for name in ENGINE_REGISTERS:
        if name in ZMM and not wide:
            continue
        value = uc.reg_read(x86.UC_X86_REG_MSR, MSRS[name]) if name in MSRS else \
            uc.reg_read(getattr(x86, f"UC_X86_REG_{name}"))
        regs[name] = list(value) if isinstance(value, tuple) else value
    return regs


def write_registers(uc, regs: dict) -> None:
    for name in ENGINE_REGISTERS:
        if name not in regs:
            continue
        value = regs[name]
        if name in MSRS:
            uc.reg_write(x86.UC_X86_REG_MSR, (MSRS[name], value))
        else:
            uc.reg_write(getattr(x86, f"UC_X86_REG_{name}"), tuple(value) if isinstance(value, list) else value)


@dataclass
class Snapshot:
    meta: dict                 # guest, host, evc, memory, counters ...
    regs: dict
    cpuid: dict                # the frozen guest view: {"leaves": [[leaf, sub, a, b, c, d], ...]}
    console: bytes
    memory: bytes | None       # None when read from a file: see ``load_memory`` (or the RAM of a live VM)
    extra: dict = field(default_factory=dict)
    stored_memory: tuple[int, memoryview] | None = None   # (compression, stored bytes) in the file read
    process: dict | None = None    # a Linux program's kernel state
    origin: str = "snapshot"       # its file, for errors
    others: list = field(default_factory=list)   # the other processes' RAM (none when read from a file)
    stored_others: tuple[int, memoryview] | None = None   # (compression, stored bytes) of ``memories``

    def load_memory(self, ram) -> None:
        """Fill ``ram`` (a fresh, zeroed, writable buffer of ``meta.memory`` bytes) with
        the guest's memory, decompressing in place: never more than the header declared."""
        _load([self.memory] if self.memory is not None else None, self.stored_memory, [ram], "memory")

    def load_others(self, rams: list) -> None:
        """Fill ``rams`` (like ``load_memory``'s) with the other processes' memory."""
        if rams:
            _load(self.others or None, self.stored_others, rams, "memories")

    @property
    def processes(self) -> int:
        """The processes in the VM's kernel state that have memory (zombies have none)."""
        return 1 + len(self.process["machine"]["processes"]) if self.process and "machine" in self.process else 1

    @property
    def view_table(self) -> CpuidTable:
        return CpuidTable({(e[0], e[1]): tuple(e[2:6]) for e in self.cpuid["leaves"]}, self.origin)

    # ---- the file format -------------------------------------------------------------

    def to_bytes(self) -> bytes:
        return _pack(self._sections())

    def _sections(self) -> list[tuple[str, bytes, int]]:
        """(name, payload, compression) of each section."""
        assert self.memory is not None, "a snapshot read from a file is not written again"
        sections = [("meta", json.dumps(self.meta, sort_keys=True).encode(), 0),
                    ("regs", json.dumps(self.regs, sort_keys=True).encode(), 0),
                    ("cpuid", json.dumps(self.cpuid, sort_keys=True).encode(), 0),
                    ("console", bytes(self.console), 0),
                    ("memory", bytes(self.memory), 1)]
        if self.process is not None:
            sections.append(("process", json.dumps(self.process, sort_keys=True).encode(), 0))
        if self.others:
            sections.append(("memories", _Joined(self.others), 1))
        return sections

    @classmethod
    def from_bytes(cls, data: bytes, origin: str = "snapshot") -> Snapshot:
        def bad(msg):
            raise MinivmmError(f"{origin}: not a usable minivmm snapshot: {msg}")

        if len(data) < HEADER.size:
            bad(f"{len(data)} bytes, shorter than the {HEADER.size}-byte header")
        magic, version, count = HEADER.unpack_from(data, 0)
        if magic != MAGIC:
            bad("wrong magic number (not a snapshot file)")
        if version != VERSION:
            bad(f"format version {version}, this minivmm reads version {VERSION}")
        if count > len(MAX_SECTION):
            bad(f"{count} sections is more than any snapshot has")
        data = memoryview(data)  # sections are read where they lie, never copied whole
        offset, sections = HEADER.size, {}
        for i in range(count):
            if offset + SECTION.size > len(data):
                bad(f"truncated in the header of section {i + 1}")
            raw_name, compression, stored, length, crc = SECTION.unpack_from(data, offset)
            offset += SECTION.size
            name = raw_name.rstrip(b"\0").decode("ascii", "replace")
            if name not in MAX_SECTION:
                bad(f"unknown section '{name}'")
            if length > MAX_SECTION[name] or stored > MAX_SECTION[name] + 1024:
                bad(f"section '{name}' claims {length} bytes, more than the limit {MAX_SECTION[name]}")
            if offset + stored > len(data):
                bad(f"truncated: section '{name}' needs {stored} bytes, {len(data) - offset} remain")
            body = data[offset:offset + stored]
            offset += stored
            if zlib.crc32(body) != crc:  # any flipped bit, even one deflate would not notice
                bad(f"section '{name}' fails its checksum")
            if name in sections:
                bad(f"section '{name}' appears twice")
            if compression not in (0, 1) or (compression == 1 and name not in ("memory", "memories")):
                bad(f"section '{name}' has unknown compression {compression}")
            if compression == 0 and stored != length:
                bad(f"section '{name}' holds {stored} bytes, its header says {length}")
            sections[name] = (compression, body, length)
        if offset != len(data):
            bad(f"{len(data) - offset} bytes of garbage after the last section")
        missing = [n for n in REQUIRED if n not in sections]
        if missing:
            bad(f"missing section(s) {', '.join(missing)}")
        meta, regs, cpuid, process = (parse_json_section(n, sections[n][1], bad) if n in sections else None
                                      for n in ("meta", "regs", "cpuid", "process"))
        compression, body, length = sections["memory"]
        others = sections.get("memories", (0, b"", 0))
        snapshot = cls(meta, regs, cpuid, bytes(sections["console"][1]), None, stored_memory=(compression, body),
                       process=process, origin=origin, stored_others=others[:2])
        snapshot._validate(bad, length, others[2])
        return snapshot

    def _validate(self, bad, memory_length: int, others_length: int) -> None:
        """Every field by type and bound (``bad(message)`` raises)."""
        if not isinstance(self.regs, dict):
            bad("meta, regs and cpuid must be JSON objects")
        check_meta(self.meta, self.cpuid, bad, memory_length)
        _check_registers(self.regs, bad, "")
        if self.process is not None:
            try:
                process_state.validate(self.process, memory_length)
            except ValueError as e:
                bad(f"process: {e}")
            for thread in self.process.get("threads", [])[1:]:
                _check_registers(thread["regs"], bad, f"thread {thread['tid']}: ")
            for process in self.process.get("machine", {}).get("processes", []):
                for thread in process["threads"]:
                    _check_registers(thread["regs"], bad, f"process {process['tid']}, thread {thread['tid']}: ")
        if others_length != (self.processes - 1) * memory_length:
            bad(f"the other processes' memory is {others_length} bytes, not {self.processes - 1} times "
                f"meta.memory")

    def check(self, what: str) -> None:
        """Every field by type and bound, as a snapshot read from a file is checked: one
        made in memory (of a native process) is no more trusted than a file."""
        def bad(msg):
            raise MinivmmError(f"{what}: {msg}")
        self._validate(bad, len(self.memory), sum(len(ram) for ram in self.others))

    def summary(self) -> dict:
        """What inspect shows, with the --mount a Linux program's resume needs."""
        mounts = {"mounts": [str(Mount(*m)) for m in self.process["mounts"]],
                  "processes": self.processes} if self.process is not None else {}
        meta = {k: v for k, v in self.meta.items() if k != "observed"}   # (minivmm check reads it)
        return {**meta, "registers": len(self.regs), "cpuid_leaves": len(self.cpuid["leaves"]),
                "console_bytes": len(self.console), "rip": self.regs.get("RIP"), **mounts}


def check_meta(meta, cpuid, bad, memory_length: int) -> None:
    """The metadata and the CPUID view by type and bound, ``meta.memory`` the RAM's
    ``memory_length`` (``bad(message)`` raises): all a destination needs to decide."""
    if not isinstance(meta, dict) or not isinstance(cpuid, dict):
        bad("meta, regs and cpuid must be JSON objects")
    memory = meta.get("memory")
    if not _is_int(memory) or memory != memory_length or memory % 4096 or not MIN_MEMORY <= memory <= MAX_MEMORY:
        bad(f"meta.memory {memory!r} does not match the memory section of {memory_length} bytes "
            f"(a multiple of 4 KiB from {MIN_MEMORY} to {MAX_MEMORY})")
    fields = {"guest": str, "host": str, "entry": int, "evc": (str, type(None)), "masks": list,
              "policy": str, "checkpoints": int, "xcr0": (int, type(None)), "hosts": list}
    for key, kind in fields.items():
        if key not in meta:
            bad(f"meta.{key} is missing")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            bad(f"meta.{key} is {json.dumps(meta[key])[:40]}, not a {_kind_name(kind)}")
    for key in ("guest", "host", "evc"):
        if len(meta[key] or "") > MAX_NAME:
            bad(f"meta.{key} is longer than {MAX_NAME} characters")
    if not 0 <= meta["entry"] < memory:
        bad(f"meta.entry {meta['entry']:#x} is outside the guest's RAM")
    if meta["policy"] not in POLICIES:
        bad(f"meta.policy '{meta['policy'][:20]}' is not one of {', '.join(POLICIES)}")
    if meta["checkpoints"] < 0 or (meta["xcr0"] is not None and not 0 <= meta["xcr0"] < 1 << 64):
        bad("meta.checkpoints or meta.xcr0 is out of range")
    for key, most, longest in (("masks", MAX_MASKS, MAX_MASK), ("hosts", MAX_HOSTS, MAX_NAME)):
        if len(meta[key]) > most or not all(isinstance(item, str) and len(item) <= longest for item in meta[key]):
            bad(f"meta.{key} must be a list of at most {most} strings of at most {longest} characters")
    observed = meta.get("observed", {"read": [], "executed": [], "audited": False})
    if not isinstance(observed, dict) or not isinstance(observed.get("audited"), bool) or not all(
            isinstance(observed.get(key), list) and len(observed[key]) <= MAX_OBSERVED
            and all(isinstance(name, str) and len(name) <= 64 for name in observed[key]) for key in ("read", "executed")):
        bad(f"meta.observed must hold lists read and executed of at most {MAX_OBSERVED} feature names, and audited")
    leaves = cpuid.get("leaves")
    if not isinstance(leaves, list) or not leaves or len(leaves) > MAX_ENTRIES or not all(
            isinstance(e, list) and len(e) == 6 and all(_is_int(v) and 0 <= v <= 0xFFFFFFFF for v in e)
            for e in leaves):
        bad("the CPUID view is malformed")


def _check_registers(regs: dict, bad, where: str) -> None:
    """The register set of this format, each value of its shape (``bad(message)`` raises)."""
    unknown, missing = set(regs) - set(REGISTERS), set(REGISTERS) - OPTIONAL - set(regs)
    if unknown or missing:
        bad(f"{where}register set differs from this format's ({sorted(unknown or missing)[:3]})")
    for name, value in regs.items():
        count, bits = SHAPES.get(name, (1, 64))
        values = value if isinstance(value, list) and count > 1 else [value]
        if len(values) != count or not all(_is_int(v) and 0 <= v < 1 << bits for v in values):
            bad(f"{where}register {name} must be {'a list of ' + str(count) if count > 1 else 'one'} "
                f"{bits}-bit number{'s' if count > 1 else ''}")


class _Joined:
    """Buffers stored one after another as one section, compressed without joining them."""

    def __init__(self, buffers: list):
        self.buffers = buffers

    def __len__(self) -> int:
        return sum(len(b) for b in self.buffers)


def _compress(payload) -> bytes:
    if not isinstance(payload, _Joined):
        return zstandard.ZstdCompressor(level=1, threads=-1).compress(payload)
    out = io.BytesIO()
    with zstandard.ZstdCompressor(level=1, threads=-1).stream_writer(out, size=len(payload), closefd=False) as w:
        for buffer in payload.buffers:
            view = memoryview(buffer)
            for at in range(0, len(view), 16 * CHUNK):
                w.write(view[at:at + 16 * CHUNK])
    return out.getvalue()


def _load(live: list | None, stored: tuple | None, rams: list, what: str) -> None:
    """Fill ``rams`` (fresh, zeroed, writable buffers) from a live VM's memory (``live``:
    a buffer for each) or from a file's section (``stored``: (compression, bytes), the
    buffers one after another), decompressing in place: never more than the header
    declared, and chunks that are all zero left untouched (guest RAM starts zeroed, and
    pages never written stay unallocated on the machine)."""
    if live is not None:
        for source, ram in zip(live, rams):
            if isinstance(source, mmap.mmap):   # a live VM's RAM: the pages it ever wrote
                for page in touched_pages(source):
                    ram[page:page + PAGE] = source[page:page + PAGE]
                continue
            for at in range(0, len(ram), CHUNK):
                end = min(at + CHUNK, len(ram))
                if source.count(0, at, end) != end - at:
                    ram[at:end] = source[at:end]
        return
    compression, body = stored
    if compression == 0:
        at = 0
        for ram in rams:
            ram[:] = body[at:at + len(ram)]
            at += len(ram)
        return
    chunk, zero, extra = bytearray(CHUNK), bytes(CHUNK), b""
    total = sum(len(ram) for ram in rams)
    done = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True) as reader:
            for ram in rams:
                filled = 0
                while filled < len(ram):
                    got = reader.readinto(memoryview(chunk)[:min(CHUNK, len(ram) - filled)])
                    if not got:
                        break
                    if chunk[:got] != zero[:got]:
                        ram[filled:filled + got] = chunk[:got]
                    filled += got
                done += filled
                if filled < len(ram):
                    break
            extra = reader.read(1)
    except zstandard.ZstdError as e:
        raise MinivmmError(f"snapshot {what} does not decompress ({e})") from None
    if done != total or extra:
        raise MinivmmError(f"snapshot {what} holds {'more' if extra else done} bytes, its header says {total}")


def _pack(sections) -> bytes:
    out = [HEADER.pack(MAGIC, VERSION, len(sections))]
    for name, payload, compress in sections:
        stored = _compress(payload) if compress else payload
        out.append(SECTION.pack(name.encode().ljust(8, b"\0"), compress, len(stored), len(payload),
                                zlib.crc32(stored)))
        out.append(stored)
    return b"".join(out)


def parse_json_section(name: str, body, bad):
    """A JSON section, refused before json.loads builds anything when it holds more lists,
    objects or values than minivmm writes there (:func:`_check_json_bounds`)."""
    _check_json_bounds(name, body, bad)
    try:
        return json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        bad(f"section '{name}' does not parse as JSON ({str(e)[:80]})")


def _check_json_bounds(name: str, body, bad) -> None:
    """At most JSON_BOUNDS lists, objects and values: counted a token at a time, in
    constant memory, and no further than the bound."""
    most_containers, most_values = JSON_BOUNDS[name]
    containers = tokens = 0
    for token in JSON_TOKEN.finditer(body):
        containers += body[token.start()] in b"[{"
        tokens += 1
        if containers > most_containers or tokens > 3 * most_values:
            bad(f"section '{name}' holds more lists, objects or values than minivmm writes there "
                f"(at most {most_containers} lists and objects, {most_values} values)")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "string", int: "number", list: "list", type(None): "null"}
    return " or ".join(names[k] for k in kinds)


def save(snapshot: Snapshot, path: str) -> None:
    """Write ``snapshot`` to ``path``, refusing one past the format's bounds, as resume
    would: minivmm writes no snapshot it cannot read."""
    def bad(msg):
        raise MinivmmError(f"cannot save a snapshot to {path}: {msg}")

    sections = snapshot._sections()
    for name, payload, _ in sections:
        if len(payload) > MAX_SECTION[name]:
            bad(f"its {name} section would be {len(payload)} bytes, more than the limit {MAX_SECTION[name]}")
        if name in JSON_BOUNDS:
            _check_json_bounds(name, payload, bad)
    snapshot.check(f"cannot save a snapshot to {path}")
    write_atomically(path, _pack(sections), "snapshot")


def load(path: str) -> Snapshot:
    return Snapshot.from_bytes(read_bytes(path, "snapshot", MAX_FILE), path)
