"""The result of a run, and its JSON report (docs/cli.md, docs/report.schema.json)."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

EXIT_CODES = {"halted": 0, "crashed": 125, "unsupported": 126, "limit": 124, "migrated": 0}
SIGNALS = {1: "SIGHUP", 2: "SIGINT", 3: "SIGQUIT", 4: "SIGILL", 5: "SIGTRAP", 6: "SIGABRT", 7: "SIGBUS",
           8: "SIGFPE", 9: "SIGKILL", 10: "SIGUSR1", 11: "SIGSEGV", 12: "SIGUSR2", 13: "SIGPIPE", 14: "SIGALRM",
           15: "SIGTERM"}
DETECTION_LINE = re.compile(r"^(?P<feature>[\w.\-]+):\s+cpuid=(?P<cpuid>[01])\s+probe=(?P<probe>[01-])"
                            r"\s+uses=(?P<uses>\S+)\s*$")


@dataclass
class Stop:
    reason: str                      # exited | halted | crashed | unsupported | limit | signaled
    status: int = 0                  # signaled: 128 + the signal's number, as a shell reports it
    signal: str | None = None        # signaled: SIGILL, SIGSEGV ...
    vector: int | None = None
    rip: int | None = None
    instruction: str | None = None
    missing_features: list[str] = field(default_factory=list)
    message: str = ""

    def to_dict(self) -> dict:
        return {"reason": self.reason, "status": self.status, "signal": self.signal, "vector": self.vector, "rip": self.rip,
                "instruction": self.instruction, "missing_features": list(self.missing_features),
                "message": self.message}


@dataclass
class Detection:
    """One ``FEATURE: cpuid=0|1 probe=0|1|- uses=PATH`` console line."""
    feature: str
    cpuid: bool
    probe: bool | None
    uses: str


@dataclass
class RunResult:
    guest: str
    stop: Stop
    console: str
    host: str
    hosts: list[str]
    evc: str | None
    instructions: int | None
    cpuid_log: list[tuple] = field(repr=False)   # ((leaf, subleaf), (eax..edx), host), as recorded
    exceptions: list[dict] = field(default_factory=list)
    migrations: list[dict] = field(default_factory=list)
    audit: list[dict] = field(default_factory=list)
    checkpoints: int = 0
    unknown_port_writes: dict[int, int] = field(default_factory=dict)
    engine_model: str = ""
    memory: int = 0
    ram: object = field(default=None, repr=False, compare=False)   # guest RAM at the end, for the digest
    view_features: frozenset[str] = frozenset()   # what the guest's CPUID view shows, at the end
    # what the guest did, as migration checks need it: the features in the CPUID answers it
    # read, and (with the audit) the gated features it executed that its view hides
    observed: dict = field(default_factory=lambda: {"read": [], "executed": [], "audited": False})
    # Exact totals of every exit (of the first 1000 CPUID keys), and how many the bounds left out.
    cpuid_totals: dict[tuple[int, int], int] = field(default_factory=dict)
    exception_totals: dict[int, int] = field(default_factory=dict)
    left_out: dict[str, int] = field(default_factory=lambda: {"cpuid_exits": 0, "cpuid_exit_counts": 0,
                                                              "exceptions": 0, "console": 0, "stderr": 0})
    unreached: list[dict] = field(default_factory=list)   # migration and snapshot points never reached
    snapshots: list[dict] = field(default_factory=list)   # snapshots written: when, file, host
    syscalls: dict | None = None     # a Linux program's: total, counts by name, unknown numbers
    stderr: str = ""                 # a Linux program's standard error
    accel: str = "tcg"               # tcg: the emulation engine; kvm: the machine's own CPU
    notes: list[str] = field(default_factory=list)   # what the report cannot show, and why
    @functools.cached_property
    def memory_sha256(self) -> str:
        """SHA-256 of guest RAM at the end of the run: computed when asked (it reads
        all of RAM, hundreds of MiB for a Linux program), from the untouched pages'
        zeros without touching them."""
        from . import ram
        return ram.digest(self.ram) if self.ram is not None else ""

    @property
    def cpuid_exits(self) -> list[dict]:
        return [{"leaf": leaf, "subleaf": subleaf, "eax": a, "ebx": b, "ecx": c, "edx": d, "host": host}
                for (leaf, subleaf), (a, b, c, d), host in self.cpuid_log]

    @property
    def exit_code(self) -> int:
        if self.stop.reason in ("exited", "signaled"):
            return self.stop.status
        return EXIT_CODES[self.stop.reason]

    @property
    def detections(self) -> dict[str, Detection]:
        found = {}
        for line in self.console.splitlines():
            m = DETECTION_LINE.match(line.strip())
            if m:
                probe = None if m["probe"] == "-" else m["probe"] == "1"
                found[m["feature"]] = Detection(m["feature"], m["cpuid"] == "1", probe, m["uses"])
        return found

    @property
    def syscall_places(self) -> list[dict] | None:
        """Where a Linux program's system calls fall, to choose N for a ``syscall:N``
        point: per name (an unknown call by its number), in the order first called, how
        many times and the first and last call, numbered from 1 as ``syscall:N`` counts
        (a point right after that call). Of the first 10000 calls, the sample kept."""
        if self.syscalls is None:
            return None
        places: dict = {}
        for n, name in enumerate(self.syscalls["sample"], 1):
            place = places.setdefault(name, {"name": name, "calls": 0, "first": n, "last": n})
            place["calls"] += 1
            place["last"] = n
        return list(places.values())

    def cpuid_leaves(self) -> list[tuple[int, int]]:
        return list(dict.fromkeys(key for key, _, _ in self.cpuid_log))

    def to_dict(self) -> dict:
        return {
            "guest": self.guest, "stop": self.stop.to_dict(), "console": self.console,
            "host": self.host, "hosts": self.hosts, "evc": self.evc, "instructions": self.instructions,
            "cpuid_exits": self.cpuid_exits, "exceptions": self.exceptions,
            "migrations": self.migrations, "audit": self.audit, "checkpoints": self.checkpoints,
            "unknown_port_writes": {f"0x{p:x}": n for p, n in sorted(self.unknown_port_writes.items())},
            "engine_model": self.engine_model, "memory": self.memory, "memory_sha256": self.memory_sha256,
            "view_features": sorted(self.view_features), "observed": dict(self.observed),
            "cpuid_exit_counts": [{"leaf": leaf, "subleaf": sub, "count": n}
                                  for (leaf, sub), n in sorted(self.cpuid_totals.items())],
            "exception_counts": [{"vector": v, "count": n} for v, n in sorted(self.exception_totals.items())],
            "truncated": dict(self.left_out),
            "unreached": list(self.unreached),
            "snapshots": list(self.snapshots),
            "syscalls": self.syscalls and {**self.syscalls, "where": self.syscall_places}, "stderr": self.stderr,
            "accel": self.accel, "notes": list(self.notes),
        }
