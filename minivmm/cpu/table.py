"""Raw CPUID tables: ``(leaf, subleaf) -> (eax, ebx, ecx, edx)``, as a real CPU answers.

Parses the two dump formats users have (libvirt's ``cputestdata`` XML and the
``cpuid -1 -r`` text of Todd Allen's tool), prints the latter, decodes the
signature, and answers queries for any leaf with the real processors' rules.
"""

from __future__ import annotations

import re
import struct
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import MinivmmError

Regs = tuple[int, int, int, int]
EXTENDED = 0x80000000

# Leaves whose output depends on ECX (Intel SDM Vol. 2A, CPUID; AMD APM Vol. 3, App. E).
# Every other leaf ignores ECX.
INDEXED_LEAVES = frozenset({
    0x4, 0x7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1B, 0x1D, 0x1E, 0x1F, 0x20,
    0x23, 0x24, 0x8000001D, 0x80000020, 0x80000026,
})
# Topology leaves echo the subleaf in ECX[7:0] even past the last level.
TOPOLOGY_LEAVES = frozenset({0xB, 0x1F, 0x80000026})

VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd", "HygonGenuine": "hygon"}
MAX_ENTRIES = 4096  # (leaf, subleaf) pairs in a table: real CPUs have fewer than a hundred (86 in data/)


@dataclass(frozen=True)
class Signature:
    family: int
    model: int
    stepping: int

    @classmethod
    def decode(cls, eax: int) -> Signature:
        # Intel SDM Vol. 2A, "Figure 3-6 Version Information Returned by CPUID in EAX":
        # the extended family is added only when the base family is 0xF; the extended
        # model is used for families 0x6 and 0xF.
        base_family = eax >> 8 & 0xF
        family = base_family + (eax >> 20 & 0xFF if base_family == 0xF else 0)
        model = eax >> 4 & 0xF
        if base_family in (0x6, 0xF):
            model |= (eax >> 16 & 0xF) << 4
        return cls(family, model, eax & 0xF)

    def encode(self) -> int:
        base_family = min(self.family, 0xF)
        ext_family = self.family - 0xF if self.family > 0xF else 0
        return (ext_family << 20 | (self.model >> 4) << 16 | base_family << 8
                | (self.model & 0xF) << 4 | self.stepping)


def regs_to_text(*words: int) -> str:
    return struct.pack(f"<{len(words)}I", *words).decode("latin-1").rstrip("\0").strip()


class CpuidTable(Mapping):
    """An immutable CPUID dump with the lookup rules of the CPU that produced it."""

    def __init__(self, entries: Mapping[tuple[int, int], Regs], origin: str = ""):
        where = origin or "CPUID table"
        if len(entries) > MAX_ENTRIES:
            raise MinivmmError(f"{where}: {len(entries)} (leaf, subleaf) entries, more than {MAX_ENTRIES}")
        wide = next((key for key in entries if max(key) > 0xFFFFFFFF), None)
        if wide:
            raise MinivmmError(f"{where}: leaf {wide[0]:#x} subleaf {wide[1]:#x}: EAX and ECX are 32 bits")
        self._entries = {k: tuple(v) for k, v in sorted(entries.items())}
        self.origin = origin
        if (0, 0) not in self._entries:
            raise MinivmmError(f"{where}: no leaf 0 (vendor and maximum leaf)")

    # Mapping protocol: the raw entries, exactly as dumped.
    def __getitem__(self, key):
        return self._entries[key]

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)

    def replace(self, changes: Mapping[tuple[int, int], Regs]) -> CpuidTable:
        return CpuidTable({**self._entries, **changes}, self.origin)

    @property
    def vendor_string(self) -> str:
        _, ebx, ecx, edx = self._entries[(0, 0)]
        return regs_to_text(ebx, edx, ecx)

    @property
    def vendor(self) -> str:
        return VENDORS.get(self.vendor_string, "unknown")

    @property
    def max_basic(self) -> int:
        return self._entries[(0, 0)][0]

    @property
    def max_extended(self) -> int:
        regs = self._entries.get((EXTENDED, 0))
        return regs[0] if regs and regs[0] >= EXTENDED else 0

    @property
    def signature(self) -> Signature:
        return Signature.decode(self.query(1, 0)[0])

    @property
    def brand(self) -> str:
        if self.max_extended < 0x80000004:
            return ""
        words = [w for leaf in (0x80000002, 0x80000003, 0x80000004) for w in self.query(leaf, 0)]
        return regs_to_text(*words)

    @property
    def indexed_leaves(self) -> frozenset[int]:
        """Leaves whose answer depends on the subleaf in ECX."""
        return INDEXED_LEAVES | {leaf for leaf, sub in self._entries if sub}

    def is_indexed(self, leaf: int) -> bool:
        return leaf in self.indexed_leaves

    def in_range(self, leaf: int) -> bool:
        if leaf < EXTENDED:
            return leaf <= self.max_basic
        return leaf <= self.max_extended

    def query(self, leaf: int, subleaf: int = 0) -> Regs:
        """What CPUID with EAX=leaf, ECX=subleaf returns on this CPU."""
        leaf &= 0xFFFFFFFF
        subleaf &= 0xFFFFFFFF
        if not self.in_range(leaf):
            # Intel SDM Vol. 2A, CPUID: "If a value entered for CPUID.EAX is higher than
            # the maximum input value for basic or extended function for that processor
            # then the data for the highest basic information leaf is returned."
            # AMD processors return zeros for functions beyond their maxima.
            if self.vendor != "intel":
                return (0, 0, 0, 0)
            leaf = self.max_basic
        if not self.is_indexed(leaf):
            subleaf = 0
        regs = self._entries.get((leaf, subleaf))
        if regs is not None:
            return regs
        if leaf in TOPOLOGY_LEAVES:
            return (0, 0, subleaf & 0xFF, 0)
        return (0, 0, 0, 0)

    def raw_lines(self) -> list[str]:
        """The table in ``cpuid -1 -r`` format, its ``CPU:`` line included, so it diffs
        against the real tool."""
        return ["CPU:"] + [f"   0x{leaf:08x} 0x{sub:02x}: eax=0x{a:08x} ebx=0x{b:08x} ecx=0x{c:08x} edx=0x{d:08x}"
                for (leaf, sub), (a, b, c, d) in self._entries.items()]

    # ---- parsers -------------------------------------------------------------------

    @classmethod
    def from_libvirt_xml(cls, text: str, origin: str) -> CpuidTable:
        try:
            root = ET.fromstring(text)
        except ET.ParseError as e:
            raise MinivmmError(f"{origin}: not a valid CPUID dump XML ({e})") from None
        entries = {}
        for i, el in enumerate(root.iter("cpuid"), 1):
            try:
                key = (int(el.get("eax_in"), 16), int(el.get("ecx_in", "0"), 16))
                entries[key] = tuple(int(el.get(r), 16) & 0xFFFFFFFF for r in ("eax", "ebx", "ecx", "edx"))
            except (TypeError, ValueError):
                raise MinivmmError(f"{origin}: <cpuid> element {i} lacks a hex eax_in/eax/ebx/ecx/edx") from None
        if not entries:
            raise MinivmmError(f"{origin}: no <cpuid> entries")
        return cls(entries, origin)

    _RAW_LINE = re.compile(
        r"^\s*0x([0-9a-fA-F]+)\s+0x([0-9a-fA-F]+):\s*eax=0x([0-9a-fA-F]+)\s+ebx=0x([0-9a-fA-F]+)"
        r"\s+ecx=0x([0-9a-fA-F]+)\s+edx=0x([0-9a-fA-F]+)\s*$")

    @classmethod
    def from_cpuid_raw(cls, text: str, origin: str) -> CpuidTable:
        """``cpuid -1 -r`` output (it opens with ``CPU:``); with ``cpuid -r`` (``CPU 0:``,
        ``CPU 1:`` ...) the first CPU is taken."""
        entries = {}
        cpus = 0
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            if re.match(r"^\s*CPU(\s+\d+)?:\s*$", line):
                cpus += 1
                if cpus > 1:
                    break
                continue
            m = cls._RAW_LINE.match(line)
            if not m:
                raise MinivmmError(f"{origin}:{lineno}: not a 'cpuid -r' line: {line.strip()[:60]!r}")
            leaf, sub, *regs = (int(g, 16) for g in m.groups())
            entries[(leaf, sub)] = tuple(r & 0xFFFFFFFF for r in regs)
        if not entries:
            raise MinivmmError(f"{origin}: no CPUID lines found")
        return cls(entries, origin)

    @classmethod
    def from_text(cls, text: str, origin: str) -> CpuidTable:
        if text.lstrip().startswith("<"):
            return cls.from_libvirt_xml(text, origin)
        return cls.from_cpuid_raw(text, origin)
