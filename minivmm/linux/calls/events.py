"""poll, ppoll, select, pselect6, eventfd, epoll (fs/select.c, fs/eventfd.c,
fs/eventpoll.c): readiness is :mod:`minivmm.linux.events`'; a call with nothing ready
waits through the scheduler until something is, or its time runs out (0 then)."""

from __future__ import annotations

import struct

from ..errno import EBADF, EEXIST, EINTR, EINVAL, ELOOP, ENOENT, EPERM, SyscallError
from ..events import MAX_EPOLL_DEPTH, POLLERR, POLLHUP, POLLIN, POLLNVAL, POLLOUT, POLLPRI, Epoll, EventFd, readiness
from ..files import O_CLOEXEC, Directory, HostFile
from ..pipes import O_NONBLOCK
from ..threads import Block
from .base import signed32
from .process import read_timespec

MAX_POLL = 1024               # descriptors one call watches (RLIMIT_NOFILE)
EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD = 1, 2, 3
EPOLL_EVENT = struct.Struct("<IQ")   # struct epoll_event is packed on x86-64


def _until(k, ms: int | None):
    """The time since boot a wait of ``ms`` milliseconds ends (None: never; 0: now)."""
    return None if ms is None or ms < 0 else k.clock.since_boot() + ms * 1_000_000


def _wait_or(k, ready_now: int, ready, until):
    """Return what is ready; with nothing ready, wait (0 once the time ran out)."""
    if ready_now or (until is not None and k.clock.since_boot() >= until):
        return ready_now
    raise Block(ready, until, finish=lambda how: 0 if how == "timeout" else -EINTR)


def _timespec_ms(k, address: int) -> int | None:
    return None if not address else -(-read_timespec(k, address) // 1_000_000)


def _poll(k, fds: int, count: int, ms: int | None):
    if count > MAX_POLL:
        raise SyscallError(EINVAL)
    asked = [struct.unpack("<ihh", k.p.read(fds + 8 * i, 8)) for i in range(count)]

    def answers():
        out = []
        for fd, events, _ in asked:
            entry = k.fds.table.get(fd) if fd >= 0 else None
            out.append(0 if fd < 0 else POLLNVAL if entry is None else
                       readiness(entry) & (events | POLLERR | POLLHUP))
        return out
    got = answers()
    until = _until(k, ms)
    ready = sum(1 for r in got if r)
    if ready or (until is not None and k.clock.since_boot() >= until):
        for i, revents in enumerate(got):
            k.p.write(fds + 8 * i + 6, struct.pack("<h", revents))
        return ready
    return _wait_or(k, 0, lambda: any(answers()), until)


def sys_poll(k, uc, fds, count, timeout, *_):
    return _poll(k, fds, count, signed32(timeout))


def sys_ppoll(k, uc, fds, count, timeout, sigmask, size, *_):
    return _poll(k, fds, count, _timespec_ms(k, timeout))


def _select(k, count: int, sets: tuple[int, int, int], ms: int | None):
    if count > MAX_POLL or count < 0:
        raise SyscallError(EINVAL)
    words = (count + 63) // 64
    asked = [int.from_bytes(k.p.read(s, 8 * words), "little") if s else 0 for s in sets]
    masks = (POLLIN | POLLHUP | POLLERR, POLLOUT | POLLERR, POLLPRI)

    def answers():
        out = [0, 0, 0]
        for fd in range(count):
            if not any(a >> fd & 1 for a in asked):
                continue
            entry = k.fds.table.get(fd)
            if entry is None:
                raise SyscallError(EBADF)
            state = readiness(entry)
            for i in range(3):
                if asked[i] >> fd & 1 and state & masks[i]:
                    out[i] |= 1 << fd
        return out
    got = answers()
    until = _until(k, ms)
    ready = sum(x.bit_count() for x in got)
    if ready or (until is not None and k.clock.since_boot() >= until):
        for address, value in zip(sets, got):
            if address:
                k.p.write(address, value.to_bytes(8 * words, "little"))
        return ready
    return _wait_or(k, 0, lambda: any(answers()), until)


def sys_select(k, uc, count, readfds, writefds, exceptfds, timeout, *_):
    ms = None
    if timeout:
        seconds, micros = struct.unpack("<qq", k.p.read(timeout, 16))
        if seconds < 0 or not 0 <= micros < 10**6:
            raise SyscallError(EINVAL)
        ms = seconds * 1000 + -(-micros // 1000)
    return _select(k, signed32(count), (readfds, writefds, exceptfds), ms)


def sys_pselect6(k, uc, count, readfds, writefds, exceptfds, timeout, *_):
    return _select(k, signed32(count), (readfds, writefds, exceptfds), _timespec_ms(k, timeout))


def sys_eventfd2(k, uc, value, flags, *_):
    if flags & ~(O_CLOEXEC | O_NONBLOCK | 1):
        raise SyscallError(EINVAL)
    return k.fds.add(EventFd(value & 0xFFFFFFFF, flags & (O_NONBLOCK | 1)), cloexec=bool(flags & O_CLOEXEC))


def sys_eventfd(k, uc, value, *_):
    return sys_eventfd2(k, uc, value, 0)


def sys_epoll_create1(k, uc, flags, *_):
    if flags & ~O_CLOEXEC:
        raise SyscallError(EINVAL)
    return k.fds.add(Epoll(0), cloexec=bool(flags & O_CLOEXEC))


def sys_epoll_create(k, uc, size, *_):
    if signed32(size) <= 0:
        raise SyscallError(EINVAL)
    return sys_epoll_create1(k, uc, 0)


def _epoll(k, fd: int) -> Epoll:
    entry = k.fds.get(fd)
    if not isinstance(entry, Epoll):
        raise SyscallError(EINVAL)
    return entry


def sys_epoll_ctl(k, uc, epfd, op, fd, event, *_):
    epoll, target = _epoll(k, epfd), k.fds.get(fd)
    if target is epoll or isinstance(target, (HostFile, Directory)):
        raise SyscallError(EINVAL if target is epoll else EPERM)   # regular files cannot be watched
    if op == EPOLL_CTL_DEL:
        if fd not in epoll.interest:
            raise SyscallError(ENOENT)
        del epoll.interest[fd]
        return 0
    events, data = EPOLL_EVENT.unpack(k.p.read(event, EPOLL_EVENT.size))
    if isinstance(target, Epoll) and op in (EPOLL_CTL_ADD, EPOLL_CTL_MOD) and (
            target.watches(epoll) or target.depth() + 1 > MAX_EPOLL_DEPTH):
        raise SyscallError(ELOOP)   # ep_loop_check: a loop of epolls, or too deep a nest
    if op == EPOLL_CTL_ADD:
        if fd in epoll.interest:
            raise SyscallError(EEXIST)
        epoll.interest[fd] = [target, events, data]
    elif op == EPOLL_CTL_MOD:
        if fd not in epoll.interest:
            raise SyscallError(ENOENT)
        epoll.interest[fd] = [target, events, data]
    else:
        raise SyscallError(EINVAL)
    return 0


def _epoll_wait(k, epfd: int, events: int, most: int, ms: int | None):
    epoll = _epoll(k, epfd)
    if most <= 0 or most > 1 << 20:
        raise SyscallError(EINVAL)
    ready = epoll.ready()[:most]
    until = _until(k, ms)
    if ready or (until is not None and k.clock.since_boot() >= until):
        k.p.write(events, b"".join(EPOLL_EVENT.pack(e & 0xFFFFFFFF, d) for e, d in ready))
        return len(ready)
    return _wait_or(k, 0, lambda: bool(epoll.readiness()), until)


def sys_epoll_wait(k, uc, epfd, events, most, timeout, *_):
    return _epoll_wait(k, epfd, events, signed32(most), signed32(timeout))


def sys_epoll_pwait(k, uc, epfd, events, most, timeout, sigmask, size, *_):
    return _epoll_wait(k, epfd, events, signed32(most), signed32(timeout))


def sys_epoll_pwait2(k, uc, epfd, events, most, timeout, sigmask, size, *_):
    return _epoll_wait(k, epfd, events, signed32(most), _timespec_ms(k, timeout))


TABLE = {
    7: ("poll", sys_poll), 23: ("select", sys_select), 213: ("epoll_create", sys_epoll_create),
    232: ("epoll_wait", sys_epoll_wait), 233: ("epoll_ctl", sys_epoll_ctl), 270: ("pselect6", sys_pselect6),
    271: ("ppoll", sys_ppoll), 281: ("epoll_pwait", sys_epoll_pwait), 284: ("eventfd", sys_eventfd),
    290: ("eventfd2", sys_eventfd2), 291: ("epoll_create1", sys_epoll_create1), 441: ("epoll_pwait2", sys_epoll_pwait2),
}
