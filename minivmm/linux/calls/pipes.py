"""pipe and pipe2 (fs/pipe.c): the two ends as descriptors (:mod:`minivmm.linux.pipes`)."""

from __future__ import annotations

import struct

from ..errno import EINVAL, SyscallError
from ..files import O_CLOEXEC, O_WRONLY
from ..pipes import O_NONBLOCK, PipeEnd

O_DIRECT = 0o40000


def sys_pipe2(k, uc, fds, flags, *_):
    if flags & ~(O_CLOEXEC | O_NONBLOCK | O_DIRECT):
        raise SyscallError(EINVAL)
    pipe = k.machine.new_pipe()
    ends = PipeEnd(pipe, flags & O_NONBLOCK), PipeEnd(pipe, O_WRONLY | flags & O_NONBLOCK)
    numbers = [k.fds.add(end, cloexec=bool(flags & O_CLOEXEC)) for end in ends]
    try:
        k.p.write(fds, struct.pack("<ii", *numbers))
    except SyscallError:
        for fd in numbers:
            k.fds.close(fd)
        raise
    return 0


def sys_pipe(k, uc, fds, *_):
    return sys_pipe2(k, uc, fds, 0)


TABLE = {22: ("pipe", sys_pipe), 293: ("pipe2", sys_pipe2)}
