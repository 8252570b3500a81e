"""How users write CPUID masks: every format of docs/masks.md, parsed into a
:class:`~.mask.Mask` and printed back (``parse_mask``, ``format_mask``)."""

from __future__ import annotations

import json
import re

from .. import digits
from ..cpu.deps import hidden_closure
from ..cpu.features import REGISTERS, catalogue
from ..errors import MinivmmError
from ..files import MiB, is_regular_file, read_text
from .evc import evc_mode
from .mask import FULL, MARKS, Key, Mask, RegisterMask, _bit_name, _bits, feature_mask

MAX_TEMPLATE = 1 * MiB
MAX_MASK = MAX_TEMPLATE         # characters of a mask given inline: as many as a template file may hold


def parse_mask(spec: str) -> Mask:
    """Any format of docs/masks.md, recognised by its shape."""
    text = spec.strip()
    if not text:
        raise MinivmmError("empty CPUID mask")
    if len(text) > MAX_MASK:
        raise MinivmmError(f"a CPUID mask of {len(text)} characters: at most {MAX_MASK}, as a template file")
    if text.lower().startswith("evc:"):
        return evc_mode(text[4:]).mask
    if text.startswith("{"):
        return parse_firecracker_template_text(text)
    if text.endswith(".json") or (text[0] not in "+-" and is_regular_file(text)):
        return parse_firecracker_template(text)
    parts = [p for p in re.split(r"[;\s]+(?=cpuid\.|0x|[0-9])", text) if p.strip()]
    if text.lower().startswith("cpuid."):
        return Mask.compose(parse_vmware(p) for p in parts)
    if text[0] in "+-" or re.fullmatch(r"[\w.\-]+(,[\w.\-+]+)*", text) and "=" not in text:
        return parse_feature_list(text)
    if "=0b" in text.replace(" ", ""):
        return Mask.compose(parse_firecracker(p) for p in parts)
    return Mask.compose(parse_xen(p) for p in parts)


def self_contained(spec: str) -> str:
    """The same mask without reference to a file: a template file becomes its JSON text,
    so what stores it (a snapshot) works after the file is gone, from any directory."""
    text = spec.strip()
    if not text.startswith("{") and (text.endswith(".json") or (text[:1] not in "+-" and is_regular_file(text))):
        content = read_text(text, "CPU template", MAX_TEMPLATE)
        parse_firecracker_template_text(content, text)  # refuse a bad one here, naming the file
        # Not ASCII-escaped: the stored text stays within the template's own size.
        return json.dumps(json.loads(content), separators=(",", ":"), ensure_ascii=False)
    return spec


def format_mask(mask: Mask, fmt: str) -> str:
    """The mask written in one format; refuses what that format cannot say."""
    printers = {"firecracker": format_firecracker, "vmware": format_vmware, "xen": format_xen,
                "features": format_feature_list}
    if fmt not in printers:
        raise MinivmmError(f"unknown mask format '{fmt}' (firecracker, vmware, xen, features)")
    return printers[fmt](mask)


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
    value = digits.number(text, hex_default)
    if value is None:
        raise MinivmmError(f"CPUID mask '{spec}': {what} '{text}' is not a number (decimal, or hex after 0x)")
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
    if not bits:
        raise MinivmmError(f"Firecracker mask '{spec}': no bits after 0b (at position {offset + 1})")
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
    return parse_firecracker_template_text(read_text(path, "CPU template", MAX_TEMPLATE), path)


def parse_firecracker_template_text(text: str, origin: str = "CPU template") -> Mask:
    """The same template given as JSON text (snapshots store templates this way)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise MinivmmError(f"{origin}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise MinivmmError(f"{origin}: JSON nested too deeply for a CPU template") from None
    if not isinstance(data, dict) or not isinstance(data.get("cpuid_modifiers"), list):
        raise MinivmmError(f"{origin}: a Firecracker CPU template is an object with a 'cpuid_modifiers' list")
    registers = {}
    for i, entry in enumerate(data["cpuid_modifiers"]):
        where = f"{origin}: cpuid_modifiers[{i}]"
        try:
            leaf = _number(_json_number(entry["leaf"]), where, "leaf")
            sub = _number(_json_number(entry.get("subleaf", "0x0")), where, "subleaf")
            for j, mod in enumerate(entry["modifiers"]):
                bitmap = mod["bitmap"]
                if not isinstance(bitmap, str) or not bitmap.startswith("0b"):
                    raise MinivmmError(f"{where}.modifiers[{j}]: bitmap must be a string starting with 0b")
                key = (leaf, sub, _register(str(mod["register"]), where))
                registers[key] = registers.get(key, RegisterMask()).then(
                    _firecracker_modifier(bitmap[2:], f"{where}.modifiers[{j}] {bitmap}", 2))
        except (KeyError, TypeError, AttributeError) as e:
            raise MinivmmError(f"{where}: needs leaf, subleaf and modifiers of register/bitmap "
                               f"(missing or wrong {e})") from None
    return Mask(registers)


def _json_number(value) -> str:
    """Firecracker writes leaves as strings ("0x1"); plain JSON numbers are accepted too."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"number {json.dumps(value)[:20]}")
    return str(value)


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


def format_feature_list(mask: Mask) -> str:
    """Exact or refused: a feature list hides what depends on a hidden feature, so a
    mask that clears xsave alone cannot be written ``-xsave`` (that hides avx too)."""
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
    text = ",".join(items)
    if text:  # the fewest names that mean it: "-avx" stands for avx and what needs it
        shown = [i[1:] for i in items if i[0] == "+"]
        hidden = {i[1:] for i in items if i[0] == "-"}
        roots: list[str] = []
        for name in sorted(hidden, key=lambda n: (-len(hidden_closure([n])), n)):
            if name not in hidden_closure(roots):
                roots.append(name)
        shorter = ",".join([f"+{n}" for n in shown] + [i for i in items if i[0] == "-" and i[1:] in roots])
        text = shorter if parse_feature_list(shorter) == mask else text
    if text and parse_feature_list(text) != mask:
        extra = sorted(parse_feature_list(text).features()[1] - mask.features()[1],
                       key=lambda name: (catalogue()[name].leaf, catalogue()[name].subleaf, name))
        named = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise MinivmmError(f"as a feature list this mask would also hide {named or 'other bits'} (hiding a "
                           f"feature hides what depends on it): use firecracker, vmware or xen")
    return text
