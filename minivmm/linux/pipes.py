"""Pipes (fs/pipe.c): a buffer of PIPE_SIZE bytes between the descriptions of its read
end and its write end. A read of an empty pipe waits while a writer exists (end of
file once none does); a write waits for room while a reader exists (EPIPE and SIGPIPE
once none does); O_NONBLOCK makes both EAGAIN instead. A write of at most PIPE_BUF
bytes is atomic. Waiting is the scheduler's (:class:`~minivmm.linux.threads.Block`):
the call is made again once the pipe is ready."""

from __future__ import annotations

import stat as st

from .errno import EAGAIN, EPIPE, SyscallError
from .files import O_WRONLY, OpenFile
from .threads import Block
from .vfs import MemoryNode

PIPE_SIZE = 65536             # the default pipe capacity (16 pages)
PIPE_BUF = 4096               # writes up to this size are atomic
O_NONBLOCK = 0o4000
FIFO = MemoryNode(st.S_IFIFO | 0o600, b"")


class Pipe:
    def __init__(self, capacity: int = PIPE_SIZE, on_free=None, inode: int = 0):
        self.inode = inode                                   # pipefs's: the VM's own count
        self.buffer = bytearray()
        self.readers = self.writers = 0
        self.capacity, self.on_free = capacity, on_free   # on_free(): both ends closed


class PipeEnd(OpenFile):
    seekable = False

    def __init__(self, pipe: Pipe, flags: int):
        super().__init__(f"pipe:[{pipe.inode}]", FIFO, flags)
        self.pipe = pipe
        self.writing = flags & O_WRONLY
        if self.writing:
            pipe.writers += 1
        else:
            pipe.readers += 1

    def readable(self) -> bool:
        """A read would not wait (poll's POLLIN, or POLLHUP once no writer is left)."""
        return bool(self.pipe.buffer) or not self.pipe.writers

    def writable(self) -> bool:
        return len(self.pipe.buffer) < self.pipe.capacity or not self.pipe.readers

    def read(self, count: int) -> bytes:
        pipe = self.pipe
        if not pipe.buffer:
            if not pipe.writers:
                return b""
            if self.flags & O_NONBLOCK:
                raise SyscallError(EAGAIN)
            raise Block(self.readable)
        data = bytes(pipe.buffer[:count])
        del pipe.buffer[:count]
        return data

    def pread(self, count, offset):
        return self.read(count)

    def write(self, data: bytes) -> int:
        pipe = self.pipe
        if not pipe.readers:
            raise SyscallError(EPIPE)
        room = pipe.capacity - len(pipe.buffer)
        if room < (len(data) if len(data) <= PIPE_BUF else 1):
            if self.flags & O_NONBLOCK:
                raise SyscallError(EAGAIN)
            raise Block(self.writable)
        pipe.buffer += data[:room]
        return min(len(data), room)

    def close(self) -> None:
        if self.writing:
            self.pipe.writers -= 1
        else:
            self.pipe.readers -= 1
        if not self.pipe.readers and not self.pipe.writers and self.pipe.on_free:
            self.pipe.on_free()
