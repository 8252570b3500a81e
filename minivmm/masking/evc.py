"""VMware EVC modes: named baselines a whole cluster presents.

Each mode is a row of ``data/evc/evc-modes.csv`` (its features over a parent mode and
the source it rests on). A mode's mask shows exactly the mode's features: every other
feature bit is reported 0, which is what lets hosts of different generations present
identical CPUID feature bits. The mask hides; it disables nothing.
"""

from __future__ import annotations

import csv
import difflib
import functools
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlparse

from ..cpu.features import catalogue
from ..errors import MinivmmError
from .mask import Mask, feature_mask


@dataclass(frozen=True)
class EvcMode:
    key: str
    vendor: str
    order: int
    parent: str | None
    added: frozenset[str]
    features: frozenset[str]
    source: str
    confidence: str

    @functools.cached_property
    def mask(self) -> Mask:
        return feature_mask(hidden=hidden_by(self.features))

    def includes(self, other: EvcMode) -> bool:
        """Baseline inclusion (VMware: a mode is a superset of another's baseline)."""
        return self.vendor == other.vendor and self.features >= other.features

    def missing_on(self, profile) -> frozenset[str]:
        """Features of the mode the host does not physically have."""
        return self.features - profile.physical

    def supported_by(self, profile) -> bool:
        return profile.vendor == self.vendor and not self.missing_on(profile)

    @property
    def source_name(self) -> str:
        """The source in a few words: the real CPU's dump as a host name (dump:NAME),
        the QEMU model as libvirt ships it, else the site of the documenting page."""
        file = self.source.rsplit("/", 1)[-1].removesuffix(".xml")
        if "/cputestdata/x86_64-cpuid-" in self.source:
            return "dump:" + file.removeprefix("x86_64-cpuid-")
        if "/cpu_map/x86_" in self.source:
            return "QEMU model " + file.removeprefix("x86_")
        return urlparse(self.source).netloc or self.source


@functools.cache
def levelled_features() -> frozenset[str]:
    """The bits EVC levels and vMotion compares: every feature VMware has a ``cpuid.*``
    key for, and every feature of a mode. Platform, power, debug and speculation-control
    bits (est, tm2, ds, vmx, x2apic, ibrs ...) are outside: EVC neither hides nor
    compares them."""
    with resources.files("minivmm").joinpath("data", "evc", "vmware-feature-keys.csv").open() as f:
        keys = {catalogue()[row["linux_name"]].name
                for row in csv.DictReader(line for line in f if not line.startswith("#"))}
    return frozenset(keys).union(*(m.features for m in evc_modes().values()))


def hidden_by(features: frozenset[str]) -> frozenset[str]:
    """What a baseline of ``features`` reports 0: the rest of the levelled bits."""
    return levelled_features() - features


@functools.cache
def evc_modes() -> dict[str, EvcMode]:
    rows = {}
    with resources.files("minivmm").joinpath("data", "evc", "evc-modes.csv").open() as f:
        for row in csv.DictReader(f):
            rows[row["mode"]] = row
    modes: dict[str, EvcMode] = {}

    def build(key):
        if key not in modes:
            row = rows[key]
            added = frozenset(catalogue()[n].name for n in row["added_features"].split())
            parent = row["parent_mode"] or None
            features = added | (build(parent).features if parent else frozenset())
            modes[key] = EvcMode(key, row["vendor"], int(row["track_order"]), parent, added, features,
                                 row["source_url"], row["confidence"])
        return modes[key]

    for key in rows:
        build(key)
    return {k: modes[k] for k in rows}


def evc_mode(key: str) -> EvcMode:
    modes = evc_modes()
    mode = modes.get(key.strip().lower())
    if mode is None:
        close = difflib.get_close_matches(key.strip().lower(), modes, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise MinivmmError(f"unknown EVC mode '{key}' (see 'minivmm evc list'{hint})")
    return mode


def highest_common_mode(profiles) -> EvcMode | None:
    """The richest mode every host supports (None if none, e.g. mixed vendors)."""
    common = [m for m in evc_modes().values() if all(m.supported_by(p) for p in profiles)]
    if not common:
        return None
    return max(common, key=lambda m: (len(m.features), m.order))


def require_supported(mode: EvcMode, profile) -> None:
    """VMware refuses a host that cannot run the cluster's mode: so do we."""
    if profile.vendor != mode.vendor:
        raise MinivmmError(f"EVC mode {mode.key} is for {mode.vendor.upper()} hosts; "
                           f"{profile.name} is {profile.vendor.upper()}")
    missing = mode.missing_on(profile)
    if missing:
        raise MinivmmError(f"host {profile.name} cannot run EVC mode {mode.key}: "
                           f"it lacks {', '.join(sorted(missing))}")
