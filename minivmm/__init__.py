"""minivmm: a small x86 hypervisor on unicorn that shows why CPUID masking is advisory.

The public API (docs/api.md), importable from the package itself::

    from minivmm import VM
    result = VM("detect_cpuid", host="penryn", evc="intel-merom").run(timeout=10)
"""

from importlib import import_module

# The public API, documented name by name in docs/api.md (a test keeps the two equal).
_EXPORTS = {"VM": "vmm.vm", "run": "vmm.vm", "RunResult": "vmm.report", "Cell": "testing.matrix",
            "cells": "testing.matrix", "run_cells": "testing.matrix", "compare": "teaching.compare",
            "load_profile": "cpu.profiles", "HostProfile": "cpu.profiles", "CpuidTable": "cpu.table",
            "GuestCpuidView": "masking.view", "Mask": "masking.mask", "parse_mask": "masking.formats",
            "format_mask": "masking.formats", "MinivmmError": "errors", "build_c": "guests.toolchain"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    # Lazy: ``import minivmm`` stays cheap; the engine loads with the first VM.
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'minivmm' has no attribute {name!r}")
