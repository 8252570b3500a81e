"""CPUID masks: what a hypervisor changes in the CPUID a guest sees, and how users write it.

A mask is, per ``(leaf, subleaf, register)``, a modifier ``(filter, value)`` applied as
``new = (old & ~filter) | value`` (Firecracker's ``CpuidRegisterModifier``), plus the
migration-check marks that transform nothing: VMware's T/F (the host must have 1/0),
R/H (the real bit must match on source and destination; R also reports 0), x (the
guest does not use the bit), and Xen's k (host value, kept across migration: H).

Each bit is therefore one *transformation* (keep, 0, 1) and at most one *mark*. How
users write masks (every format of docs/masks.md) is :mod:`.formats`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..cpu.features import REGISTERS, catalogue
from ..cpu.table import CpuidTable

FULL = 0xFFFFFFFF
MARKS = ("must_one", "must_zero", "must_match", "ignored")
Key = tuple[int, int, str]  # (leaf, subleaf, register)


@dataclass(frozen=True)
class RegisterMask:
    filter: int = 0        # bits the mask sets...
    value: int = 0         # ...to these values (value is within filter)
    must_one: int = 0      # VMware T: the host must have 1 to power on and migrate
    must_zero: int = 0     # VMware F: the host must have 0
    must_match: int = 0    # VMware R/H, Xen k: the real bit must match on source and destination
    ignored: int = 0       # VMware x: the guest does not use the bit

    def __post_init__(self):
        if self.value & ~self.filter:
            raise ValueError("a modifier's value must lie within its filter")

    def apply(self, old: int) -> int:
        return (old & ~self.filter) | self.value

    @property
    def marked(self) -> int:
        return self.must_one | self.must_zero | self.must_match | self.ignored

    def then(self, later: RegisterMask) -> RegisterMask:
        """This modifier followed by ``later``: later's forced bits and marks win."""
        taken = later.marked
        return RegisterMask(
            self.filter | later.filter, (self.value & ~later.filter) | later.value,
            *((getattr(self, m) & ~taken) | getattr(later, m) for m in MARKS))

    def __bool__(self):
        return bool(self.filter or self.marked)


@dataclass(frozen=True)
class Mask:
    """A whole mask: ``mask.apply(table)``, ``a.then(b)``; ``formats.parse_mask(spec)`` builds one."""
    registers: Mapping[Key, RegisterMask] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "registers", {k: v for k, v in sorted(self.registers.items()) if v})

    def __call__(self, table: CpuidTable) -> CpuidTable:
        return self.apply(table)

    def __eq__(self, other):
        return isinstance(other, Mask) and self.registers == other.registers

    def __hash__(self):
        return hash(tuple(self.registers.items()))

    def __bool__(self):
        return bool(self.registers)

    def apply(self, table: CpuidTable) -> CpuidTable:
        """The table with every modifier applied. The range leaves (0 and 0x80000000) go
        first: a leaf outside the resulting range does not exist, so it is not created."""
        ranges = {k: m for k, m in self.registers.items() if k[:2] in ((0, 0), (0x80000000, 0))}
        table = self._modify(table, ranges)
        rest = {k: m for k, m in self.registers.items() if k not in ranges and table.in_range(k[0])}
        return self._modify(table, rest)

    @staticmethod
    def _modify(table: CpuidTable, modifiers) -> CpuidTable:
        changes = {}
        for (leaf, subleaf, reg), modifier in modifiers.items():
            if not modifier.filter:
                continue
            regs = list(changes.get((leaf, subleaf), table.get((leaf, subleaf), (0, 0, 0, 0))))
            i = REGISTERS.index(reg)
            regs[i] = modifier.apply(regs[i])
            changes[(leaf, subleaf)] = tuple(regs)
        return table.replace(changes) if changes else table

    def then(self, later: Mask) -> Mask:
        keys = set(self.registers) | set(later.registers)
        empty = RegisterMask()
        return Mask({k: self.registers.get(k, empty).then(later.registers.get(k, empty)) for k in keys})

    @staticmethod
    def compose(masks) -> Mask:
        result = Mask()
        for mask in masks:
            result = result.then(mask)
        return result

    # ---- migration checks (marks) -----------------------------------------------------

    def power_on_violations(self, table: CpuidTable) -> list[str]:
        """T/F marks the host's real bits do not satisfy."""
        problems = []
        for (leaf, subleaf, reg), m in self.registers.items():
            real = table.query(leaf, subleaf)[REGISTERS.index(reg)]
            for bits, want in ((m.must_one, 1), (m.must_zero, 0)):
                for bit in _bits(bits):
                    if (real >> bit & 1) != want:
                        problems.append(f"{_bit_name(leaf, subleaf, reg, bit)} must be {want} on the host")
        return problems

    def migration_violations(self, source: CpuidTable, destination: CpuidTable) -> list[str]:
        """T/F on the destination, and R/H/k bits that differ between the two hosts."""
        problems = self.power_on_violations(destination)
        for (leaf, subleaf, reg), m in self.registers.items():
            i = REGISTERS.index(reg)
            differ = (source.query(leaf, subleaf)[i] ^ destination.query(leaf, subleaf)[i]) & m.must_match
            problems += [f"{_bit_name(leaf, subleaf, reg, b)} differs between the hosts" for b in _bits(differ)]
        return problems

    def features(self) -> tuple[frozenset[str], frozenset[str]]:
        """(forced shown, forced hidden) feature names."""
        shown, hidden = set(), set()
        for f in catalogue():
            m = self.registers.get((f.leaf, f.subleaf, f.register))
            if m and m.filter & f.mask:
                (shown if m.value & f.mask else hidden).add(f.name)
        return frozenset(shown), frozenset(hidden)


def _bits(value: int):
    return [b for b in range(32) if value >> b & 1]


def _bit_name(leaf, subleaf, reg, bit) -> str:
    feature = catalogue().at(leaf, subleaf, reg, bit)
    where = f"CPUID.{leaf:#x}" + (f".{subleaf}" if subleaf else "") + f":{reg.upper()}[{bit}]"
    return f"{feature.name} ({where})" if feature else where


def feature_mask(shown=(), hidden=()) -> Mask:
    """A mask forcing these features to 1 and those to 0."""
    planes: dict[Key, list[int]] = {}
    for names, value in ((hidden, 0), (shown, 1)):
        for name in names:
            f = catalogue()[name]
            plane = planes.setdefault((f.leaf, f.subleaf, f.register), [0, 0])
            plane[0] |= f.mask
            plane[1] = (plane[1] & ~f.mask) | (f.mask if value else 0)
    return Mask({k: RegisterMask(fl, v) for k, (fl, v) in planes.items()})
