"""Audit of guideline violations: instructions that need a feature the guest's CPUID
view hides (Intel SDE's chip-check, applied to the VM's own view).

Such an instruction may execute here, because the host has it, and break after a
migration to a host that does not: the code that ran it did not ask CPUID first.
"""

from __future__ import annotations

from ..cpu import isa


class Audit:
    def __init__(self):
        self._seen: dict[int, dict] = {}

    def count(self, address: int, instr, hidden: frozenset[str]) -> None:
        entry = self._seen.get(address)
        if entry is None:
            entry = self._seen[address] = {"rip": address, "instruction": isa.disassemble(instr),
                                           "features": sorted(hidden), "count": 0}
        entry["count"] += 1

    def report(self) -> list[dict]:
        return [dict(e) for _, e in sorted(self._seen.items())]
