"""VM exit handlers: what the VMM does when the guest executes CPUID or port I/O."""

from .cpuid import CpuidExitHandler
from .io import IoExitHandler

__all__ = ["CpuidExitHandler", "IoExitHandler"]
