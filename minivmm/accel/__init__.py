"""Accelerators besides the emulation engine: KVM, the machine's own CPU."""
