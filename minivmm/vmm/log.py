"""Bounded logs of exits: a guest that exits a billion times must not fill the VMM.

Each log keeps the first ``limit`` entries as a sample, and exact counts by key (leaf and
subleaf, vector ...) for the first ``keys`` distinct keys: a guest choosing its keys
(CPUID's subleaf is any 32-bit ECX) must not grow the VMM or its report either. The
report says how many exits the sample left out, and how many fell to further keys.
"""

from __future__ import annotations

SAMPLE = 10_000      # individual exits kept per log: about 1.5 MB of JSON
KEYS = 1_000         # distinct keys counted one by one, as the unknown system-call numbers


class ExitLog:
    def __init__(self, key, limit: int = SAMPLE, keys: int = KEYS):
        self.entries: list = []
        self.limit = limit
        self.left_out = 0                   # exits after the sample was full
        self.counts: dict = {}              # key -> exits, for the first ``keys`` keys
        self.keys = keys
        self.other_keys = 0                 # exits of keys past those
        self._key = key

    def add(self, entry) -> None:
        if len(self.entries) < self.limit:
            self.entries.append(entry)
        else:
            self.left_out += 1
        self.count(self._key(entry))

    def count(self, key) -> None:
        counts = self.counts
        if key in counts:
            counts[key] += 1
        elif len(counts) < self.keys:
            counts[key] = 1
        else:
            self.other_keys += 1
