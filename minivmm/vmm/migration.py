"""Live migration: when to move, whether the destination can take the VM, and pre-copy.

A migration is requested as ``PROFILE@WHEN`` (``checkpoint:N``, ``insn:N``, ``ms:N``).
Before moving, the compatibility check VirtualCenter makes (``masking.compat.compatibility``): every feature of the VM's
frozen CPUID view must be in the destination's physical ISA, and the mask's T/F/R/H/k
marks must hold; a refused migration leaves the VM running on its source.

Memory moves by iterative pre-copy, as vMotion and Xen do it: all pages while the guest
runs, then the pages it dirtied meanwhile, round after round, until what remains can be
sent within the switchover goal; then the guest stops, the rest and the CPU state move,
and it resumes on the destination. Time is simulated, so a migration is deterministic:
a round of P pages takes P * 4 KiB / bandwidth, and the guest runs that long at the
nominal guest speed, counted in instructions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import MinivmmError

PAGE = 4096
POLICIES = ("live", "offline", "disabled")
MAX_COUNT = 1 << 62               # instructions, checkpoints or ms: far beyond any run


@dataclass(frozen=True)
class Trigger:
    kind: str    # checkpoint | insn | ms | syscall (a Linux program's Nth, once it returned)
    count: int

    @classmethod
    def parse(cls, text: str, where: str) -> Trigger:
        m = re.fullmatch(r"(checkpoint|insn|ms|syscall):([0-9]{1,20})", text.strip())  # not \d: ASCII only
        if not m:
            raise MinivmmError(f"{where}: WHEN must be checkpoint:N, insn:N, ms:N or syscall:N, not '{text}'")
        count = int(m[2])
        if count > MAX_COUNT or (m[1] in ("checkpoint", "syscall") and count == 0):
            raise MinivmmError(f"{where}: {m[1]}:{count} is out of range (checkpoints and system calls count from 1; "
                               f"at most {MAX_COUNT})")
        return cls(m[1], count)

    def __str__(self):
        return f"{self.kind}:{self.count}"


@dataclass(frozen=True)
class MigrationRequest:
    destination: str
    when: Trigger
    cold: bool = False

    @classmethod
    def parse(cls, spec: str, cold: bool = False) -> MigrationRequest:
        destination, at, when = spec.partition("@")
        if not at or not destination.strip():
            raise MinivmmError(f"migration '{spec}': expected PROFILE@WHEN (e.g. penryn@checkpoint:1)")
        return cls(destination.strip(), Trigger.parse(when, f"migration '{spec}'"), cold)


@dataclass(frozen=True)
class PreCopy:
    """The knobs of pre-copy (vMotion's defaults where it has them). Disabled, the VM
    stops at the trigger and moves at once: plain stop-and-copy."""
    enabled: bool = True
    switchover_goal_ms: float = 500.0          # vMotion's default maximum switchover time
    max_rounds: int = 30
    bandwidth_bytes_per_s: float = 1.25e9      # a 10 GbE vMotion network
    guest_insns_per_s: float = 1e9             # nominal guest speed while pages are in flight
    throttle: float = 0.25                     # vMotion's stun: the guest's speed when not converging
    # The guest's work on the source while its pages are in flight, at most: past it the
    # switchover comes at once, as vMotion stuns a vCPU and QEMU's auto-converge throttles
    # one. It bounds pre-copy's time for any guest, and keeps the move near its point: a
    # short program would otherwise run to its end on the source before the switch.
    max_guest_insns: int = 100_000

    def send_ms(self, pages: int) -> float:
        return pages * PAGE / self.bandwidth_bytes_per_s * 1e3

    def guest_insns(self, ms: float, throttled: bool) -> int:
        return int(ms / 1e3 * self.guest_insns_per_s * (self.throttle if throttled else 1.0))


def precopy(params: PreCopy, used_pages: list[int], run_guest, copy_pages, hurry=lambda: False) -> dict:
    """Iterate until converged. The first round sends ``used_pages`` (pages never
    written are zeros on both sides); ``run_guest(insns) -> dirty pages | None`` runs
    the guest on the source while tracking writes (None: the guest stopped);
    ``copy_pages(pages)`` sends them; ``hurry()`` true switches over after this round.
    Returns the record and the pages left to stop-and-copy."""
    if not params.enabled:
        return {"rounds": 0, "pages_per_round": [], "mode": "stop-and-copy", "remaining": None}
    rounds, to_send, throttled, mode = [], used_pages, False, "pre-copy"
    pending, left = len(used_pages), params.max_guest_insns
    for number in range(params.max_rounds):
        copy_pages(to_send)
        rounds.append(pending)
        insns = min(params.guest_insns(params.send_ms(pending), throttled), left)
        left -= insns
        dirty = run_guest(insns)
        if dirty is None:
            return {"rounds": len(rounds), "pages_per_round": rounds, "mode": mode, "stopped": True,
                    "remaining": set()}
        converged = params.send_ms(len(dirty)) <= params.switchover_goal_ms
        if converged or hurry() or left <= 0:
            return {"rounds": len(rounds), "pages_per_round": rounds,
                    "mode": mode if converged or hurry() else "stunned", "remaining": dirty}
        if number >= 1 and len(dirty) >= pending:  # not shrinking: stun the guest (vMotion SDPS)
            throttled, mode = True, "throttled"
        to_send, pending = dirty, len(dirty)
    return {"rounds": len(rounds), "pages_per_round": rounds, "mode": "stop-and-copy", "remaining": to_send or set()}


def trigger_of(event) -> Trigger:
    """When a pending event (a migration request, or a snapshot's (trigger, file)) fires."""
    return event.when if isinstance(event, MigrationRequest) else event[0]


def unreached(events) -> list[dict]:
    """The report's record of migration and snapshot points a run never reached."""
    return [{"event": "migration", "to": e.destination, "when": str(e.when)} if isinstance(e, MigrationRequest)
            else {"event": "snapshot", "file": e[1], "when": str(e[0])} for e in events]


def policy_refusal(policy: str, request: MigrationRequest) -> str | None:
    """Why the VM's migration policy refuses ``request``, or None."""
    if policy == "disabled":
        return "the VM's migration policy is disabled"
    if policy == "offline" and not request.cold:
        return "the VM's migration policy allows only cold (offline) migration"
    return None
