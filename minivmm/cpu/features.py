"""The feature catalogue: every CPUID feature bit, with its Linux name and aliases.

One table, built once from two real data files shipped in ``minivmm/data``:

* the kernel's ``kcpuid/cpuid.csv`` gives positions and the Linux short names;
* libvirt's ``cpu_map/x86_features.xml`` adds the QEMU/libvirt spellings as aliases
  (``sse4.1``, ``sse4-1``, ``pclmuldq``...) and the few bits kcpuid lacks.
"""

from __future__ import annotations

import csv
import difflib
import functools
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from importlib import resources

from ..errors import MinivmmError

REGISTERS = ("eax", "ebx", "ecx", "edx")

# Leaves whose single-bit fields are capability flags. Elsewhere (caches, topology,
# XSAVE sizes) single bits are structure, not features.
FEATURE_LEAVES = frozenset({
    (0x1, 0), (0x6, 0), (0x7, 0), (0x7, 1), (0x7, 2), (0xD, 1), (0x14, 0), (0x19, 0),
    (0x80000001, 0), (0x80000007, 0), (0x80000008, 0), (0x8000000A, 0),
    (0x8000001F, 0), (0x80000021, 0),
})

# Where /proc/cpuinfo spells a bit differently from kcpuid.
LINUX_NAMES = {"cet_ss": "shstk", "guest_status": "hypervisor"}

# Bits that mirror OS state or the virtual platform rather than a capability of the
# silicon: never part of a physical ISA.
STATE_BITS = frozenset({"osxsave", "ospke", "hypervisor"})


@dataclass(frozen=True, order=True)
class Feature:
    name: str
    leaf: int
    subleaf: int
    register: str
    bit: int
    description: str = field(default="", compare=False)
    aliases: tuple[str, ...] = field(default=(), compare=False)

    @property
    def position(self) -> tuple[int, int, str, int]:
        return (self.leaf, self.subleaf, self.register, self.bit)

    @property
    def mask(self) -> int:
        return 1 << self.bit

    def is_set(self, regs: tuple[int, int, int, int]) -> bool:
        return bool(regs[REGISTERS.index(self.register)] >> self.bit & 1)


def _data(*parts: str):
    return resources.files("minivmm").joinpath("data", *parts)


def _kcpuid_rows():
    with _data("kcpuid", "cpuid.csv").open() as f:
        for row in csv.reader(line for line in f if line.strip() and not line.startswith("#")):
            leaf, subleaves, reg, bits, name = (c.strip() for c in row[:5])
            desc = ",".join(row[5:]).strip()
            if ":" in bits or ":" in subleaves:
                continue
            yield int(leaf, 0), int(subleaves, 0), reg, int(bits), name, desc


def _libvirt_rows():
    root = ET.parse(_data("cpu_map", "x86_features.xml").open()).getroot()
    for feat in root.iter("feature"):
        cpuid = feat.find("cpuid")
        if cpuid is None:
            continue  # MSR-only features (vmx-*, arch-capabilities bits)
        leaf = int(cpuid.get("eax_in"), 16)
        subleaf = int(cpuid.get("ecx_in", "0"), 16)
        for reg in REGISTERS:
            if cpuid.get(reg):
                bit = int(cpuid.get(reg), 16).bit_length() - 1
                aliases = [a.get("name") for a in feat.iter("alias")]
                yield leaf, subleaf, reg, bit, feat.get("name"), aliases


def canonical_spelling(name: str) -> str:
    """QEMU writes ``sse4.1``/``sse4-1``, Linux ``sse4_1``: compare in one spelling."""
    return re.sub(r"[.\-]", "_", name.strip().lower())


class Catalogue:
    """All feature bits, addressable by name, alias or position."""

    def __init__(self, features: list[Feature]):
        self.features = sorted(features, key=lambda f: f.position)
        self._by_position = {f.position: f for f in self.features}
        self._by_name: dict[str, Feature] = {}
        for f in self.features:
            self._by_name[f.name] = f
        for f in self.features:
            for alias in f.aliases:
                self._by_name.setdefault(canonical_spelling(alias), f)

    def __iter__(self):
        return iter(self.features)

    def __len__(self):
        return len(self.features)

    def get(self, name: str) -> Feature | None:
        return self._by_name.get(canonical_spelling(name))

    def __getitem__(self, name: str) -> Feature:
        feature = self.get(name)
        if feature is None:
            close = difflib.get_close_matches(canonical_spelling(name), self._by_name, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise MinivmmError(f"unknown CPU feature '{name}'{hint}")
        return feature

    def at(self, leaf: int, subleaf: int, register: str, bit: int) -> Feature | None:
        return self._by_position.get((leaf, subleaf, register, bit))

    def decode(self, table) -> frozenset[str]:
        """Names of the feature bits set in a CPUID table."""
        found = set()
        for f in self.features:
            regs = table.get((f.leaf, f.subleaf))
            if regs is not None and f.is_set(regs):
                found.add(f.name)
        return frozenset(found)


def _build() -> Catalogue:
    by_position: dict[tuple, dict] = {}
    for leaf, subleaf, reg, bit, name, desc in _kcpuid_rows():
        if (leaf, subleaf) not in FEATURE_LEAVES:
            continue
        linux = LINUX_NAMES.get(name, name)
        entry = {"name": linux, "description": desc, "aliases": [name] if linux != name else []}
        by_position[(leaf, subleaf, reg, bit)] = entry
    for leaf, subleaf, reg, bit, name, aliases in _libvirt_rows():
        entry = by_position.setdefault((leaf, subleaf, reg, bit),
                                       {"name": canonical_spelling(name), "description": "", "aliases": []})
        entry["aliases"].extend(a for a in [name, *aliases] if canonical_spelling(a) != entry["name"])
    # AMD repeats some leaf-1 EDX bits in 0x80000001 EDX under the same names; the
    # copies get kcpuid's "e_" prefix so that every name means one bit.
    seen: set[str] = set()
    features = []
    for pos in sorted(by_position):
        entry = by_position[pos]
        name = entry["name"]
        if name in seen:
            entry["aliases"] = []
            name = "e_" + name
        seen.add(name)
        features.append(Feature(name, *pos, description=entry["description"],
                                aliases=tuple(dict.fromkeys(entry["aliases"]))))
    return Catalogue(features)


@functools.cache
def catalogue() -> Catalogue:
    return _build()
