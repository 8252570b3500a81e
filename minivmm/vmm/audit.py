"""Audit of guideline violations: instructions that need a feature the guest's CPUID
view hides (Intel SDE's chip-check, applied to the VM's own view).

Such an instruction may execute here, because the host has it, and break after a
migration to a host that does not: the code that ran it did not ask CPUID first.
"""

from __future__ import annotations

from ..cpu import isa


# Executions counted per instruction. Past this, counting stops (its exit is removed):
# a loop hitting a hidden feature on every iteration then runs at engine speed.
COUNT_LIMIT = 1000


class Audit:
    def __init__(self, limit: int = COUNT_LIMIT):
        self._seen: dict[int, dict] = {}
        self.limit = limit

    def count(self, address: int, instr, hidden: frozenset[str]) -> bool:
        """Count one execution; True when this instruction has been counted enough
        (the caller stops watching it; the report says "more": true)."""
        entry = self._seen.get(address)
        if entry is None:
            entry = self._seen[address] = {"rip": address, "instruction": isa.disassemble(instr),
                                           "features": sorted(hidden), "count": 0, "more": False}
        entry["count"] += 1
        if entry["count"] >= self.limit:
            entry["more"] = True
            return True
        return False

    def report(self) -> list[dict]:
        return [dict(e) for _, e in sorted(self._seen.items())]
