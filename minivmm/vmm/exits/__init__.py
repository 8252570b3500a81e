"""VM exit handlers: what the VMM does when the guest executes CPUID, port I/O, an
instruction it must not run natively, or faults."""

from .cpuid import CpuidExitHandler
from .faults import FaultExits
from .io import IoExits
from .traps import InstructionExits

__all__ = ["CpuidExitHandler", "FaultExits", "InstructionExits", "IoExits"]
