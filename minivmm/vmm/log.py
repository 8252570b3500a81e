"""Bounded logs of exits: a guest that exits a billion times must not fill the VMM.

Each log keeps the first ``limit`` entries as a sample and exact totals by key (leaf,
vector ...) for every exit; the report says how many entries the sample left out.
"""

from __future__ import annotations

from collections import Counter

SAMPLE = 10_000      # individual exits kept per log: about 1.5 MB of JSON


class ExitLog:
    def __init__(self, key, limit: int = SAMPLE):
        self.entries: list = []
        self.limit = limit
        self.beyond: Counter = Counter()   # key -> exits left out of the sample
        self._key = key

    def add(self, entry) -> None:
        if len(self.entries) < self.limit:
            self.entries.append(entry)
        else:
            self.beyond[self._key(entry)] += 1

    @property
    def left_out(self) -> int:
        return sum(self.beyond.values())

    def totals(self) -> Counter:
        return Counter(self._key(e) for e in self.entries) + self.beyond
