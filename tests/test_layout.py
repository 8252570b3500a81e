"""The package layout is the architecture: subpackages in layers, no import cycles."""

import ast
from pathlib import Path

import minivmm

ROOT = Path(minivmm.__file__).parent
# Each subpackage may import only the ones before it (errors is everyone's).
LAYERS = ["errors", "digits", "files", "cpu", "guests", "masking", "linux", "accel", "vmm", "teaching", "testing",
          "cli"]


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(["minivmm", *parts])] = path
    return found


def _imports(name: str, path: Path, modules) -> set[str]:
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minivmm"):
            targets.add(node.module)
    return targets


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                return trail[trail.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, trail + [nxt])):
                return found
        state[node] = 2
        return None

    for start in graph:
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_no_import_cycle_between_modules():
    assert _cycle(_graph()) is None


def test_subpackages_import_only_lower_layers():
    wrong = [f"{a} imports {b}" for a, targets in _graph().items() for b in targets
             if _layer(a) is not None and _layer(b) is not None and _layer(b) > _layer(a)]
    assert wrong == []


def test_the_checks_can_fail():
    """Negative controls: a cycle and an upward import are found."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _layer("minivmm.vmm.vm") > _layer("minivmm.masking.view")

