"""Full-state snapshots of a running VM, and the file format that stores them.

A snapshot is everything a faithful continuation needs: the vCPU registers (general,
segment and descriptor tables, control and debug registers, x87, SSE, MSRs), all guest
memory, the frozen guest CPUID view and mask, and the run's counters.

File format (never pickle, never the engine's raw context struct):

    magic  b"MINIVMM\\x00"   version u16 (little-endian)   section count u16
    section*: name (8 bytes, NUL padded) | compression u8 (0 none, 1 zstandard)
              | stored length u64 | payload length u64 | CRC-32 of the stored bytes u32 | stored bytes

Sections: ``meta`` and ``regs`` (JSON), ``cpuid`` (JSON), ``console`` (bytes),
``memory`` (zstandard: twenty times zlib's speed on RAM). Every length is checked against the file and against limits before
anything is allocated, and every CRC before anything is used: a damaged or hostile
file is refused with a clear error and nothing runs.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field

import unicorn.x86_const as x86
import zstandard

from ..cpu.table import CpuidTable
from ..errors import MinivmmError

MAGIC = b"MINIVMM\x00"
VERSION = 1
HEADER = struct.Struct("<8sHH")
SECTION = struct.Struct("<8sBQQI")
MAX_MEMORY = 64 << 30
MAX_SECTION = {"meta": 1 << 20, "regs": 1 << 20, "cpuid": 4 << 20, "console": 64 << 20, "memory": MAX_MEMORY}
REQUIRED = ("meta", "regs", "cpuid", "console", "memory")

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
GENERAL = ("RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "RSP") + tuple(f"R{i}" for i in range(8, 16)) + ("RFLAGS",)
ORDER = (CONTROL, tuple(MSRS), TABLES, SELECTORS, BASES, X87, SSE, GENERAL, ("RIP",))
REGISTERS = tuple(name for group in ORDER for name in group)


def read_registers(uc, skip=()) -> dict:
    regs = {}
    for name in REGISTERS:
        if name in skip:
            continue
        value = uc.reg_read(x86.UC_X86_REG_MSR, MSRS[name]) if name in MSRS else \
            uc.reg_read(getattr(x86, f"UC_X86_REG_{name}"))
        regs[name] = list(value) if isinstance(value, tuple) else value
    return regs


def write_registers(uc, regs: dict) -> None:
    for name in REGISTERS:
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
    memory: bytes
    extra: dict = field(default_factory=dict)

    @property
    def view_table(self) -> CpuidTable:
        return CpuidTable({(e[0], e[1]): tuple(e[2:6]) for e in self.cpuid["leaves"]}, "snapshot")

    # ---- the file format -------------------------------------------------------------

    def to_bytes(self) -> bytes:
        sections = [("meta", json.dumps(self.meta, sort_keys=True).encode(), 0),
                    ("regs", json.dumps(self.regs, sort_keys=True).encode(), 0),
                    ("cpuid", json.dumps(self.cpuid, sort_keys=True).encode(), 0),
                    ("console", bytes(self.console), 0),
                    ("memory", bytes(self.memory), 1)]
        out = [HEADER.pack(MAGIC, VERSION, len(sections))]
        for name, payload, compress in sections:
            stored = zstandard.ZstdCompressor(level=1, threads=-1).compress(payload) if compress else payload
            out.append(SECTION.pack(name.encode().ljust(8, b"\0"), compress, len(stored), len(payload),
                                    zlib.crc32(stored)))
            out.append(stored)
        return b"".join(out)

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
        if count > 64:
            bad(f"{count} sections is more than any snapshot has")
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
            if compression == 1:
                try:  # bounded: a frame claiming more than the header's length is refused
                    payload = zstandard.ZstdDecompressor().decompress(body, max_output_size=length)
                except zstandard.ZstdError as e:
                    bad(f"section '{name}' does not decompress ({e})")
            elif compression == 0:
                payload = body
            else:
                bad(f"section '{name}' has unknown compression {compression}")
            if len(payload) != length:
                bad(f"section '{name}' holds {len(payload)} bytes, its header says {length}")
            sections[name] = payload
        if offset != len(data):
            bad(f"{len(data) - offset} bytes of garbage after the last section")
        missing = [n for n in REQUIRED if n not in sections]
        if missing:
            bad(f"missing section(s) {', '.join(missing)}")
        try:
            meta, regs, cpuid = (json.loads(sections[n]) for n in ("meta", "regs", "cpuid"))
        except (ValueError, UnicodeDecodeError) as e:
            bad(f"a JSON section does not parse ({e})")
        snapshot = cls(meta, regs, cpuid, sections["console"], sections["memory"])
        snapshot._validate(bad)
        return snapshot

    def _validate(self, bad) -> None:
        if not isinstance(self.meta, dict) or not isinstance(self.regs, dict) or not isinstance(self.cpuid, dict):
            bad("meta, regs and cpuid must be JSON objects")
        memory = self.meta.get("memory")
        if not isinstance(memory, int) or memory != len(self.memory) or memory % 4096 or memory < (2 << 20):
            bad(f"memory section of {len(self.memory)} bytes does not match meta.memory {memory!r}")
        for key in ("guest", "host"):
            if not isinstance(self.meta.get(key), str):
                bad(f"meta.{key} is missing")
        unknown = set(self.regs) - set(REGISTERS)
        if unknown or set(REGISTERS) - set(self.regs):
            bad(f"register set differs from this format's ({sorted(unknown or set(REGISTERS) - set(self.regs))[:3]})")
        for name, value in self.regs.items():
            values = value if isinstance(value, list) else [value]
            if not values or not all(isinstance(v, int) and 0 <= v < 1 << 128 for v in values):
                bad(f"register {name} has a malformed value")
        leaves = self.cpuid.get("leaves")
        if not isinstance(leaves, list) or not leaves or not all(
                isinstance(e, list) and len(e) == 6 and all(isinstance(v, int) and 0 <= v <= 0xFFFFFFFF for v in e)
                for e in leaves):
            bad("the CPUID view is malformed")

    def summary(self) -> dict:
        return {**self.meta, "registers": len(self.regs), "cpuid_leaves": len(self.cpuid["leaves"]),
                "console_bytes": len(self.console), "rip": self.regs.get("RIP")}


def save(snapshot: Snapshot, path: str) -> None:
    try:
        with open(path, "wb") as f:
            f.write(snapshot.to_bytes())
    except OSError as e:
        raise MinivmmError(f"cannot write snapshot {path}: {e.strerror}") from None


def load(path: str) -> Snapshot:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_MEMORY + (64 << 20):
                raise MinivmmError(f"{path}: {size} bytes is larger than any snapshot minivmm writes")
            data = f.read()
    except OSError as e:
        raise MinivmmError(f"cannot read snapshot {path}: {e.strerror}") from None
    return Snapshot.from_bytes(data, path)
