"""Host profiles: emulated physical CPUs built from real CPU data.

A profile is data (a raw CPUID table and a physical feature set) plus the unicorn
model that executes it. Names resolve as docs/cli.md says: the built-in table
``data/profiles.csv``, ``dump:NAME``, ``file:PATH`` and ``native``.
"""

from __future__ import annotations

import csv
import functools
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import MinivmmError
from ..files import MiB, read_text
from . import native
from .features import STATE_BITS, canonical_spelling, catalogue
from .table import EXTENDED, CpuidTable, Signature

QEMU_BRANDS = {  # QEMU's model_id strings (target/i386/cpu.c) for the models without a dump
    "Opteron_G1": "AMD Opteron 240 (Gen 1 Class Opteron)",
    "Opteron_G2": "AMD Opteron 22xx (Gen 2 Class Opteron)",
}
VENDOR_STRINGS = {"Intel": "GenuineIntel", "AMD": "AuthenticAMD", "Hygon": "HygonGenuine"}
# QEMU's CPUID_EXT2_AMD_ALIASES: AMD repeats these leaf-1 EDX bits in 0x80000001 EDX.
AMD_EDX_ALIASES = 0x0183F3FF


@dataclass(frozen=True)
class HostProfile:
    name: str
    cpuid: CpuidTable
    physical: frozenset[str]
    engine_model: str
    source: str

    @property
    def vendor(self) -> str:
        return self.cpuid.vendor

    @property
    def signature(self) -> Signature:
        return self.cpuid.signature

    @property
    def description(self) -> str:
        return " ".join(self.cpuid.brand.split()) or self.source

    def has(self, feature: str) -> bool:
        return catalogue()[feature].name in self.physical

    def summary(self) -> dict:
        sig = self.signature
        return {"name": self.name, "vendor": self.vendor, "family": sig.family, "model": sig.model,
                "stepping": sig.stepping, "cpu": self.description, "source": self.source,
                "engine_model": self.engine_model, "features": len(self.physical)}


def _data(*parts):
    return resources.files("minivmm").joinpath("data", *parts)


def _csv(name):
    with _data(name).open() as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def physical_features(table: CpuidTable) -> frozenset[str]:
    return catalogue().decode(table) - STATE_BITS


def executed_unreported(vendor: str, family: int, physical: frozenset[str]) -> frozenset[str]:
    """Features a CPU executes although its CPUID never reports them, by vendor and
    generation. One today: PREFETCH/PREFETCHW (0F 0D /0, /1 and the /3-/7 hints,
    Linux's ``3dnowprefetch``).

    AMD defines them wherever long mode or 3DNow! is (AMD64 APM Vol. 3, PREFETCH/PREFETCHW:
    "supported if CPUID Fn8000_0001_ECX[3DNowPrefetch] OR Fn8000_0001_EDX[LM] OR
    Fn8000_0001_EDX[3DNow] = 1"; Linux's init_amd: "3DNow or LM implies PREFETCHW").
    Intel reports PRFCHW only from Broadwell (SDM Vol. 2B, PREFETCHW), yet its opcode
    map gives 0F 0D /1 to PREFETCHW with no model condition (SDM Vol. 2D, Table A-3), and
    the Core microarchitecture and every family-6 successor execute it as the hint it is:
    64-bit Windows 8.1 requires PREFETCHW and installs on Core 2, where it is never
    reported. NetBurst (family 15, up to Prescott) raised #UD, and so does this model.
    """
    if vendor in ("amd", "hygon") and physical & {"lm", "3dnow"} or vendor == "intel" and family == 6 \
            and "lm" in physical:
        return frozenset({"3dnowprefetch"})
    return frozenset()


# ---- libvirt/QEMU model definitions ---------------------------------------------------

@functools.cache
def qemu_model(name: str) -> tuple[str, Signature, frozenset[str]]:
    """(vendor string, signature, canonical feature names) of cpu_map/x86_NAME.xml."""
    path = _data("cpu_map", f"x86_{name}.xml")
    if not path.is_file():
        raise MinivmmError(f"no QEMU/libvirt CPU model named '{name}'")
    model = ET.parse(path.open()).getroot().find("model")
    vendor = model.find("vendor")
    sig = model.find("signature")
    signature = Signature(int(sig.get("family")), int(sig.get("model")), 1) if sig is not None else Signature(6, 0, 0)
    names = set()
    for el in model.iter("feature"):
        if el.get("removed") == "yes":
            continue
        feature = catalogue().get(el.get("name"))
        if feature is not None:  # MSR-only (vmx-*) features have no CPUID bit
            names.add(feature.name)
    return VENDOR_STRINGS[vendor.get("name")] if vendor is not None else "GenuineIntel", signature, frozenset(names)


def _vendor_regs(vendor: str) -> tuple[int, int, int]:
    b = vendor.encode()
    ebx, edx, ecx = (int.from_bytes(b[i:i + 4], "little") for i in (0, 4, 8))
    return ebx, ecx, edx


def table_from_qemu_model(name: str, extra: frozenset[str] = frozenset()) -> CpuidTable:
    """The CPUID a QEMU model presents (QEMU's level 5 / xlevel 0x80000008 layout),
    plus the ``extra`` features of the real CPU."""
    vendor, sig, names = qemu_model(name)
    names = names | extra
    ebx, ecx, edx = _vendor_regs(vendor)
    entries: dict[tuple[int, int], list[int]] = {
        (0, 0): [5, ebx, ecx, edx],
        (1, 0): [sig.encode(), 8 << 8 | 1 << 16, 0, 0],  # CLFLUSH line 64 bytes, one logical CPU
        (EXTENDED, 0): [0x80000008, *(_vendor_regs(vendor) if vendor == "AuthenticAMD" else (0, 0, 0))],
        (0x80000001, 0): [sig.encode(), 0, 0, 0],
        (0x80000008, 0): [0x3028, 0, 0, 0],  # 40 physical, 48 linear address bits
    }
    for leaf in range(2, 6):
        entries.setdefault((leaf, 0), [0, 0, 0, 0])
    for fname in names:
        f = catalogue()[fname]
        entries.setdefault((f.leaf, f.subleaf), [0, 0, 0, 0])[("eax", "ebx", "ecx", "edx").index(f.register)] |= f.mask
    if vendor == "AuthenticAMD":
        entries[(0x80000001, 0)][3] |= entries[(1, 0)][3] & AMD_EDX_ALIASES
    brand = QEMU_BRANDS.get(name, name).encode().ljust(48, b"\0")
    for i, leaf in enumerate((0x80000002, 0x80000003, 0x80000004)):
        chunk = brand[16 * i:16 * i + 16]
        entries[(leaf, 0)] = [int.from_bytes(chunk[j:j + 4], "little") for j in range(0, 16, 4)]
    return CpuidTable({k: tuple(v) for k, v in entries.items()}, f"QEMU model {name}")


# ---- engine models --------------------------------------------------------------------

@functools.cache
def engine_models() -> dict[str, frozenset[str]]:
    """Unicorn CPU model -> the feature set of the QEMU model it is."""
    return {row["engine_model"]: qemu_model(row["libvirt_model"])[2] for row in _csv("engine-models.csv")}


def closest_engine_model(physical: frozenset[str], vendor: str) -> str:
    """The engine model that runs the most of this ISA: the smallest superset if any,
    else the one missing fewest features. Exact #UD enforcement is the gate's job."""
    vendor_string = {"intel": "GenuineIntel", "amd": "AuthenticAMD", "hygon": "HygonGenuine"}.get(vendor)
    rows = {row["engine_model"]: row["libvirt_model"] for row in _csv("engine-models.csv")}

    # Only bits some engine model knows matter: QEMU models carry no thermal,
    # debug-store or platform bits, whatever the silicon has.
    relevant = physical & frozenset().union(*engine_models().values())

    def score(model):
        feats = engine_models()[model]
        same_vendor = qemu_model(rows[model])[0] == vendor_string
        return (len(relevant - feats), not same_vendor, len(feats - relevant))

    return min(engine_models(), key=score)


# ---- resolution -----------------------------------------------------------------------

def dump_path(name: str):
    path = _data("cpuid-dumps", f"x86_64-cpuid-{name}.xml")
    if not path.is_file():
        raise MinivmmError(f"no CPUID dump named '{name}' (see 'minivmm profiles --dumps')")
    return path


def dump_names() -> list[str]:
    prefix = "x86_64-cpuid-"
    return sorted(p.name[len(prefix):-4] for p in _data("cpuid-dumps").iterdir()
                  if p.name.startswith(prefix) and p.name.endswith(".xml"))


def builtin_names() -> list[str]:
    return [row["name"] for row in _csv("profiles.csv")]


def _from_table(name: str, table: CpuidTable, source: str, engine_model: str | None = None,
                physical: frozenset[str] | None = None) -> HostProfile:
    physical = physical_features(table) if physical is None else physical
    physical |= executed_unreported(table.vendor, table.signature.family, physical)
    return HostProfile(name, table, physical, engine_model or closest_engine_model(physical, table.vendor), source)


MAX_DUMP = 16 * MiB                # a CPUID dump file (libvirt XML or `cpuid -1 -r`)


@functools.cache
def load_profile(spec: str) -> HostProfile:
    """Resolve a profile name: built-in, ``dump:NAME``, ``file:PATH`` or ``native``."""
    spec = spec.strip()
    builtin = {row["name"]: row for row in _csv("profiles.csv")}
    key = canonical_spelling(spec).replace("_", "-")
    if key in builtin:
        row = builtin[key]
        kind, _, ref = row["source"].partition(":")
        if kind == "dump":
            table = CpuidTable.from_libvirt_xml(dump_path(ref).read_text(), f"dump:{ref}")
            return _from_table(key, table, row["source"], row["engine_model"])
        extra = frozenset(catalogue()[n].name for n in (row["extra_features"] or "").split())
        table = table_from_qemu_model(ref, extra)
        return _from_table(key, table, row["source"], row["engine_model"], qemu_model(ref)[2] | extra)
    if spec.startswith("dump:"):
        ref = spec[5:]
        return _from_table(spec, CpuidTable.from_libvirt_xml(dump_path(ref).read_text(), spec), spec)
    if spec.startswith("file:"):
        path = Path(spec[5:]).expanduser()
        text = read_text(path, "CPUID dump", MAX_DUMP)
        return _from_table(spec, CpuidTable.from_text(text, str(path)), spec)
    if spec == "native":
        return _from_table("native", native.read_table(), "native")
    import difflib
    close = difflib.get_close_matches(key, list(builtin) + ["native"], n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise MinivmmError(f"unknown host profile '{spec}' (built-in names, dump:NAME, file:PATH or native{hint})")


def host_names(hosts) -> list[str]:
    """A host list as users write it (``"core2,penryn"``, a list, or ``"all"`` for the
    built-ins), each name checked once, here."""
    if isinstance(hosts, str):
        hosts = [h.strip() for h in hosts.split(",") if h.strip()]
    hosts = list(hosts)
    if not hosts:
        raise MinivmmError("no host profiles given (e.g. core2,penryn or all)")
    if hosts == ["all"]:
        return builtin_names()
    for host in hosts:
        load_profile(host)
    return hosts


def builtin_profiles() -> list[HostProfile]:
    return [load_profile(name) for name in builtin_names()]
