"""Sockets (net/socket.c): the program runs without a network, as in a sandbox whose
seccomp filter allows no address family. socket and socketpair fail with
EAFNOSUPPORT whatever the family, type and protocol (the filter answers before the
kernel looks at them), which programs read as "no such network here" and go on
without one (glibc's name lookups, syslog, nscd)."""

from __future__ import annotations

from ..errno import EAFNOSUPPORT, SyscallError


def sys_no_family(k, uc, *_):
    raise SyscallError(EAFNOSUPPORT)


TABLE = {41: ("socket", sys_no_family), 53: ("socketpair", sys_no_family)}
