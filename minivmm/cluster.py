"""Clusters of hosts: baselines, migration compatibility, and EVC mode management.

The questions VirtualCenter and libvirt answer: what can every host of this cluster
present (``baseline``, as ``virsh cpu-baseline``)? Can a VM move from A to B
(``compare``, as ``virsh cpu-compare``)? Which EVC mode can the cluster run?
Only the levelled features count (``evc.levelled_features``): the bits vMotion
compares; platform and power bits are a host's own business.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .cpuidview import GuestCpuidView
from .errors import MinivmmError
from .evc import EvcMode, evc_mode, highest_common_mode, levelled_features, require_supported
from .features import catalogue
from .masks import Mask, feature_mask


def presented(view: GuestCpuidView) -> frozenset[str]:
    """The levelled features a guest view shows."""
    return catalogue().decode(view.table) & levelled_features()


def physical(profile) -> frozenset[str]:
    return profile.physical & levelled_features()


@dataclass(frozen=True)
class Baseline:
    hosts: tuple[str, ...]
    features: frozenset[str]
    evc: EvcMode | None
    masks: dict[str, Mask]     # per host: the mask that levels it to the baseline

    def to_dict(self) -> dict:
        return {"hosts": list(self.hosts), "features": sorted(self.features),
                "evc": self.evc.key if self.evc else None,
                "masks": {h: m.to("features") for h, m in self.masks.items()}}


def baseline(profiles) -> Baseline:
    """The features every host has, the richest EVC mode they all support, and the
    per-host masks (hide what the host has beyond the baseline)."""
    profiles = list(profiles)
    if not profiles:
        raise MinivmmError("a baseline needs at least one host")
    common = frozenset.intersection(*(physical(p) for p in profiles))
    masks = {p.name: feature_mask(hidden=physical(p) - common) for p in profiles}
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
    if evc:
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


@dataclass
class Cluster:
    """Hosts that share an EVC mode, and the VMs powered on in it.

    A VM's view is frozen at power-on: raising the mode reaches it only when it is
    powered on again (VMware: "the EVC mode of a virtual machine")."""
    mode: EvcMode | None = None
    hosts: list = field(default_factory=list)
    vm_modes: dict[str, str | None] = field(default_factory=dict)

    def add_host(self, profile) -> None:
        if self.mode:
            require_supported(self.mode, profile)
        elif self.hosts and profile.vendor != self.hosts[0].vendor:
            raise MinivmmError(f"{profile.name} is {profile.vendor.upper()}, the cluster is "
                               f"{self.hosts[0].vendor.upper()}: mixed vendors cannot share a cluster")
        self.hosts.append(profile)

    def set_mode(self, key: str | None) -> None:
        """Any mode every host supports; lowering is how a weaker host gets in."""
        mode = evc_mode(key) if key else None
        if mode:
            for host in self.hosts:
                require_supported(mode, host)
        self.mode = mode

    def power_on(self, name: str, guest, host=None, **options):
        """A VM of this cluster (on its first host unless told), under the current mode."""
        from .vm import VM
        if not self.hosts:
            raise MinivmmError("the cluster has no hosts")
        host = host or self.hosts[0]
        if host not in self.hosts:
            raise MinivmmError(f"{host.name} is not a host of this cluster")
        self.vm_modes[name] = self.mode.key if self.mode else None
        return VM(guest, host, evc=self.vm_modes[name], **options)

    def vm_mode(self, name: str) -> str | None:
        return self.vm_modes[name]
