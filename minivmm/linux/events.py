"""Readiness, and the files that exist to report it: eventfd (fs/eventfd.c) and epoll
(fs/eventpoll.c). A description is ready for reading, for writing, or hung up as
poll(2) says (:func:`readiness`); poll, select and epoll_wait wait, through the
scheduler, until one they ask about is, or their time runs out."""

from __future__ import annotations

import stat as st
import struct

from .errno import EAGAIN, EINVAL, SyscallError
from .files import OpenFile
from .pipes import O_NONBLOCK, PipeEnd
from .threads import Block
from .vfs import MemoryNode

POLLIN, POLLPRI, POLLOUT, POLLERR, POLLHUP, POLLNVAL = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20
POLLRDNORM, POLLWRNORM = 0x40, 0x100
EPOLLET, EPOLLONESHOT = 1 << 31, 1 << 30
EFD_SEMAPHORE = 1
EP_MAX_NESTS = 4          # epolls nested below one (fs/eventpoll.c): deeper, or a loop, is ELOOP
MAX_EPOLL_DEPTH = EP_MAX_NESTS + 1   # an epoll and the epolls inside it, as deep as Linux lets them go
COUNTER_MAX = (1 << 64) - 2
ANON = MemoryNode(st.S_IFREG | 0o600, b"")


def readiness(entry: OpenFile) -> int:
    """POLLIN, POLLOUT and POLLHUP as the description's poll would say: a pipe by its
    buffer and its other end, an eventfd by its counter, an epoll by its ready list;
    anything else (files, devices, the standard streams) is always ready."""
    if isinstance(entry, PipeEnd):
        if entry.writing:
            return (POLLOUT | POLLWRNORM if entry.writable() else 0) | (POLLERR if not entry.pipe.readers else 0)
        return (POLLIN | POLLRDNORM if entry.pipe.buffer else 0) | (POLLHUP if not entry.pipe.writers else 0)
    if isinstance(entry, (EventFd, Epoll)):
        return entry.readiness()
    return POLLIN | POLLOUT | POLLRDNORM | POLLWRNORM


class EventFd(OpenFile):
    seekable = False

    def __init__(self, value: int, flags: int):
        super().__init__("anon_inode:[eventfd]", ANON, flags | 2)   # O_RDWR
        self.counter, self.semaphore = value, bool(flags & EFD_SEMAPHORE)

    def readiness(self) -> int:
        return (POLLIN if self.counter else 0) | (POLLOUT if self.counter < COUNTER_MAX else 0)

    def read(self, count: int) -> bytes:
        if count < 8:
            raise SyscallError(EINVAL)
        if not self.counter:
            if self.flags & O_NONBLOCK:
                raise SyscallError(EAGAIN)
            raise Block(lambda: self.counter > 0)
        value = 1 if self.semaphore else self.counter
        self.counter -= value
        return struct.pack("<Q", value)

    def pread(self, count, offset):
        return self.read(count)

    def write(self, data: bytes) -> int:
        if len(data) < 8:
            raise SyscallError(EINVAL)
        value = struct.unpack_from("<Q", data)[0]
        if value == (1 << 64) - 1:
            raise SyscallError(EINVAL)
        if self.counter + value > COUNTER_MAX:
            if self.flags & O_NONBLOCK:
                raise SyscallError(EAGAIN)
            raise Block(lambda: self.counter + value <= COUNTER_MAX)
        self.counter += value
        return 8


class Epoll(OpenFile):
    """An epoll instance: fd -> (its description, the events asked, the data given)."""
    seekable = False

    def __init__(self, flags: int):
        super().__init__("anon_inode:[eventpoll]", ANON, flags)
        self.interest: dict[int, list] = {}

    def ready(self) -> list[tuple[int, int]]:
        """(events, data) of each watched description that is ready, level-triggered;
        a one-shot entry is disarmed once reported."""
        out = []
        for fd, entry in list(self.interest.items()):
            description, events, data = entry
            revents = readiness(description) & (events | POLLERR | POLLHUP)
            if revents:
                out.append((revents, data))
                if events & EPOLLONESHOT:
                    entry[1] = 0
        return out

    def readiness(self) -> int:
        return POLLIN if any(readiness(d) & (e | POLLERR | POLLHUP) for d, e, _ in self.interest.values()) else 0

    def depth(self) -> int:
        """How many epolls deep this one watches (1: none inside it)."""
        return 1 + max((d.depth() for d, _, _ in self.interest.values() if isinstance(d, Epoll)), default=0)

    def watches(self, other: Epoll) -> bool:
        """Whether ``other`` is inside this one, at any depth."""
        return any(d is other or isinstance(d, Epoll) and d.watches(other) for d, _, _ in self.interest.values())
