"""Matrix runs: guests x host profiles x EVC modes x migrations, in worker processes.

A :class:`Cell` is everything a run depends on (guest, host, EVC mode, masks,
migration schedule, seed), so any cell replays alone with the command it prints.
``cells`` builds the cross product; ``run_cells`` runs it on N processes; a cell passes
when the guest powers off with status 0 and never takes a path its CPUID view hides.
The same cells parametrise pytest tests (see :mod:`minivmm.testing.plugin`), so under
pytest-xdist they spread over machines with no runner of ours.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_all_start_methods, get_context
from xml.etree import ElementTree as ET

from ..cpu.profiles import host_names, load_profile
from ..errors import MinivmmError
from ..guests.loader import load_guest
from ..masking.evc import evc_mode, evc_modes
from ..masking.formats import parse_mask
from ..vmm.migration import Trigger
from .checks import detection_problems, stop_problems

RANDOM_INSNS = (1, 2_000_000)   # where --at random may migrate


@dataclass(frozen=True)
class Cell:
    guest: str | None
    host: str
    evc: str | None = None
    masks: tuple[str, ...] = ()
    migrate: str | None = None      # PROFILE@WHEN
    seed: int = 0
    args: tuple[str, ...] = ()      # a Linux program's arguments
    mounts: tuple[str, ...] = ()    # and what it sees of the machine (HOST[:GUEST])
    stop_and_copy: bool = False     # migrate without pre-copy: stopped at the point, moved at once

    @property
    def id(self) -> str:
        parts = [self.host] + ([self.evc] if self.evc else []) + list(self.masks)
        if self.migrate:
            parts.append(f"to-{self.migrate}")
        return "-".join(parts)

    def __str__(self) -> str:
        return self.id

    @property
    def migrations(self) -> list[str]:
        return [self.migrate] if self.migrate else []

    def skip_reason(self) -> str | None:
        """Why this cell cannot run at all (its host cannot present its EVC mode)."""
        if self.evc and not evc_mode(self.evc).supported_by(load_profile(self.host)):
            return f"{self.host} does not support EVC mode {self.evc}"
        return None

    def run(self, guest: str | None = None, timeout: float = 60, **options):
        """Run ``guest`` (default: the cell's) as the cell says."""
        from ..vmm.vm import VM
        from ..vmm.migration import PreCopy
        if self.stop_and_copy:
            options.setdefault("precopy", PreCopy(enabled=False))
        return VM(guest or self.guest, self.host, evc=self.evc, masks=self.masks, argv=self.args,
                  mounts=self.mounts).run(migrations=self.migrations, timeout=timeout, **options)

    def command(self, guest: str | None = None) -> str:
        """The ``minivmm run`` command that replays this cell."""
        from ..vmm.vm import run_command
        return run_command(guest or self.guest or "GUEST", self.host, self.evc, self.masks, self.migrations,
                           mounts=self.mounts, argv=self.args, stop_and_copy=self.stop_and_copy and bool(self.migrate))


def _evc_modes(evc) -> list[str | None]:
    if evc is None or evc == "none":
        return [None]
    if isinstance(evc, str):
        evc = [e.strip() for e in evc.split(",")]
    if list(evc) == ["all"]:
        return list(evc_modes())
    return [None if e in (None, "none") else evc_mode(e).key for e in evc]


def _migrations(migrate, hosts: list[str]) -> list[tuple[str, str] | None]:
    """(source, destination) pairs, or [None] for no migration."""
    if migrate is None or migrate in ("none", ""):
        return [None]
    if migrate == "all-pairs":
        return [(a, b) for a in hosts for b in hosts if a != b]
    pairs = []
    for item in (migrate.split(",") if isinstance(migrate, str) else migrate):
        # "A:B" needs no quoting in a shell ("A>B" is a redirection); dump: and file:
        # hosts keep their own colon.
        source, sep, destination = str(item).partition(">") if ">" in str(item) else _split_pair(str(item))
        if not sep or not source.strip() or not destination.strip():
            raise MinivmmError(f"--migrate: '{item}' is not SOURCE:DESTINATION (or all-pairs)")
        pairs.append((source.strip(), destination.strip()))
    for pair in pairs:
        for host in pair:
            load_profile(host)
    return pairs


def _split_pair(item: str) -> tuple[str, str, str]:
    """SOURCE:DESTINATION, where either may itself be dump:NAME or file:PATH."""
    for at in (i for i, ch in enumerate(item) if ch == ":"):
        source, destination = item[:at], item[at + 1:]
        if source not in ("dump", "file") and destination:
            return source, ":", destination
    return item, "", ""


def _when(at: str, seed: int, key: str) -> str:
    if at == "random":
        return f"insn:{random.Random(f'{seed}/{key}').randint(*RANDOM_INSNS)}"
    return str(Trigger.parse(at, "--at"))


def cells(guests: Iterable[str | None] = (None,), hosts="all", evc=None, migrate=None, masks=(),
          at: str = "checkpoint:1", seed: int = 0, args=(), mounts=(), stop_and_copy: bool = False) -> list[Cell]:
    """The cross product. ``hosts``: names or "all"; ``evc``: None, a mode, a list or
    "all"; ``migrate``: None, "all-pairs" (each host to each other) or "A:B,..." (a cell
    starts on A only); ``at``: the migration point, or "random" (an instruction count
    drawn from ``seed``, recorded in the cell); ``args`` and ``mounts``: every Linux
    program's arguments and mounts; ``stop_and_copy``: migrations without pre-copy."""
    if at != "random" and Trigger.parse(at, "--at").kind == "ms":
        raise MinivmmError(f"--at {at}: a wall-time point would make cells irreproducible; "
                           f"use checkpoint:N, insn:N, syscall:N or random")
    for guest in guests:
        if guest is not None:
            load_guest(guest)       # a missing file or an assembler error fails here, once
    for mask in masks:
        parse_mask(mask)
    host_list = host_names(hosts)
    modes = _evc_modes(evc)
    pairs = _migrations(migrate, host_list)
    out = []
    for guest in guests:
        for mode in modes:
            for pair in pairs:
                starts = host_list if pair is None else [pair[0]]
                for host in starts:
                    migration = None
                    if pair is not None:
                        key = f"{guest}/{host}/{mode}/{pair[1]}"
                        migration = f"{pair[1]}@{_when(at, seed, key)}"
                    out.append(Cell(guest, host, mode, tuple(masks), migration, seed, tuple(args), tuple(mounts),
                                    stop_and_copy))
    return out


# ---- running ------------------------------------------------------------------------

@dataclass
class Outcome:
    cell: Cell
    status: str                     # passed | failed | skipped
    message: str = ""
    seconds: float = 0.0
    console: str = ""
    report: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**asdict(self.cell), "id": self.cell.id, "status": self.status, "message": self.message,
                "seconds": round(self.seconds, 3), "replay": self.cell.command(), "console": self.console,
                "stop": self.report.get("stop"), "migrations": self.report.get("migrations", [])}


def run_cell(cell: Cell, timeout: float = 60, guest: str | None = None) -> Outcome:
    """One cell, judged: skipped when the host cannot run the EVC mode or the engine
    cannot execute what the guest needs; failed on a crash, a non-zero status, or a
    path the CPUID view hides. ``guest``: where the cell's guest is here, if elsewhere."""
    started = time.perf_counter()
    if cell.skip_reason():
        return Outcome(cell, "skipped", cell.skip_reason())
    try:
        result = cell.run(guest, timeout=timeout)
    except MinivmmError as e:
        return Outcome(cell, "failed", str(e), time.perf_counter() - started)
    seconds = time.perf_counter() - started
    report = result.to_dict()
    if result.stop.reason == "unsupported":
        return Outcome(cell, "skipped", result.stop.message, seconds, result.console, report)
    problems = detection_problems(result) + stop_problems(result)
    if problems:
        return Outcome(cell, "failed", "; ".join(problems), seconds, result.console, report)
    if cell.migrate and not result.migrations:
        return Outcome(cell, "skipped", f"the guest finished before the migration point ({cell.migrate})",
                       seconds, result.console, report)
    notes = [f"migration {m['from']} -> {m['to']} refused, the VM finished on {m['from']}: {m.get('reason', '')}"
             for m in result.migrations if not m["ok"]]
    return Outcome(cell, "passed", "; ".join(notes), seconds, result.console, report)


def run_cells(cell_list: list[Cell], jobs: int | None = None, timeout: float = 60,
              progress: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Run cells on ``jobs`` worker processes (default: one per core), in cell order."""
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        outcomes = []
        for cell in cell_list:
            outcomes.append(run_cell(cell, timeout))
            if progress:
                progress(outcomes[-1])
        return outcomes
    results: dict[int, Outcome] = {}
    # Forked workers start with the engine, the VMM and the profiles already loaded. The
    # caller must run no other thread meanwhile (the CLI's progress bar refreshes itself).
    context = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(run_cell, cell, timeout): i for i, cell in enumerate(cell_list)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            if progress:
                progress(results[futures[future]])
    return [results[i] for i in range(len(cell_list))]


# ---- reports -----------------------------------------------------------------------

def junit_xml(outcomes: list[Outcome], suite: str = "minivmm matrix") -> str:
    """JUnit XML with the elements and attributes pytest's --junitxml writes."""
    import datetime
    import socket
    failures = sum(o.status == "failed" for o in outcomes)
    skipped = sum(o.status == "skipped" for o in outcomes)
    root = ET.Element("testsuites", name="minivmm tests")
    testsuite = ET.SubElement(root, "testsuite", name=suite, errors="0", failures=str(failures),
                              skipped=str(skipped), tests=str(len(outcomes)),
                              time=f"{sum(o.seconds for o in outcomes):.3f}",
                              timestamp=datetime.datetime.now().astimezone().isoformat(),
                              hostname=socket.gethostname())
    for outcome in outcomes:
        cell = outcome.cell
        case = ET.SubElement(testsuite, "testcase", classname=f"minivmm.{cell.guest}", name=cell.id,
                             time=f"{outcome.seconds:.3f}")
        if outcome.status == "failed":
            failure = ET.SubElement(case, "failure", message=outcome.message)
            failure.text = f"{outcome.message}\nreplay: {cell.command()}"
        elif outcome.status == "skipped":
            skip = ET.SubElement(case, "skipped", type="pytest.skip", message=outcome.message)
            skip.text = outcome.message
        if outcome.console:
            ET.SubElement(case, "system-out").text = outcome.console
    return ET.tostring(root, encoding="unicode", xml_declaration=True)


def report(outcomes: list[Outcome], **settings) -> dict:
    counts = {s: sum(o.status == s for o in outcomes) for s in ("passed", "failed", "skipped")}
    return {"settings": settings, "summary": counts, "cells": [o.to_dict() for o in outcomes]}
