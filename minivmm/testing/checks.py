"""What can be wrong with a guest's run, as sentences, and assertions built on them.

Each ``*_problems`` function returns a list of readable findings (empty: fine); each
``assert_*`` raises :class:`AssertionError` with all of them, so a failing test says
what differed, e.g. "guest used sse4_1 path on core2 where CPUID hides sse4_1"::

    from minivmm.testing import assert_follows_cpuid, assert_survives_migration

    result = VM("my_guest.elf", "penryn", evc="intel-merom").run(migrations=["core2@checkpoint:1"])
    assert_follows_cpuid(result)
    assert_survives_migration(result)
"""

from __future__ import annotations

from ..cpu.features import catalogue
from ..vmm.report import RunResult


def detection_problems(result: RunResult) -> list[str]:
    """Detection lines whose path is a feature the guest's CPUID view hides."""
    names = catalogue()
    found = []
    for detection in result.detections.values():
        feature = names.get(detection.uses)
        if feature is not None and feature.name not in result.view_features:
            found.append(f"guest used {detection.uses} path on {result.hosts[0]} where CPUID hides {feature.name}"
                         + (f" (cpuid={int(detection.cpuid)}, probe={'-' if detection.probe is None else int(detection.probe)})"))
    return found


def stop_problems(result: RunResult, status: int = 0) -> list[str]:
    """The run did not power off with ``status``."""
    if result.stop.reason == "exited" and result.stop.status == status:
        return []
    where = result.host
    if len(result.hosts) > 1:
        where += f" after migrating from {result.hosts[0]}"
    if result.stop.reason == "exited":
        return [f"guest exited with status {result.stop.status} on {where}, expected {status}"]
    return [f"guest {result.stop.reason} on {where}: {result.stop.message}"]


def migration_problems(result: RunResult) -> list[str]:
    """Migrations that were refused or forced."""
    found = []
    for m in result.migrations:
        if not m["ok"] and (m.get("missing") or m.get("marks")):
            found.append(f"migration {m['from']} -> {m['to']} at {m['when']} was refused: {m['to']} lacks "
                         f"{', '.join(m.get('missing', []) + m.get('marks', []))}")
        elif not m["ok"]:
            found.append(f"migration {m['from']} -> {m['to']} at {m['when']} did not happen: {m.get('reason', '')}")
        elif m["forced"]:
            found.append(f"migration {m['from']} -> {m['to']} at {m['when']} was forced past missing "
                         f"{', '.join(m['missing'])}")
    return found


def audit_problems(result: RunResult) -> list[str]:
    """Instructions executed although the CPUID view hides their feature (needs ``audit=True``)."""
    return [f"guest executed {a['instruction']} at {a['rip']:#x} ({a['count']}x), which needs "
            f"{', '.join(a['features'])}, hidden from its CPUID on {result.hosts[0]}" for a in result.audit]


def _raise(problems: list[str]) -> None:
    if problems:
        raise AssertionError("; ".join(problems))


def assert_follows_cpuid(result: RunResult) -> None:
    """Every path the guest reported is one its CPUID view allows."""
    _raise(detection_problems(result))


def assert_finishes(result: RunResult, status: int = 0) -> None:
    """The guest powered off with ``status`` (not crashed, halted, unsupported or out of budget)."""
    _raise(stop_problems(result, status))


def assert_survives_migration(result: RunResult, status: int = 0) -> None:
    """Every migration happened unforced and the guest still finished with ``status``."""
    if not result.migrations:
        raise AssertionError("no migration happened: the migration point was never reached")
    _raise(migration_problems(result) + stop_problems(result, status))


def assert_no_hidden_instructions(result: RunResult) -> None:
    """Intel SDE chip-check for the VM's own view: nothing hidden was executed."""
    _raise(audit_problems(result))


def assert_same_run(result: RunResult, reference: RunResult) -> None:
    """Console, stop and memory equal those of ``reference`` (e.g. the run without migration)."""
    differences = []
    if result.console != reference.console:
        differences.append(f"console differs: {result.console[-200:]!r} vs {reference.console[-200:]!r}")
    if (result.stop.reason, result.stop.status) != (reference.stop.reason, reference.stop.status):
        differences.append(f"stop differs: {result.stop.reason}/{result.stop.status} vs "
                           f"{reference.stop.reason}/{reference.stop.status}")
    if result.memory_sha256 != reference.memory_sha256:
        differences.append("guest memory differs")
    _raise(differences)
