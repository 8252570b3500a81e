"""The teaching demos: the EVC story told by real runs.

Each step runs real guests on real CPU profiles and narrates what the run did, with
the ``minivmm`` command that reproduces it. Nothing is canned: the narration is
built from the results, so a demo that stopped showing its point would say so.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..cpu.features import catalogue
from ..cpu.profiles import load_profile
from ..errors import MinivmmError
from ..masking.compat import compatibility
from ..masking.view import GuestCpuidView
from ..vmm.migration import MigrationRequest
from ..vmm.report import RunResult
from ..vmm.vm import VM, run_command

CHECKSUM = re.compile(r"checksum: (0x[0-9a-f]+)")
PATH = re.compile(r"^path: (\S+)", re.M)


@dataclass
class Step:
    demo: str
    title: str
    command: str
    narration: str
    facts: dict = field(default_factory=dict)
    console: str = ""
    setup: str = ""    # what to run before the command: the build of the program it runs

    def to_dict(self) -> dict:
        return {"demo": self.demo, "title": self.title, "setup": self.setup, "command": self.command,
                "narration": self.narration, "facts": self.facts, "console": self.console}


def _run(guest: str, host: str, evc: str | None = None, migrate: str | None = None, force: bool = False,
         cold: bool = False, audit: bool = False) -> tuple[RunResult, str]:
    """Run through the library and return the CLI command that does the same."""
    migrations = [MigrationRequest.parse(migrate, cold)] if migrate else []
    result = VM(guest, host, evc=evc).run(migrations=migrations, force=force, audit=audit, timeout=60)
    return result, run_command(guest, host, evc, (), [migrate] if migrate else [], force, cold, audit)


def _facts(result: RunResult) -> dict:
    checksum, path = CHECKSUM.search(result.console), PATH.search(result.console)
    facts = {"stop": result.stop.reason, "status": result.stop.status, "host": result.host, "hosts": result.hosts,
             "checksum": checksum[1] if checksum else None, "path": path[1] if path else None,
             "missing_features": result.stop.missing_features, "vector": result.stop.vector,
             "detections": {n: {"cpuid": d.cpuid, "probe": d.probe, "uses": d.uses}
                            for n, d in result.detections.items()}}
    if result.migrations:
        m = result.migrations[0]
        facts["migration"] = {k: m.get(k) for k in ("from", "to", "ok", "forced", "missing", "mode", "downtime_ms")}
    return facts


def _ending(result: RunResult) -> str:
    if result.stop.reason == "exited":
        return f"finished on {result.host} (status {result.stop.status})"
    return f"{result.stop.reason} on {result.host}: {result.stop.message}"


def _migration_line(result: RunResult) -> str:
    m = result.migrations[0]
    if not m["ok"]:
        return f"The migration {m['from']} -> {m['to']} was refused: {m['to']} lacks {', '.join(m['missing'])}."
    how = "cold (power off, boot again)" if m.get("cold") else f"live ({m['mode']}, downtime {m['downtime_ms']} ms)"
    forced = ", forced past the compatibility check" if m["forced"] else ""
    return f"It migrated {m['from']} -> {m['to']} {how}{forced}."


# ---- the demos -------------------------------------------------------------------------

def evc() -> Iterator[Step]:
    """A mask hides SSE4.1; a guest that asks CPUID survives the move to a Core 2."""
    sse4_1 = catalogue()["sse4_1"]
    penryn = load_profile("penryn")
    masked = GuestCpuidView.for_host(penryn, "intel-merom")
    yield Step("evc", "EVC hides SSE4.1 from CPUID", "minivmm cpuid penryn --evc intel-merom --format raw",
               f"Penryn (a Xeon X5460) has SSE4.1: its CPUID.1:ECX[19] is {int(penryn.has('sse4_1'))}. In an "
               f"intel-merom cluster the guest's CPUID reports {int(masked.has(sse4_1))}, so every host looks "
               f"like a Core 2 (Merom). The instruction itself is untouched.",
               {"physical": penryn.has("sse4_1"), "cpuid": masked.has(sse4_1)})
    plain, command = _run("dispatch_cpuid", "penryn", "intel-merom")
    facts = _facts(plain)
    yield Step("evc", "A CPUID-guided guest takes the baseline path", command,
               f"dispatch_cpuid asks CPUID, sees no SSE4.1 and takes the {facts['path']} path: checksum "
               f"{facts['checksum']}, {_ending(plain)}.", facts, plain.console)
    moved, command = _run("dispatch_cpuid", "penryn", "intel-merom", "core2@checkpoint:1")
    facts = _facts(moved)
    same = facts["checksum"] == _facts(plain)["checksum"] and moved.stop.reason == "exited"
    yield Step("evc", "...and survives a live migration to a Core 2", command,
               f"{_migration_line(moved)} The guest {_ending(moved)} with checksum {facts['checksum']}: "
               + ("the same as without the migration." if same else "NOT the same as without the migration."),
               {**facts, "same_as_unmigrated": same}, moved.console)


def ud_probe() -> Iterator[Step]:
    """Probing finds the hidden SSE4.1; the probing guest crashes after the move."""
    detect, command = _run("detect_both", "penryn", "intel-merom")
    d = detect.detections["sse4_1"]
    yield Step("ud-probe", "Probing finds what CPUID hides", command,
               f"detect_both asks CPUID and also executes PTEST under a #UD handler: sse4_1 cpuid={int(d.cpuid)} "
               f"probe={int(bool(d.probe))}. The mask changed the answer, not the CPU.", _facts(detect), detect.console)
    plain, command = _run("dispatch_ud", "penryn", "intel-merom")
    facts = _facts(plain)
    yield Step("ud-probe", "A probing guest uses the hidden feature", command,
               f"dispatch_ud trusts its probe and takes the {facts['path']} path on the Penryn: "
               f"{_ending(plain)}, checksum {facts['checksum']}.", facts, plain.console)
    moved, command = _run("dispatch_ud", "penryn", "intel-merom", "core2@checkpoint:1")
    facts = _facts(moved)
    yield Step("ud-probe", "...and crashes after the same migration", command,
               f"{_migration_line(moved)} "
               + ("VirtualCenter's check passed: the guest's CPUID view is the Merom baseline. "
                  if moved.migrations[0]["ok"] and not moved.migrations[0]["forced"] else "")
               + f"But the guest {_ending(moved)}.", facts, moved.console)


def override() -> Iterator[Step]:
    """Without EVC the move is refused; forcing it crashes the guest."""
    nehalem, core2 = load_profile("nehalem"), load_profile("core2")
    view = GuestCpuidView.for_host(nehalem)
    missing, _ = compatibility(view, nehalem, core2)
    yield Step("override", "Without EVC the hosts are incompatible", "minivmm check nehalem core2",
               f"A VM powered on on a Nehalem without EVC sees all its features; a Core 2 lacks "
               f"{', '.join(missing)}. vMotion refuses such a move.", {"missing": missing})
    refused, command = _run("dispatch_cpuid", "nehalem", migrate="core2@checkpoint:1")
    facts = _facts(refused)
    yield Step("override", "The migration is refused; the VM keeps running", command,
               f"{_migration_line(refused)} The guest {_ending(refused)} on its {facts['path']} path, "
               f"checksum {facts['checksum']}.", facts, refused.console)
    forced, command = _run("dispatch_cpuid", "nehalem", migrate="core2@checkpoint:1", force=True)
    yield Step("override", "Forcing the move (the override) crashes it", command,
               f"{_migration_line(forced)} The guest had chosen SSE4.1 honestly, from CPUID, on the Nehalem; "
               f"after the forced move it {_ending(forced)}.", _facts(forced), forced.console)


def cold() -> Iterator[Step]:
    """A cold migration boots the guest again: it re-detects and is safe."""
    moved, command = _run("dispatch_ud", "penryn", "intel-merom", "core2@checkpoint:1", cold=True)
    lines = [line for line in moved.console.splitlines() if line.startswith(("sse4_1:", "path:"))]
    yield Step("cold", "Cold migration re-detects", command,
               f"{_migration_line(moved)} The console shows both boots ({'; '.join(lines)}): on the Core 2 "
               f"the probing guest probed again, chose again and {_ending(moved)}. Cold migration is always "
               f"safe, even for guests that break the rules.", _facts(moved), moved.console)


def lzcnt() -> Iterator[Step]:
    """LZCNT without asking CPUID: no fault, a wrong answer."""
    for host in ("haswell", "nehalem"):
        result, command = _run("lzcnt_pitfall", host, audit=host == "nehalem")
        audited = [", ".join(a["features"]) for a in result.audit]
        yield Step("lzcnt", f"lzcnt(1) on {host}", command,
                   f"On {host} (abm {'present' if load_profile(host).has('abm') else 'absent'}) lzcnt(1) returned "
                   f"{result.stop.status}." + (" The same bytes ran as BSR: no #UD, a silently wrong answer. "
                                               f"The audit flags the instruction (needs {', '.join(audited)})."
                                               if audited else ""),
                   {**_facts(result), "value": result.stop.status, "audit": result.audit}, result.console)


def avx() -> Iterator[Step]:
    """The complete AVX check: CPUID's AVX bit is not enough."""
    for evc_mode in (None, "intel-westmere"):
        result, command = _run("avx_proper", "sandybridge", evc_mode)
        naive = re.search(r"naive check.*: (\w+)", result.console)
        complete = re.search(r"complete check.*: (\w+)", result.console)
        ran = re.search(r"vaddps: (\S+)", result.console)
        text = (f"On a Sandy Bridge{' under ' + evc_mode if evc_mode else ''} the naive check says "
                f"{naive[1] if naive else '?'}, the complete one {complete[1] if complete else '?'}.")
        if ran:
            text += (f" The naive path's VADDPS raised {ran[1]}: the OS (here, the boot state) enabled only "
                     f"x87 and SSE state in XCR0, and AVX needs XCR0[2:1] = 11b.")
        else:
            text += " With AVX hidden by the mask, both checks agree."
        yield Step("avx", "AVX needs CPUID, OSXSAVE and XCR0" + (f" (under {evc_mode})" if evc_mode else ""),
                   command, text, {**_facts(result), "naive": naive[1] if naive else None,
                                   "complete": complete[1] if complete else None,
                                   "naive_vaddps": ran[1] if ran else None}, result.console)


# A built program's path in the cache -> its name in the commands shown, and how to build it there.
_BUILT: dict[str, tuple[str, str]] = {}


def _linux_program(source: str, cflags=()) -> str:
    """A shipped Linux program's C source, built by the system compiler (cached). The
    commands shown run it as ./NAME, built from guests/linux/SOURCE (see :func:`steps`)."""
    from ..guests import shipped_guests_dir
    from ..guests.toolchain import build_c, linux_build_args
    path = str(build_c([shipped_guests_dir().joinpath("linux", source)], cflags=cflags, linux=True))
    name = source.rsplit(".", 1)[0]
    _BUILT[path] = (f"./{name}", shlex.join(["gcc", *linux_build_args([f"guests/linux/{source}"], name, cflags)]))
    return path


def _columns(console: str) -> dict[str, str]:
    """detect.c's lines: feature -> "libgcc=1 glibc=1 proc=1"."""
    return dict(line.split(" ", 1) for line in console.splitlines() if " libgcc=" in line)


def linux() -> Iterator[Step]:
    """Real programs: glibc and libgcc follow the view; a SIGILL probe dies after the move."""
    try:
        detect, probe = _linux_program("detect.c"), _linux_program("probe_popcnt.c", ("-mno-popcnt",))
    except MinivmmError as e:
        yield Step("linux", "Real Linux programs (skipped)", "gcc -static", f"Skipped: {e}", {"skipped": str(e)})
        return
    rows = {}
    for evc_mode in (None, "intel-penryn"):
        result = VM(detect, "nehalem", evc=evc_mode).run(timeout=60)
        rows[evc_mode] = _columns(result.console)
        yield Step("linux", "glibc, libgcc and /proc/cpuinfo" + (f" under {evc_mode}" if evc_mode else ""),
                   run_command(detect, "nehalem", evc_mode),
                   f"A gcc -static program on a Nehalem{' under ' + evc_mode if evc_mode else ''}: libgcc's "
                   f"__builtin_cpu_supports, glibc's CPU_FEATURE_ACTIVE and /proc/cpuinfo say popcnt: "
                   f"{rows[evc_mode].get('popcnt', '?')}. All three read the VM's CPUID view.",
                   {**_facts(result), "columns": rows[evc_mode]}, result.console)
    alone = VM(probe, "nehalem", evc="intel-penryn").run(timeout=60)
    point = f"penryn@syscall:{alone.syscalls['sample'].index('write') + 1}"  # right after the detection line
    first = alone.console.splitlines()[0] if alone.console else ""
    yield Step("linux", "A SIGILL probe finds the masked POPCNT", run_command(probe, "nehalem", "intel-penryn"),
               f"probe_popcnt executes POPCNT under a SIGILL handler (sigsetjmp/siglongjmp): {first}. The "
               f"Penryn baseline hid it from CPUID; the Nehalem still executes it.", _facts(alone), alone.console)
    for argv, label in (((), "...and dies of SIGILL after a migration to a Penryn"),
                        (("--cpuid",), "...while its CPUID-guided twin survives")):
        moved = VM(probe, "nehalem", evc="intel-penryn", argv=argv).run(migrations=[point], timeout=60)
        checksum = re.search(r"checksum: (\d+)", moved.console)
        yield Step("linux", label, run_command(probe, "nehalem", "intel-penryn", (), [point], argv=argv),
                   f"{_migration_line(moved)} The program {_ending(moved)}"
                   + (f", checksum {checksum[1]}." if checksum else "."),
                   {**_facts(moved), "checksum": checksum[1] if checksum else None}, moved.console)


def avx2() -> Iterator[Step]:
    """One generation later: an AVX2 probe on a Haswell under the Sandy Bridge baseline."""
    from ..cpu.native import machine_features
    try:
        probe = _linux_program("probe_avx2.c", ("-O2",))
    except MinivmmError as e:
        yield Step("avx2", "AVX2 under the Sandy Bridge baseline (skipped)", "gcc -static", f"Skipped: {e}",
                   {"skipped": str(e)})
        return
    if "avx2" not in machine_features():
        reason = "this machine has no AVX2: the Haswell's AVX2 cannot run"
        yield Step("avx2", "AVX2 under the Sandy Bridge baseline (skipped)", "", f"Skipped: {reason}",
                   {"skipped": reason})
        return
    from ..vmm.migration import PreCopy
    alone = VM(probe, "haswell", evc="intel-sandybridge").run(timeout=60)
    point = f"sandybridge@syscall:{alone.syscalls['sample'].index('write') + 1}"  # after the detection line
    first = alone.console.splitlines()[0] if alone.console else ""
    yield Step("avx2", "A SIGILL probe finds the masked AVX2", run_command(probe, "haswell", "intel-sandybridge"),
               f"probe_avx2 executes VPADDD ymm under a SIGILL handler: {first}. The intel-sandybridge baseline "
               f"hid AVX2 from CPUID; the Haswell still executes it (here, on this machine's own CPU).",
               _facts(alone), alone.console)
    for argv, label in (((), "...and dies of SIGILL after a migration to a Sandy Bridge"),
                        (("--cpuid",), "...while its CPUID-and-XGETBV-guided twin survives")):
        moved = VM(probe, "haswell", evc="intel-sandybridge", argv=argv).run(
            migrations=[point], precopy=PreCopy(enabled=False), timeout=60)
        checksum = re.search(r"checksum: (\d+)", moved.console)
        yield Step("avx2", label, run_command(probe, "haswell", "intel-sandybridge", (), [point], argv=argv,
                                             stop_and_copy=True),
                   f"{_migration_line(moved)} The program {_ending(moved)}"
                   + (f", checksum {checksum[1]}." if checksum else "."),
                   {**_facts(moved), "checksum": checksum[1] if checksum else None}, moved.console)


def prefetchw() -> Iterator[Step]:
    """The other side of the story: a feature CPUID never reported, found by executing it."""
    try:
        probe = _linux_program("probe_prefetchw.c")
    except MinivmmError as e:
        yield Step("prefetchw", "PREFETCHW (skipped)", "gcc -static", f"Skipped: {e}", {"skipped": str(e)})
        return
    for host in ("core2", "haswell", "broadwell"):
        result = VM(probe, host).run(timeout=60)
        found = re.search(r"cpuid=(\d) probe=(\d)", result.console)
        cpuid, probe_found = (found[1] == "1", found[2] == "1") if found else (None, None)
        if cpuid is False and probe_found:
            text = (f"On {load_profile(host).description}, CPUID does not report PREFETCHW (PRFCHW), yet the "
                    f"probe executes it: this CPU runs it as the hint it is. Intel reported it only from "
                    f"Broadwell on, so software that asks CPUID never uses it here.")
        elif cpuid and probe_found:
            text = f"On {load_profile(host).description}, CPUID reports PREFETCHW and the probe agrees."
        else:
            text = f"On {load_profile(host).description}: {result.console.strip() or _ending(result)}."
        yield Step("prefetchw", f"PREFETCHW on {host}", run_command(probe, host),
                   text, {**_facts(result), "cpuid": cpuid, "probe": probe_found}, result.console)


DEMOS = {"evc": evc, "ud-probe": ud_probe, "override": override, "cold": cold, "lzcnt": lzcnt, "avx": avx,
         "linux": linux, "avx2": avx2, "prefetchw": prefetchw}


def steps(name: str = "all") -> Iterator[Step]:
    """The steps of one demo, or of all of them in teaching order."""
    if name != "all" and name not in DEMOS:
        raise MinivmmError(f"unknown demo '{name}' (choose from {', '.join(DEMOS)}, all)")
    for demo in DEMOS.values() if name == "all" else [DEMOS[name]]:
        built: set[str] = set()
        for step in demo():
            yield _as_shown(step, built)


def _as_shown(step: Step, built: set[str]) -> Step:
    """A step whose command runs a built program as a reader would: ./NAME, not its path
    in the cache; the demo's first step that runs it has the build as its setup."""
    for path, (name, build) in _BUILT.items():
        if shlex.quote(path) in step.command:
            step.command = step.command.replace(shlex.quote(path), name)
            if name not in built:
                built.add(name)
                step.setup = build
    return step
