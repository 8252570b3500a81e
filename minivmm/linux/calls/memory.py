"""Memory system calls (mm/mmap.c, mm/mremap.c, mm/mprotect.c, mm/madvise.c) over the
process's :class:`~minivmm.linux.memory.AddressSpace`."""

from __future__ import annotations

from ..errno import EACCES, EBADF, EEXIST, EFAULT, EINVAL, ENODEV, ENOMEM, EPERM, SyscallError
from ..files import O_ACCMODE, O_PATH, O_WRONLY, Device, Directory, HostFile, MemoryFile
from ..memory import MMAP_MIN, PAGE, PROT_READ, PROT_WRITE, page_up
from .base import sys_zero

MAP_SHARED, MAP_PRIVATE, MAP_TYPE = 0x1, 0x2, 0xF
MAP_FIXED, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x10, 0x20, 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MADV_DONTNEED = 4
PROT_GROWS = 0x03000000          # PROT_GROWSDOWN | PROT_GROWSUP


def _bottom(k) -> int:
    """mmap never hands out pages below the heap's end (brk may grow up to them)."""
    return page_up(k.p.brk) + PAGE


def _fill_from(k, entry, start: int, length: int, offset: int) -> None:
    """A file mapping's contents (MAP_PRIVATE: a copy; MAP_SHARED of a read-only file
    reads the same, since nothing else writes it)."""
    if isinstance(entry, HostFile):
        view = memoryview(k.p.ram)[start:start + length]
        try:
            entry.preadinto(view, offset)
        finally:
            view.release()
        k.p.memory.written(start, length)
    else:
        k.p.fill(start, entry.pread(length, offset))


def sys_mmap(k, uc, address, length, prot, flags, fd, offset):
    memory = k.p.memory
    if not length or offset % PAGE or flags & MAP_TYPE not in (MAP_SHARED, MAP_PRIVATE, 3) or prot & ~0x7 & ~PROT_GROWS:
        raise SyscallError(EINVAL)
    size = page_up(length)
    if size > memory.size:
        raise SyscallError(ENOMEM)
    entry = None
    if not flags & MAP_ANONYMOUS:
        entry = k.fds.get(fd & 0xFFFFFFFF)
        if entry.flags & O_PATH:
            raise SyscallError(EBADF)
        if isinstance(entry, Device) and entry.node.device == "zero":
            entry = None  # /dev/zero maps as anonymous memory
        elif not isinstance(entry, (HostFile, MemoryFile)) or isinstance(entry, Directory):
            raise SyscallError(ENODEV)
        elif entry.flags & O_ACCMODE == O_WRONLY or (flags & MAP_SHARED and prot & PROT_WRITE):
            raise SyscallError(EACCES)  # the file is open read-only
    if flags & (MAP_FIXED | MAP_FIXED_NOREPLACE):
        if address % PAGE:
            raise SyscallError(EINVAL)
        if address < MMAP_MIN:
            raise SyscallError(EPERM)
        if address + size > memory.size:
            raise SyscallError(ENOMEM)
        if flags & MAP_FIXED_NOREPLACE and not flags & MAP_FIXED and not memory.free(address, address + size):
            raise SyscallError(EEXIST)
        start = address
    else:
        hint = address & ~(PAGE - 1)
        if hint >= max(MMAP_MIN, _bottom(k)) and memory.free(hint, hint + size):
            start = hint
        else:
            start = memory.find_free(size, k.p.mmap_top, _bottom(k))
    memory.map(start, size, prot, entry.path if entry else "", offset if entry else 0, bool(flags & MAP_SHARED))
    if entry:
        _fill_from(k, entry, start, min(length, max(entry.size() - offset, 0)), offset)
    return start


def sys_munmap(k, uc, address, length, *_):
    if address % PAGE or not length:
        raise SyscallError(EINVAL)
    k.p.memory.unmap(address, min(length, k.p.memory.size - address) if address < k.p.memory.size else 0)
    return 0


def sys_mprotect(k, uc, address, length, prot, *_):
    if address % PAGE or prot & ~0x7 & ~PROT_GROWS:
        raise SyscallError(EINVAL)
    if length:
        k.p.memory.protect(address, length, prot & 0x7)
    return 0


def sys_mremap(k, uc, old, old_size, new_size, flags, new_address, *_):
    memory = k.p.memory
    if old % PAGE or not new_size or flags & ~(MREMAP_MAYMOVE | MREMAP_FIXED) or \
            (flags & MREMAP_FIXED and not flags & MREMAP_MAYMOVE):
        raise SyscallError(EINVAL)
    old_size, new_size = page_up(old_size), page_up(new_size)
    mapping = memory.mapping_at(old)
    if mapping is None or old + old_size > mapping.end or new_size > old_size and memory.holds_vvar(old, old + 1):
        raise SyscallError(EFAULT)
    if new_size <= old_size and not flags & MREMAP_FIXED:
        if new_size < old_size:
            memory.unmap(old + new_size, old_size - new_size)
        return old
    if not flags & MREMAP_FIXED and memory.free(old + old_size, old + new_size):
        memory.map(old + old_size, new_size - old_size, mapping.prot, mapping.name,
                   mapping.offset + (old + old_size - mapping.start) if mapping.name.startswith("/") else 0,
                   mapping.shared)
        return old
    if not flags & MREMAP_MAYMOVE:
        raise SyscallError(ENOMEM)
    if flags & MREMAP_FIXED:
        if new_address % PAGE or new_address < MMAP_MIN:
            raise SyscallError(EINVAL)
        target = new_address
    else:
        target = memory.find_free(new_size, k.p.mmap_top, _bottom(k))
    contents = bytes(k.p.ram[old:old + min(old_size, new_size)])
    memory.map(target, new_size, mapping.prot, mapping.name, mapping.offset + (old - mapping.start)
               if mapping.name.startswith("/") else 0, mapping.shared)
    k.p.fill(target, contents)
    memory.unmap(old, old_size)
    return target


def sys_madvise(k, uc, address, length, advice, *_):
    if address % PAGE:
        raise SyscallError(EINVAL)
    if advice == MADV_DONTNEED and length:  # private anonymous pages read as zeros again
        end = min(address + page_up(length), k.p.memory.size)
        if k.p.memory.holds_vvar(address, end):
            raise SyscallError(EINVAL)
        for m in k.p.memory.overlapping(address, end):
            lo, hi = max(m.start, address), min(m.end, end)
            if lo < hi and not m.name.startswith("/") and not m.shared:
                k.p.memory.zero(lo, hi)
    return 0


def sys_brk(k, uc, address, *_):
    """The heap [brk_start, brk): it grows into free pages only (mm/mmap.c brk)."""
    p, memory = k.p, k.p.memory
    if address < p.brk_start:
        return p.brk
    old_end, new_end = page_up(p.brk), page_up(address)
    if new_end > old_end:
        if new_end > p.mmap_top or not memory.free(old_end, new_end):
            return p.brk
        memory.map(old_end, new_end - old_end, PROT_READ | PROT_WRITE, "[heap]")
    elif new_end < old_end:
        memory.unmap(new_end, old_end - new_end)
    p.brk = address
    return p.brk


TABLE = {
    9: ("mmap", sys_mmap), 10: ("mprotect", sys_mprotect), 11: ("munmap", sys_munmap), 12: ("brk", sys_brk),
    25: ("mremap", sys_mremap), 26: ("msync", sys_zero), 28: ("madvise", sys_madvise), 149: ("mlock", sys_zero),
    150: ("munlock", sys_zero), 151: ("mlockall", sys_zero), 152: ("munlockall", sys_zero),
}
