"""Compatibility of hosts: baselines and the migration check.

The questions VirtualCenter and libvirt answer: what can every host of this cluster
present (``baseline``, as ``virsh cpu-baseline``)? Can a VM move from A to B
(``compare``, as ``virsh cpu-compare``)? Which EVC mode can the cluster run?
Only the levelled features count (``evc.levelled_features``): the bits vMotion
compares; platform and power bits are a host's own business.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..cpu.deps import hidden_closure
from ..cpu.features import catalogue
from ..errors import MinivmmError
from .evc import EvcMode, evc_mode, evc_modes, highest_common_mode, levelled_features, require_supported
from .formats import format_mask
from .mask import Mask, feature_mask
from .view import GuestCpuidView


def presented(view: GuestCpuidView) -> frozenset[str]:
    """The levelled features a guest view shows."""
    return catalogue().decode(view.table) & levelled_features()


def physical(profile) -> frozenset[str]:
    return profile.physical & levelled_features()


def reportable(profile) -> frozenset[str]:
    """The levelled features a host has and its CPUID can show: not what it executes
    without reporting (PREFETCHW before Broadwell), which no mask can make it present."""
    return physical(profile) & catalogue().decode(profile.cpuid)


@dataclass(frozen=True)
class Baseline:
    hosts: tuple[str, ...]
    features: frozenset[str]
    evc: EvcMode | None
    masks: dict[str, Mask]     # per host: the mask that levels it to the baseline

    def to_dict(self) -> dict:
        return {"hosts": list(self.hosts), "features": sorted(self.features),
                "evc": self.evc.key if self.evc else None,
                "masks": {h: format_mask(m, "features") for h, m in self.masks.items()}}


def baseline(profiles) -> Baseline:
    """The features every host has and reports, the richest EVC mode they all support, and the
    per-host masks (hide what the host has beyond the baseline)."""
    profiles = list(profiles)
    if not profiles:
        raise MinivmmError("a baseline needs at least one host")
    common = frozenset.intersection(*(reportable(p) for p in profiles))
    # Closed under dependencies, as hiding works everywhere else: hiding avx hides avx2.
    masks = {p.name: feature_mask(hidden=hidden_closure(reportable(p) - common)) for p in profiles}
    return Baseline(tuple(p.name for p in profiles), common, highest_common_mode(profiles), masks)


@dataclass(frozen=True)
class Comparison:
    verdict: str                 # IDENTICAL | SUPERSET | INCOMPATIBLE
    blocking: frozenset[str]     # features the guest sees that the destination lacks
    marks: tuple[str, ...]       # migration marks (T/F/R/H/k) the destination fails
    extra: frozenset[str]        # what the destination has beyond the guest's view

    @property
    def can_migrate(self) -> bool:
        return self.verdict != "INCOMPATIBLE"

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "can_migrate": self.can_migrate, "blocking": sorted(self.blocking),
                "marks": list(self.marks), "extra": sorted(self.extra)}


def compatibility(view, source, destination) -> tuple[list[str], list[str]]:
    """(features the VM sees that the destination lacks, migration marks it fails):
    what VirtualCenter checks before a vMotion."""
    missing = sorted(presented(view) - physical(destination))
    marks = view.mask.migration_violations(source.cpuid, destination.cpuid)
    return missing, marks


def compare(source, destination, evc: str | None = None, masks=()) -> Comparison:
    """Can a VM powered on on ``source`` (under ``evc``/``masks``) move to ``destination``?

    The VM keeps the view it got at power-on; it may move where every feature of
    that view is physically present and every migration mark holds."""
    if evc is not None:
        require_supported(evc_mode(evc), destination)
    view = GuestCpuidView.for_host(source, evc, masks)
    seen = presented(view)
    missing, marks = compatibility(view, source, destination)
    blocking = frozenset(missing)
    there = presented(GuestCpuidView(destination.cpuid, view.mask))
    if blocking or marks:
        verdict = "INCOMPATIBLE"
    elif there == seen:
        verdict = "IDENTICAL"
    else:
        verdict = "SUPERSET"
    return Comparison(verdict, blocking, tuple(marks), physical(destination) - seen)


def observed_check(view_features, observed: dict, destination) -> dict:
    """Three answers for a VM that ran, on ``destination``: its view (what vSphere
    checks: the features it was powered on with), the feature bits it read from CPUID
    (it depends on each, whether or not it used it), and the gated features it executed
    that its view hides (the audit's; a probe that found a hidden feature by trying it:
    unsafe where the destination lacks it, though the view matches)."""
    levelled = levelled_features()
    view = sorted((frozenset(view_features) & levelled) - physical(destination))
    read = sorted((frozenset(observed["read"]) & levelled) - physical(destination))
    executed = sorted(frozenset(observed["executed"]) - destination.physical)
    verdict = "INCOMPATIBLE" if view else "UNSAFE" if executed else "COMPATIBLE"
    return {"destination": destination.name, "verdict": verdict, "view": view, "read": read, "executed": executed,
            "read_features": sorted(frozenset(observed["read"]) & levelled),
            "executed_hidden": sorted(observed["executed"]), "audited": observed["audited"]}


def diff_profiles(a, b) -> dict:
    """What two hosts' CPUID reports differ in, by feature name, and the EVC modes each
    can present (``profiles diff``)."""
    reported_a, reported_b = catalogue().decode(a.cpuid), catalogue().decode(b.cpuid)
    return {"a": a.name, "b": b.name, "only_a": sorted(reported_a - reported_b),
            "only_b": sorted(reported_b - reported_a),
            "evc_a": [key for key, mode in evc_modes().items() if mode.supported_by(a)],
            "evc_b": [key for key, mode in evc_modes().items() if mode.supported_by(b)]}
