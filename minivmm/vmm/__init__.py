"""The VMM: VMs, their run loop and exits, snapshots and migration."""

MIN_MEMORY, MAX_MEMORY = 2 << 20, 4 << 30   # guest RAM: 2 MiB to 4 GiB (docs/abi.md)
MAX_MASKS = 256                             # CPUID masks of one VM (--cpuid-mask)
