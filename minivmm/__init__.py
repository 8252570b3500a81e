"""minivmm: a small x86 hypervisor on unicorn that shows why CPUID masking is advisory.

The names most tests need, importable from the package itself::

    from minivmm import VM
    result = VM("detect_cpuid", host="penryn", evc="intel-merom").run(timeout=10)
"""

from importlib import import_module

_EXPORTS = {"VM": "vmm.vm", "run": "vmm.vm", "RunResult": "vmm.report", "Cell": "testing.matrix",
            "cells": "testing.matrix", "run_cells": "testing.matrix", "compare": "teaching.compare",
            "load_profile": "cpu.profiles", "Mask": "masking.mask", "MinivmmError": "errors",
            "build_c": "guests.toolchain"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    # Lazy: ``import minivmm`` stays cheap; the engine loads with the first VM.
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'minivmm' has no attribute {name!r}")
