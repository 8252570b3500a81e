"""Feature dependencies: hiding a feature hides everything that needs it.

The table is ``data/deps/feature-deps.csv`` (the Linux kernel's ``cpuid_deps[]`` and
QEMU's ``feature_dependencies[]``, each row with its source).
"""

from __future__ import annotations

import csv
import functools
from collections import defaultdict
from importlib import resources

from .features import catalogue


@functools.cache
def requirements() -> dict[str, frozenset[str]]:
    """feature -> the features it needs (all of them)."""
    needs: dict[str, set[str]] = defaultdict(set)
    with resources.files("minivmm").joinpath("data", "deps", "feature-deps.csv").open() as f:
        for row in csv.DictReader(f):
            feature, required = catalogue().get(row["feature"]), catalogue().get(row["requires"])
            if feature and required:
                needs[feature.name].add(required.name)
    return {k: frozenset(v) for k, v in needs.items()}


@functools.cache
def dependents() -> dict[str, frozenset[str]]:
    """feature -> the features that need it directly."""
    users: dict[str, set[str]] = defaultdict(set)
    for feature, needed in requirements().items():
        for required in needed:
            users[required].add(feature)
    return {k: frozenset(v) for k, v in users.items()}


def hidden_closure(hidden) -> frozenset[str]:
    """Everything that must be hidden once ``hidden`` is: the transitive dependents."""
    result, todo = set(hidden), list(hidden)
    users = dependents()
    while todo:
        for user in users.get(todo.pop(), ()):
            if user not in result:
                result.add(user)
                todo.append(user)
    return frozenset(result)


def unmet(shown) -> dict[str, frozenset[str]]:
    """feature -> its requirements that are missing from ``shown``."""
    needs = requirements()
    return {f: needs[f] - set(shown) for f in shown if f in needs and not needs[f] <= set(shown)}
