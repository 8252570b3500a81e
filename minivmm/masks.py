"""CPUID masks: what a hypervisor changes in the CPUID a guest sees, and how users write it.

A mask is, per ``(leaf, subleaf, register)``, a modifier ``(filter, value)`` applied as
``new = (old & ~filter) | value`` (Firecracker's ``CpuidRegisterModifier``), plus the
migration-check marks that transform nothing: VMware's T/F (the host must have 1/0),
R/H (the real bit must match on source and destination; R also reports 0), x (the
guest does not use the bit), and Xen's k (host value, kept across migration: H).

Each bit is therefore one *transformation* (keep, 0, 1) and at most one *mark*. The
parsers and printers of every format in SPEC section 5 live here, beside the type.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .cpuid import CpuidTable
from .deps import hidden_closure
from .errors import MinivmmError
from .features import REGISTERS, catalogue

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
    """A whole mask: ``Mask.parse(spec)``, ``mask.apply(table)``, ``a.then(b)``."""
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

    # ---- parsing and printing ---------------------------------------------------------

    @classmethod
    def parse(cls, spec: str) -> Mask:
        """Any format of SPEC section 5, recognised by its shape."""
        text = spec.strip()
        if not text:
            raise MinivmmError("empty CPUID mask")
        if text.lower().startswith("evc:"):
            from .evc import evc_mode
            return evc_mode(text[4:]).mask
        if text.endswith(".json") or (text[0] not in "+-" and _is_file(text)):
            return parse_firecracker_template(text)
        parts = [p for p in re.split(r"[;\s]+(?=cpuid\.|0x|\d)", text) if p.strip()]
        if text.lower().startswith("cpuid."):
            return cls.compose(parse_vmware(p) for p in parts)
        if text[0] in "+-" or re.fullmatch(r"[\w.\-]+(,[\w.\-+]+)*", text) and "=" not in text:
            return parse_feature_list(text)
        if "=0b" in text.replace(" ", ""):
            return cls.compose(parse_firecracker(p) for p in parts)
        return cls.compose(parse_xen(p) for p in parts)

    def features(self) -> tuple[frozenset[str], frozenset[str]]:
        """(forced shown, forced hidden) feature names."""
        shown, hidden = set(), set()
        for f in catalogue():
            m = self.registers.get((f.leaf, f.subleaf, f.register))
            if m and m.filter & f.mask:
                (shown if m.value & f.mask else hidden).add(f.name)
        return frozenset(shown), frozenset(hidden)

    def to(self, fmt: str) -> str:
        printers = {"firecracker": format_firecracker, "vmware": format_vmware, "xen": format_xen,
                    "features": format_feature_list}
        if fmt not in printers:
            raise MinivmmError(f"unknown mask format '{fmt}' (firecracker, vmware, xen, features)")
        return printers[fmt](self)


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # too long, or not a path at all
        return False


def _bits(value: int):
    return [b for b in range(32) if value >> b & 1]


def _bit_name(leaf, subleaf, reg, bit) -> str:
    feature = catalogue().at(leaf, subleaf, reg, bit)
    where = f"CPUID.{leaf:#x}" + (f".{subleaf}" if subleaf else "") + f":{reg.upper()}[{bit}]"
    return f"{feature.name} ({where})" if feature else where


# ---- the tri-state bitmap strings ----------------------------------------------------
# Each format is a table: character -> (transformation, mark). None keeps the bit.

VMWARE_CHARS = {"-": (None, None), "0": (0, None), "1": (1, None), "x": (None, "ignored"),
                "T": (None, "must_one"), "F": (None, "must_zero"), "R": (0, "must_match"),
                "H": (None, "must_match")}
XEN_CHARS = {"x": (None, None), "0": (0, None), "1": (1, None), "k": (None, "must_match"),
             "s": (None, "must_match")}
FIRECRACKER_CHARS = {"x": (None, None), "0": (0, None), "1": (1, None)}


def _bitmap_to_modifier(bits: str, chars: dict, spec: str, offset: int, format_name: str) -> RegisterMask:
    """32 characters, most significant bit first."""
    fields = dict.fromkeys(("filter", "value", *MARKS), 0)
    for i, ch in enumerate(bits):
        if ch not in chars:
            raise MinivmmError(f"{format_name} mask '{spec}': bad character {ch!r} at position {offset + i + 1} "
                               f"(allowed: {' '.join(chars)})")
        bit = 31 - i
        transform, mark = chars[ch]
        if transform is not None:
            fields["filter"] |= 1 << bit
            fields["value"] |= transform << bit
        if mark:
            fields[mark] |= 1 << bit
    return RegisterMask(**fields)


def _modifier_to_bitmap(m: RegisterMask, chars: dict, format_name: str, where: str) -> str:
    reverse = {v: k for k, v in reversed(list(chars.items()))}  # first spelling wins
    out = []
    for bit in range(31, -1, -1):
        transform = (m.value >> bit & 1) if m.filter >> bit & 1 else None
        mark = next((name for name in MARKS if getattr(m, name) >> bit & 1), None)
        if (transform, mark) not in reverse:
            raise MinivmmError(f"{where} bit {bit} ({_describe(transform, mark)}) cannot be written "
                               f"in the {format_name} format")
        out.append(reverse[(transform, mark)])
    return "".join(out)


def _describe(transform, mark) -> str:
    what = {None: "keep", 0: "report 0", 1: "report 1"}[transform]
    return what + (f", {mark.replace('_', ' ')}" if mark else "")


def _register(name: str, spec: str) -> str:
    reg = name.lower()
    if reg not in REGISTERS:
        raise MinivmmError(f"CPUID mask '{spec}': unknown register '{name}' (eax, ebx, ecx, edx)")
    return reg


def _number(text: str, spec: str, what: str, hex_default: bool = False) -> int:
    try:
        value = int(text, 16) if hex_default and not text.lower().startswith("0x") else int(text, 0)
    except ValueError:
        raise MinivmmError(f"CPUID mask '{spec}': {what} '{text}' is not a number") from None
    if not 0 <= value <= FULL:
        raise MinivmmError(f"CPUID mask '{spec}': {what} {text} is out of range")
    return value


# Firecracker -------------------------------------------------------------------------

_FC = re.compile(r"^\s*(?P<leaf>\w+)(?:\s*,\s*(?P<sub>\w+))?\s*:\s*(?P<reg>\w+)\s*=\s*0b(?P<bits>[^\s]*)\s*$")


def parse_firecracker(spec: str) -> Mask:
    """``0x1:ecx=0bxx...`` (``leaf[,subleaf]:reg=0b<bitmap>``)."""
    m = _FC.match(spec)
    if not m:
        raise MinivmmError(f"Firecracker mask '{spec}': expected LEAF[,SUBLEAF]:REG=0b<bits>")
    return Mask({_key(m, spec, hex_default=False): _firecracker_modifier(m["bits"], spec, spec.index("0b") + 2)})


def _firecracker_modifier(bitmap: str, spec: str, offset: int) -> RegisterMask:
    # Firecracker: '_' separates groups; a short string is padded with 'x' on the left.
    bits = bitmap.replace("_", "")
    if len(bits) > 32:
        raise MinivmmError(f"Firecracker mask '{spec}': {len(bits)} bits, a register has 32")
    stripped_offsets = [offset + i for i, ch in enumerate(bitmap) if ch != "_"]
    padded = "x" * (32 - len(bits)) + bits
    try:
        return _bitmap_to_modifier(padded, FIRECRACKER_CHARS, spec, 0, "Firecracker")
    except MinivmmError:
        bad = next(i for i, ch in enumerate(bits) if ch not in FIRECRACKER_CHARS)
        raise MinivmmError(f"Firecracker mask '{spec}': bad character {bits[bad]!r} at position "
                           f"{stripped_offsets[bad] + 1} (allowed: 0 1 x _)") from None


def _key(m, spec, hex_default) -> Key:
    leaf = _number(m["leaf"], spec, "leaf", hex_default)
    sub = _number(m["sub"], spec, "subleaf", hex_default) if m["sub"] else 0
    return (leaf, sub, _register(m["reg"], spec))


def format_firecracker(mask: Mask) -> str:
    return " ".join(f"{leaf:#x}{f',{sub:#x}' if sub else ''}:{reg}=0b"
                    + _modifier_to_bitmap(m, FIRECRACKER_CHARS, "Firecracker", f"{leaf:#x}:{reg}")
                    for (leaf, sub, reg), m in mask.registers.items())


def parse_firecracker_template(path: str) -> Mask:
    """A Firecracker custom CPU template JSON file (its ``cpuid_modifiers``)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise MinivmmError(f"cannot read CPU template {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise MinivmmError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("cpuid_modifiers", []), list):
        raise MinivmmError(f"{path}: a Firecracker CPU template is an object with a 'cpuid_modifiers' list")
    registers = {}
    for i, entry in enumerate(data.get("cpuid_modifiers", [])):
        where = f"{path}: cpuid_modifiers[{i}]"
        try:
            leaf, sub = int(str(entry["leaf"]), 0), int(str(entry.get("subleaf", "0x0")), 0)
            for j, mod in enumerate(entry["modifiers"]):
                bitmap = str(mod["bitmap"])
                if not bitmap.startswith("0b"):
                    raise MinivmmError(f"{where}.modifiers[{j}]: bitmap must start with 0b")
                key = (leaf, sub, _register(str(mod["register"]), where))
                registers[key] = registers.get(key, RegisterMask()).then(
                    _firecracker_modifier(bitmap[2:], f"{where}.modifiers[{j}] {bitmap}", 2))
        except (KeyError, TypeError, ValueError) as e:
            raise MinivmmError(f"{where}: needs leaf, subleaf and modifiers of register/bitmap ({e})") from None
    return Mask(registers)


def format_firecracker_template(mask: Mask) -> str:
    groups: dict[tuple[int, int], list] = {}
    for (leaf, sub, reg), m in mask.registers.items():
        groups.setdefault((leaf, sub), []).append(
            {"register": reg, "bitmap": "0b" + _modifier_to_bitmap(m, FIRECRACKER_CHARS, "Firecracker", reg)})
    return json.dumps({"cpuid_modifiers": [
        {"leaf": f"{leaf:#x}", "subleaf": f"{sub:#x}", "flags": 0, "modifiers": mods}
        for (leaf, sub), mods in groups.items()]}, indent=2)


# VMware ------------------------------------------------------------------------------

_VMWARE = re.compile(r'^\s*cpuid\.(?P<leaf>[0-9a-fA-Fx]+)(?:\.(?P<sub>[0-9a-fA-Fx]+))?\.(?P<reg>\w+)\s*=\s*"?'
                     r'(?P<bits>[^"]*)"?\s*$', re.IGNORECASE)


def parse_vmware(spec: str) -> Mask:
    """``cpuid.1.ecx="----:----:..."`` as in a .vmx file (leaf in hex; ``cpuid.7.0.ebx``
    names a subleaf)."""
    m = _VMWARE.match(spec)
    if not m:
        raise MinivmmError(f"VMware mask '{spec}': expected cpuid.LEAF.REG=\"xxxx:xxxx:...\"")
    raw = m["bits"]
    offset = spec.index(raw) if raw else len(spec)
    if not re.fullmatch(r"[^:]{4}(:[^:]{4}){7}", raw):
        bad = next((i for i, ch in enumerate(raw) if (ch == ":") != (i % 5 == 4)), min(len(raw), 39))
        raise MinivmmError(f"VMware mask '{spec}': expected 8 groups of 4 bits separated by ':' "
                           f"(problem at position {offset + bad + 1})")
    bits = raw.replace(":", "")
    try:
        modifier = _bitmap_to_modifier(bits, VMWARE_CHARS, spec, 0, "VMware")
    except MinivmmError:
        bad = next(i for i, ch in enumerate(raw) if ch != ":" and ch not in VMWARE_CHARS)
        raise MinivmmError(f"VMware mask '{spec}': bad character {raw[bad]!r} at position {offset + bad + 1} "
                           f"(allowed: {' '.join(VMWARE_CHARS)})") from None
    return Mask({_key(m, spec, hex_default=True): modifier})


def format_vmware(mask: Mask) -> str:
    lines = []
    for (leaf, sub, reg), m in mask.registers.items():
        bits = _modifier_to_bitmap(m, VMWARE_CHARS, "VMware", f"cpuid.{leaf:x}.{reg}")
        grouped = ":".join(bits[i:i + 4] for i in range(0, 32, 4))
        lines.append(f'cpuid.{leaf:x}{f".{sub:x}" if sub else ""}.{reg}="{grouped}"')
    return " ".join(lines)


# Xen ---------------------------------------------------------------------------------

_XEN = re.compile(r"^\s*(?P<leaf>\w+)(?:\s*,\s*(?P<sub>\w+))?\s*:\s*(?P<reg>\w+)\s*=\s*(?P<bits>\S*)\s*$")


def parse_xen(spec: str) -> Mask:
    """``1:ecx=xxxx...0xxx`` or ``0x7,0:ebx=...`` as in xl.cfg's ``cpuid=`` (32 characters)."""
    m = _XEN.match(spec)
    if not m:
        raise MinivmmError(f"Xen mask '{spec}': expected LEAF[,SUBLEAF]:REG=<32 of 1 0 x k s>")
    bits = m["bits"]
    offset = spec.rindex(bits) if bits else len(spec)
    if len(bits) != 32:
        raise MinivmmError(f"Xen mask '{spec}': {len(bits)} bit characters at position {offset + 1}, "
                           f"a register has 32")
    return Mask({_key(m, spec, hex_default=False): _bitmap_to_modifier(bits, XEN_CHARS, spec, offset, "Xen")})


def format_xen(mask: Mask) -> str:
    return " ".join(f"{leaf:#x}{f',{sub}' if sub else ''}:{reg}="
                    + _modifier_to_bitmap(m, XEN_CHARS, "Xen", f"{leaf:#x}:{reg}")
                    for (leaf, sub, reg), m in mask.registers.items())


# Feature lists -----------------------------------------------------------------------

def parse_feature_list(spec: str) -> Mask:
    """``-sse4_1,-popcnt,+lahf_lm``: hiding a feature hides what depends on it."""
    shown, hidden = [], []
    for i, item in enumerate(p.strip() for p in spec.split(",")):
        if not item or item[0] not in "+-":
            raise MinivmmError(f"feature list '{spec}': item {i + 1} '{item}' must start with + or -")
        (shown if item[0] == "+" else hidden).append(catalogue()[item[1:]].name)
    return feature_mask(shown=shown, hidden=hidden_closure(hidden))


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


def format_feature_list(mask: Mask) -> str:
    items = []
    for (leaf, sub, reg), m in mask.registers.items():
        if m.marked:
            raise MinivmmError(f"{leaf:#x}:{reg} carries migration marks, which a feature list cannot write")
        for bit in _bits(m.filter):
            f = catalogue().at(leaf, sub, reg, bit)
            if f is None:
                raise MinivmmError(f"{_bit_name(leaf, sub, reg, bit)} is not a named feature: "
                                   f"a feature list cannot write it")
            items.append(("+" if m.value >> bit & 1 else "-") + f.name)
    return ",".join(items)
