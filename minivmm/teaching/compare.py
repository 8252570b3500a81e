"""CPUID-guided vs #UD-guided detection, side by side.

For each guest and host: what the host physically has, what the guest's CPUID view
says, what the guest's probe found and which path it took (its detection lines, docs/abi.md),
and, when asked, what became of that choice after a live migration at the guest's
first checkpoint. The cells where those disagree are the point of minivmm: a feature
masked but executable is what a probing guest finds and later loses; one advertised
but absent, or advertised while its probe raises #UD, is what a CPUID-guided guest
trusts and crashes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..cpu.features import catalogue
from ..cpu.profiles import load_profile
from ..errors import MinivmmError
from ..vmm.report import RunResult
from ..vmm.vm import VM

MASKED_BUT_EXECUTABLE = "masked but executable"   # the host runs it, CPUID hides it
ADVERTISED_BUT_ABSENT = "advertised but absent"   # CPUID shows it, the host lacks it
ADVERTISED_BUT_UD = "advertised but #UD"          # CPUID shows it, the host has it, the probe faulted


@dataclass(frozen=True)
class Cell:
    """One feature of one guest on one host."""
    guest: str
    feature: str
    host: str
    physical: bool
    cpuid: bool
    probe: bool | None      # None: the guest did not probe
    uses: str | None        # the path the guest reported, None if it reported nothing
    after: str | None = None  # after migrating: ok, #UD crash, refused, ... (None: not asked)

    @property
    def disagreement(self) -> str | None:
        if self.physical and not self.cpuid:
            return MASKED_BUT_EXECUTABLE
        if self.cpuid and not self.physical:
            return ADVERTISED_BUT_ABSENT
        if self.cpuid and self.probe is False:
            # The silicon is there and still faults: AVX, say, whose state XCR0 does not enable.
            return ADVERTISED_BUT_UD
        return None

    def to_dict(self) -> dict:
        return {"guest": self.guest, "feature": self.feature, "host": self.host, "physical": self.physical,
                "cpuid": self.cpuid, "probe": self.probe, "uses": self.uses, "after": self.after,
                "disagreement": self.disagreement}


@dataclass
class Comparison:
    guests: list[str]
    hosts: list[str]
    evc: str | None
    masks: tuple[str, ...]
    migrate_to: str | None
    cells: list[Cell]
    runs: dict[tuple[str, str], RunResult] = field(repr=False)
    migrated: dict[tuple[str, str], RunResult | None] = field(repr=False)

    def features(self, guest: str) -> list[str]:
        return list(dict.fromkeys(c.feature for c in self.cells if c.guest == guest))

    def cell(self, guest: str, feature: str, host: str) -> Cell:
        return next(c for c in self.cells if (c.guest, c.feature, c.host) == (guest, feature, host))

    def to_dict(self) -> dict:
        runs = []
        for (guest, host), result in self.runs.items():
            entry = {"guest": guest, "host": host, "stop": result.stop.to_dict(), "console": result.console}
            migrated = self.migrated.get((guest, host))
            if migrated is not None:
                entry["migration"] = {"to": self.migrate_to, "stop": migrated.stop.to_dict(),
                                      "records": migrated.migrations, "console": migrated.console,
                                      "outcome": migration_outcome(result, migrated)}
            runs.append(entry)
        return {"guests": self.guests, "hosts": self.hosts, "evc": self.evc, "masks": list(self.masks),
                "migrate_to": self.migrate_to, "cells": [c.to_dict() for c in self.cells], "runs": runs}


def migration_outcome(plain: RunResult, migrated: RunResult | None) -> str:
    """ok, differs, #UD crash, crashed, refused, unsupported, no checkpoint ..."""
    if migrated is None:
        return "no checkpoint"
    record = migrated.migrations[0] if migrated.migrations else None
    if record is None:
        return "not reached"
    if not record["ok"]:
        return "refused" if record.get("refused", True) else "ended first"
    stop = migrated.stop
    if stop.reason == "crashed":
        return "#UD crash" if stop.vector == 6 else "crashed"
    if stop.reason != plain.stop.reason or stop.status != plain.stop.status or migrated.console != plain.console:
        return f"differs ({stop.reason})"
    return "ok"


def outcome_kind(outcome: str | None) -> str | None:
    """crash, refused or ok: how a migration outcome should be shown (None: neither)."""
    if not outcome:
        return None
    if "crash" in outcome:
        return "crash"
    if outcome.startswith("refused"):
        return "refused"
    return "ok" if outcome == "ok" else None


def _feature_outcome(feature: str, outcome: str, migrated: RunResult) -> str:
    """The migration's outcome as seen from one feature's row."""
    if outcome == "refused":
        return "refused" if feature in migrated.migrations[0].get("missing", []) else "refused (other)"
    if outcome == "#UD crash":
        return "#UD crash" if feature in migrated.stop.missing_features else "crash (other)"
    return outcome


def compare(guests, hosts, evc: str | None = None, masks=(), migrate_to: str | None = None,
            timeout: float = 60, force: bool = False, accel: str = "tcg") -> Comparison:
    """Run every guest on every host (and again with a migration to ``migrate_to`` at
    its first checkpoint) and tabulate each reported feature. ``accel`` is what runs
    each guest, as for a run (``native``: Linux programs on the machine's own CPU)."""
    if not guests or not hosts:
        raise MinivmmError("compare needs at least one guest and one host")
    if migrate_to is not None and accel != "tcg":
        raise MinivmmError(f"compare --migrate-to: migrations run on the emulator, not under --accel {accel}")
    profiles = [load_profile(h) for h in hosts]
    destination = load_profile(migrate_to) if migrate_to is not None else None
    names = catalogue()
    cells, runs, migrated_runs = [], {}, {}
    for guest in guests:
        for host in profiles:
            vm = VM(guest, host, evc=evc, masks=masks, accel=accel)
            plain = vm.run(timeout=timeout)
            runs[guest, host.name] = plain
            migrated = None
            if destination is not None and plain.checkpoints:
                migrated = VM(guest, host, evc=evc, masks=masks).run(
                    migrations=[f"{destination.name}@checkpoint:1"], force=force, timeout=timeout)
            migrated_runs[guest, host.name] = migrated
            outcome = migration_outcome(plain, migrated) if migrated is not None else None
            for name, detection in plain.detections.items():
                feature = names.get(name)
                canonical = feature.name if feature else name
                cells.append(Cell(
                    guest, canonical, host.name, host.has(canonical) if feature else False,
                    vm.view.has(feature) if feature else detection.cpuid, detection.probe, detection.uses,
                    _feature_outcome(canonical, outcome, migrated) if outcome else None))
    return Comparison(list(guests), [p.name for p in profiles], evc, tuple(masks),
                      destination.name if destination else None, cells, runs, migrated_runs)
