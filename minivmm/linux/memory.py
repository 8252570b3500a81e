"""The process's address space as Linux keeps it (mm/mmap.c, mm/mprotect.c): mappings
with their protections and names, handed out top-down below the stack (Linux's default
layout), and a protection byte per page that the VMM's TLB fill consults, so that a
write to a read-only page, or any touch of an unmapped one, is the program's SIGSEGV.

Guest RAM is identity-mapped (an address is its own offset in RAM): the address space
decides only which pages the program may touch, and how."""

from __future__ import annotations

import mmap as host_mmap
from dataclasses import dataclass, replace

from .errno import EFAULT, EINVAL, ENOMEM, SyscallError

PAGE = 4096
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MMAP_MIN = 0x10000              # vm.mmap_min_addr: nothing is ever mapped below
MAPPED = 8                      # in the page table: a mapping exists (PROT_NONE included)


def page_up(value: int) -> int:
    return (value + PAGE - 1) & ~(PAGE - 1)


def effective(prot: int) -> int:
    """What x86 page tables can express: writable or executable pages are readable."""
    prot &= PROT_READ | PROT_WRITE | PROT_EXEC
    return prot | PROT_READ if prot & (PROT_WRITE | PROT_EXEC) else prot


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    prot: int                   # PROT_* as the program asked
    name: str = ""              # a file's path, [heap], [stack] or "" (anonymous)
    offset: int = 0             # in the file
    shared: bool = False

    def line(self) -> str:
        """Its line of /proc/self/maps (fs/proc/task_mmu.c show_map_vma)."""
        perms = "".join(c if self.prot & bit else "-" for c, bit in (("r", PROT_READ), ("w", PROT_WRITE),
                                                                      ("x", PROT_EXEC)))
        perms += "s" if self.shared else "p"
        inode = "0" if not self.name or self.name.startswith("[") else "1"
        head = f"{self.start:08x}-{self.end:08x} {perms} {self.offset:08x} 00:00 {inode}"
        return f"{head:<72} {self.name}".rstrip() + "\n" if self.name else head + "\n"


class AddressSpace:
    def __init__(self, ram):
        self.ram = ram
        self.size = len(ram)
        self.pages = bytearray(self.size // PAGE)   # effective PROT bits | MAPPED, per page
        self.maps: list[Mapping] = []
        self.on_change = None   # (start, end): protections changed there (the VMM empties its TLB)
        self.on_write = None    # (address, size): the kernel changed memory there (dirty for pre-copy)

    # -- the mapping list -------------------------------------------------------------------

    def _carve(self, start: int, end: int) -> None:
        """Remove [start, end) from the list, splitting mappings that straddle it."""
        kept = []
        for m in self.maps:
            if m.end <= start or m.start >= end:
                kept.append(m)
                continue
            if m.start < start:
                kept.append(replace(m, end=start))
            if m.end > end:
                kept.append(replace(m, start=end, offset=m.offset + (end - m.start) if m.name else 0))
        self.maps = kept

    def _insert(self, mapping: Mapping) -> None:
        self.maps.append(mapping)
        self.maps.sort(key=lambda m: m.start)
        merged = []
        for m in self.maps:  # adjacent anonymous mappings alike merge (vma_merge), files' stay apart
            last = merged[-1] if merged else None
            if last and last.end == m.start and not m.name.startswith("/") and \
                    (last.prot, last.name, last.shared) == (m.prot, m.name, m.shared):
                merged[-1] = replace(last, end=m.end)
            else:
                merged.append(m)
        self.maps = merged

    def _set_pages(self, start: int, end: int, value: int) -> None:
        self.pages[start // PAGE:end // PAGE] = bytes([value]) * ((end - start) // PAGE)
        if self.on_change:
            self.on_change(start, end)

    def _check_range(self, start: int, length: int) -> int:
        if start % PAGE:
            raise SyscallError(EINVAL)
        end = start + page_up(length)
        if end > self.size or end < start:
            raise SyscallError(ENOMEM)
        return end

    # -- what the system calls do -------------------------------------------------------------

    def map(self, start: int, length: int, prot: int, name: str = "", offset: int = 0,
            shared: bool = False) -> None:
        """A new mapping at [start, start + length), replacing what was there (MAP_FIXED);
        its pages read as zeros until the caller fills them."""
        end = self._check_range(start, length)
        self._carve(start, end)
        self._insert(Mapping(start, end, prot, name, offset, shared))
        self.zero(start, end)
        self._set_pages(start, end, effective(prot) | MAPPED)

    def unmap(self, start: int, length: int) -> None:
        end = self._check_range(start, length)
        self._carve(start, end)
        self._set_pages(start, end, 0)
        self.zero(start, end)

    def protect(self, start: int, length: int, prot: int) -> None:
        end = self._check_range(start, length)
        if not all(self.pages[start // PAGE:end // PAGE]):
            raise SyscallError(ENOMEM)  # part of the range is not mapped (mprotect(2))
        pieces = [m for m in self.maps if m.start < end and m.end > start]
        self._carve(start, end)
        for m in pieces:
            lo, hi = max(m.start, start), min(m.end, end)
            self._insert(replace(m, start=lo, end=hi, prot=prot,
                                 offset=m.offset + (lo - m.start) if m.name else 0))
        self._set_pages(start, end, effective(prot) | MAPPED)

    def free(self, start: int, end: int) -> bool:
        return 0 <= start <= end <= self.size and not any(self.pages[start // PAGE:end // PAGE])

    def mapping_at(self, address: int) -> Mapping | None:
        return next((m for m in self.maps if m.start <= address < m.end), None)

    def find_free(self, length: int, top: int, bottom: int) -> int:
        """The highest free range of ``length`` bytes in [bottom, top): Linux's top-down
        allocator (mm/mmap.c unmapped_area_topdown)."""
        size = page_up(length)
        end = top
        while end - size >= bottom:
            start = end - size
            window = bytes(self.pages[start // PAGE:end // PAGE])
            rest = window.lstrip(b"\0")
            if not rest:
                return start
            end = start + (len(window) - len(rest)) * PAGE  # below the lowest page in the way
        raise SyscallError(ENOMEM)

    def zero(self, start: int, end: int) -> None:
        """Give pages back as zeros, without touching (and allocating) fresh ones: RAM is
        a shared anonymous host mapping, whose pages MADV_REMOVE frees."""
        if end <= start:
            return
        try:
            self.ram.madvise(host_mmap.MADV_REMOVE, start, end - start)
        except (AttributeError, OSError, ValueError):
            self.ram[start:end] = bytes(end - start)
        self.written(start, end - start)

    def written(self, address: int, size: int) -> None:
        if self.on_write:
            self.on_write(address, size)

    # -- the kernel's own accesses (copy_from_user, copy_to_user) ------------------------------

    def check(self, address: int, size: int, need: int) -> None:
        if size <= 0:
            return
        if address < 0 or address + size > self.size:
            raise SyscallError(EFAULT)
        for page in range(address // PAGE, (address + size - 1) // PAGE + 1):
            if self.pages[page] & need != need:
                raise SyscallError(EFAULT)

    def text(self) -> str:
        """/proc/self/maps."""
        return "".join(m.line() for m in self.maps)

    # -- snapshots ----------------------------------------------------------------------------

    def state(self) -> list:
        return [[m.start, m.end, m.prot, m.name, m.offset, m.shared] for m in self.maps]

    def restore(self, maps: list) -> None:
        self.maps = []
        self.pages[:] = bytes(len(self.pages))
        for start, end, prot, name, offset, shared in maps:
            if not (0 <= start < end <= self.size and start % PAGE == end % PAGE == 0):
                raise ValueError(f"mapping {start:#x}-{end:#x} is outside the address space")
            self._insert(Mapping(start, end, prot, name, offset, shared))
            self.pages[start // PAGE:end // PAGE] = bytes([effective(prot) | MAPPED]) * ((end - start) // PAGE)
