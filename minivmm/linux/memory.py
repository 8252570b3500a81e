"""The process's address space as Linux keeps it (mm/mmap.c, mm/mprotect.c): mappings
with their protections and names, handed out top-down below the stack (Linux's default
layout), and a protection byte per page that the VMM's TLB fill consults, so that a
write to a read-only page, or any touch of an unmapped one, is the program's SIGSEGV.

Guest RAM is identity-mapped (an address is its own offset in RAM): the address space
decides only which pages the program may touch, and how.

Costs grow with the work, not with the mappings a program made before: the mappings are
kept sorted in chunks, found by bisection, and the top-down search for free pages skips
2 MiB blocks without a free page by a summary byte each (as Linux's maple tree keeps the
largest gap of each subtree), then searches the page bytes in C.
"""

from __future__ import annotations

import itertools
import mmap as host_mmap
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, replace

from .errno import EACCES, EFAULT, EINVAL, ENOMEM, SyscallError

PAGE = 4096
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MMAP_MIN = 0x10000              # vm.mmap_min_addr: nothing is ever mapped below
MAPPED = 8                      # in the page table: a mapping exists (PROT_NONE included)
BLOCK = 512                     # pages one summary byte covers (2 MiB)
CHUNK = 64                      # mappings in a chunk of the sorted list (it splits at twice that)
# per new protection: the page bytes that lose no permission to it
KEEPING = [bytes(b for b in range(256) if not b & ~prot & 7) for prot in range(8)]


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


def _alike(a: Mapping, b: Mapping) -> bool:
    """Adjacent anonymous mappings alike merge (mm/mmap.c vma_merge); files' stay apart."""
    return a.end == b.start and not a.name.startswith("/") and (a.prot, a.name, a.shared) == (b.prot, b.name, b.shared)


class Mappings:
    """Mappings sorted by start, never overlapping, in chunks of about CHUNK (the layout of
    sortedcontainers' SortedList): finding is two bisections and a change rewrites the
    chunks it touches, so both cost O(log n) plus the change, for any number n."""

    def __init__(self):
        self._chunks: list[list[Mapping]] = []
        self._starts: list[list[int]] = []      # each chunk's starts
        self._firsts: list[int] = []            # each chunk's first start

    def __iter__(self):
        return itertools.chain.from_iterable(self._chunks)

    def _range(self, start: int, end: int) -> tuple[int, int, int, int]:
        """(chunk, index) of the first mapping overlapping [start, end), and of the first
        mapping past them."""
        c1 = max(bisect_right(self._firsts, start) - 1, 0)
        k1 = bisect_right(self._starts[c1], start) - 1
        if k1 < 0 or self._chunks[c1][k1].end <= start:
            k1 += 1
        c2 = max(bisect_left(self._firsts, end) - 1, 0)
        return c1, k1, c2, bisect_left(self._starts[c2], end)

    def overlapping(self, start: int, end: int) -> list[Mapping]:
        if not self._chunks:
            return []
        c1, k1, c2, k2 = self._range(start, end)
        if c1 == c2:
            return self._chunks[c1][k1:k2]
        return [*self._chunks[c1][k1:], *itertools.chain.from_iterable(self._chunks[c1 + 1:c2]),
                *self._chunks[c2][:k2]]

    def splice(self, start: int, end: int, maps: list[Mapping]) -> None:
        """Put ``maps`` (sorted, inside [start, end)) in place of the mappings overlapping
        [start, end)."""
        if not self._chunks:
            c1 = k1 = c2 = k2 = 0
            self._chunks, self._starts, self._firsts = [[]], [[]], [0]
        else:
            c1, k1, c2, k2 = self._range(start, end)
        items = self._chunks[c1][:k1] + maps + self._chunks[c2][k2:]
        if len(items) < CHUNK // 2 and c2 + 1 < len(self._chunks):  # a small chunk joins the next
            c2 += 1
            items += self._chunks[c2]
        chunks = [items[i:i + CHUNK] for i in range(0, len(items), CHUNK)] if len(items) > 2 * CHUNK else \
            [items] if items else []
        self._chunks[c1:c2 + 1] = chunks
        self._starts[c1:c2 + 1] = [[m.start for m in chunk] for chunk in chunks]
        self._firsts[c1:c2 + 1] = [chunk[0].start for chunk in chunks]


class AddressSpace:
    def __init__(self, ram):
        self.ram = ram
        self.size = len(ram)
        self.pages = bytearray(self.size // PAGE)   # effective PROT bits | MAPPED, per page
        self.full = bytearray(-(-len(self.pages) // BLOCK))   # per block: 1 when it has no free page
        self.maps = Mappings()
        self.on_change = None   # (start, end): permissions were taken away there (the VMM empties its TLB)
        self.on_write = None    # (address, size): the kernel changed memory there (dirty for pre-copy)
        self.vvar: int | None = None   # where [vvar] is (vdso.py), while it is mapped
        self.on_vvar_gone = None       # (): [vvar] was unmapped or mapped over (the VMM stops writing there)

    # -- the mapping list -------------------------------------------------------------------

    def overlapping(self, start: int, end: int) -> list[Mapping]:
        return self.maps.overlapping(start, end)

    def _carve(self, start: int, end: int) -> None:
        """Remove [start, end) from the list, splitting mappings that straddle it."""
        found, kept = self.maps.overlapping(start, end), []
        for m in found:
            if m.start < start:
                kept.append(replace(m, end=start))
            if m.end > end:
                kept.append(replace(m, start=end, offset=m.offset + (end - m.start) if m.name else 0))
        if found:
            self.maps.splice(start, end, kept)

    def _insert(self, mapping: Mapping) -> None:
        """Into a free range, merged with its neighbours where they are alike."""
        before = self.maps.overlapping(mapping.start - 1, mapping.start)
        if before and _alike(before[0], mapping):
            mapping = replace(before[0], end=mapping.end)
        after = self.maps.overlapping(mapping.end, mapping.end + 1)
        if after and _alike(mapping, after[0]):
            mapping = replace(mapping, end=after[0].end)
        self.maps.splice(mapping.start, mapping.end, [mapping])

    def _mark(self, start: int, end: int, value: int) -> None:
        first, last = start // PAGE, end // PAGE
        self.pages[first:last] = bytes([value]) * (last - first)
        for block in range(first // BLOCK, -(-last // BLOCK)):
            self.full[block] = 0 not in self.pages[block * BLOCK:(block + 1) * BLOCK]

    def _set_pages(self, start: int, end: int, value: int) -> None:
        """New protections; only taking a permission away outdates what the VMM's TLB
        holds (a page it refused was forgotten when its fault was delivered)."""
        taken = self.pages[start // PAGE:end // PAGE].translate(None, KEEPING[value & 7])
        self._mark(start, end, value)
        if taken and self.on_change:
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
        self._lose_vvar(start, end)
        self._insert(Mapping(start, end, prot, name, offset, shared))
        self.zero(start, end)
        self._set_pages(start, end, effective(prot) | MAPPED)

    def unmap(self, start: int, length: int) -> None:
        end = self._check_range(start, length)
        self._carve(start, end)
        self._lose_vvar(start, end)
        self._set_pages(start, end, 0)
        self.zero(start, end)

    def _lose_vvar(self, start: int, end: int) -> None:
        if self.vvar is not None and start <= self.vvar < end:
            self.vvar = None
            if self.on_vvar_gone:
                self.on_vvar_gone()

    def find_named(self, name: str) -> int | None:
        """Where the first mapping called ``name`` starts (None: there is none)."""
        return next((m.start for m in self.maps if m.name == name), None)

    def holds_vvar(self, start: int, end: int) -> bool:
        """Whether [start, end) holds [vvar]: a special mapping (vdso.py) that cannot
        become writable (no VM_MAYWRITE: mprotect is EACCES), has no pages to drop
        (VM_PFNMAP: madvise is EINVAL) and cannot grow (VM_DONTEXPAND: mremap is EFAULT)."""
        return self.vvar is not None and start <= self.vvar < end

    def protect(self, start: int, length: int, prot: int) -> None:
        end = self._check_range(start, length)
        if prot & PROT_WRITE and self.holds_vvar(start, end):
            raise SyscallError(EACCES)
        if 0 in self.pages[start // PAGE:end // PAGE]:
            raise SyscallError(ENOMEM)  # part of the range is not mapped (mprotect(2))
        pieces = self.overlapping(start, end)
        self._carve(start, end)
        for m in pieces:
            lo, hi = max(m.start, start), min(m.end, end)
            self._insert(replace(m, start=lo, end=hi, prot=prot,
                                 offset=m.offset + (lo - m.start) if m.name else 0))
        self._set_pages(start, end, effective(prot) | MAPPED)

    def free(self, start: int, end: int) -> bool:
        first, last = start // PAGE, end // PAGE
        return 0 <= start <= end <= self.size and self.pages.count(0, first, last) == last - first

    def mapping_at(self, address: int) -> Mapping | None:
        found = self.overlapping(address, address + 1)
        return found[0] if found else None

    def find_free(self, length: int, top: int, bottom: int) -> int:
        """The highest free range of ``length`` bytes in [bottom, top): Linux's top-down
        allocator (mm/mmap.c unmapped_area_topdown). Full blocks above the highest free
        page are skipped by their summary bytes."""
        count = page_up(length) // PAGE
        low, high = -(-bottom // PAGE), top // PAGE
        block = self.full.rfind(0, low // BLOCK, -(-high // BLOCK))
        at = self.pages.rfind(bytes(count), low, min(high, (block + 1) * BLOCK)) if block >= 0 else -1
        if at < 0:
            raise SyscallError(ENOMEM)
        return at * PAGE

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
        self.maps = Mappings()
        self._mark(0, self.size, 0)
        for start, end, prot, name, offset, shared in maps:
            if not (0 <= start < end <= self.size and start % PAGE == end % PAGE == 0):
                raise ValueError(f"mapping {start:#x}-{end:#x} is outside the address space")
            if self.overlapping(start, end):
                raise ValueError(f"mapping {start:#x}-{end:#x} overlaps another")
            self._insert(Mapping(start, end, prot, name, offset, shared))
            self._mark(start, end, effective(prot) | MAPPED)
