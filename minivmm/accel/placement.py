"""Keeping a native process where the emulator can hold it.

The emulator's Linux program lives in the VM's RAM, from address 0 to at most 4 GiB,
with its stack at the top and mmap handing out pages top-down below it. A process of
this machine lives at 47-bit addresses: its stack, its mmap area and its vDSO near the
top of the user half. A process that may move into the emulator is therefore started
with that layout (ADDR_NO_RANDOMIZE keeps brk just after the image): at its exec stop,
before it runs an instruction, its stack moves below the VM's RAM top (the pointers the
kernel wrote into it shifted along), its vDSO is withheld (AT_SYSINFO_EHDR becomes
AT_IGNORE, so the C library makes real system calls, as under the emulator), and each
mmap without an address is given the one the emulator's top-down search would pick.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PAGE = 4096
AT_NULL, AT_IGNORE, AT_SYSINFO_EHDR = 0, 1, 33
# auxiliary vector entries that point into the stack (fs/binfmt_elf.c create_elf_tables)
AT_POINTERS = {15, 24, 25, 31}         # AT_PLATFORM, AT_BASE_PLATFORM, AT_RANDOM, AT_EXECFN
KERNEL_AREAS = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]")


@dataclass(frozen=True)
class Area:
    """One line of /proc/PID/maps (fs/proc/task_mmu.c show_map_vma)."""
    start: int
    end: int
    perms: str           # rwxp / rwxs
    offset: int
    inode: int
    name: str

    @property
    def prot(self) -> int:
        return sum(bit for c, bit in zip(self.perms[:3], (1, 2, 4)) if c != "-")

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def anonymous(self) -> bool:
        """No file's: shared anonymous memory shows as /dev/zero (deleted) (shmem_zero_setup)."""
        return not self.name.startswith("/") or self.name == "/dev/zero (deleted)"


def parse_maps(text: str) -> list[Area]:
    areas = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        span, perms, offset, _dev, inode = fields[:5]
        start, end = (int(x, 16) for x in span.split("-"))
        areas.append(Area(start, end, perms, int(offset, 16), int(inode), fields[5] if len(fields) > 5 else ""))
    return areas


def free_below(areas: list[Area], size: int, top: int, bottom: int) -> int | None:
    """The highest address of ``size`` free bytes below ``top`` and above ``bottom``
    (the emulator's top-down search, mm/mmap.c's default layout), or None."""
    size = -(-size // PAGE) * PAGE
    ceiling = top
    for area in sorted(areas, key=lambda a: -a.end):
        if area.start >= ceiling:
            continue
        if area.end <= ceiling - size and ceiling - size >= bottom:
            return ceiling - size
        ceiling = min(ceiling, area.start)
    return ceiling - size if ceiling - size >= bottom else None


def moved_stack(data: bytes, start: int, rsp: int, delta: int) -> tuple[bytes, bytes]:
    """The initial stack ``data`` (mapped at ``start``, RSP at ``rsp``) for a move by
    ``delta`` bytes: argv's and envp's pointers and the auxiliary vector's pointers into
    the stack shifted, AT_SYSINFO_EHDR withheld. Returns it and the new auxv's pairs."""
    out = bytearray(data)
    end = start + len(data)

    def word(at: int) -> int:
        return struct.unpack_from("<Q", out, at - start)[0]

    def shift(at: int) -> None:
        value = word(at)
        if start <= value < end:
            struct.pack_into("<Q", out, at - start, value + delta)

    at = rsp + 8
    for _ in range(2):   # argv, then envp: pointers up to NULL
        while word(at):
            shift(at)
            at += 8
        at += 8
    auxv = at
    while word(at) != AT_NULL:
        if word(at) == AT_SYSINFO_EHDR:
            struct.pack_into("<QQ", out, at - start, AT_IGNORE, 0)
        elif word(at) in AT_POINTERS:
            shift(at + 8)
        at += 16
    return bytes(out), bytes(out[auxv - start:at + 16 - start])
