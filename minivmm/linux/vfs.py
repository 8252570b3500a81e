"""The program's file system: nothing of the machine unless mounted (``--mount
HOST[:GUEST]``, read-only, like a bind mount), and minivmm's own /proc, /dev and /sys,
made from the VM, never the machine's: /proc/cpuinfo from the CPUID view, one CPU in
/sys, /dev/urandom from the seed.

Paths resolve as the kernel's namei does (fs/namei.c): component by component, "." and
"..", symbolic links followed in the program's namespace (at most 40), ENOENT, ENOTDIR
and ELOOP where Linux returns them."""

from __future__ import annotations

import os
import stat as st
from dataclasses import dataclass

from ..errors import MinivmmError
from .errno import ELOOP, ENAMETOOLONG, ENOENT, ENOTDIR, SyscallError

MAX_LINKS = 40                  # fs/namei.c MAXSYMLINKS
PATH_MAX = 4096
MAX_MOUNTS = 1000               # --mount options of one program
OWN = ("/proc", "/dev", "/sys")  # minivmm's, above any mount


@dataclass(frozen=True)
class Mount:
    host: str
    guest: str

    @classmethod
    def parse(cls, spec: str) -> Mount:
        """``HOST`` or ``HOST:GUEST`` (Docker's -v syntax); GUEST defaults to HOST."""
        host, _, guest = spec.partition(":")
        if not host:
            raise MinivmmError(f"--mount '{spec}': expected HOST[:GUEST], a path of this machine")
        host = os.path.abspath(os.path.expanduser(host))
        if not os.path.exists(host):
            raise MinivmmError(f"--mount '{spec}': {host} does not exist on this machine")
        guest = guest or host
        if not guest.startswith("/"):
            raise MinivmmError(f"--mount '{spec}': the program's path {guest} must be absolute")
        guest = os.path.normpath(guest).replace("//", "/")
        if len(guest) >= PATH_MAX:
            raise MinivmmError(f"--mount: the program's path {guest[:40]}... is longer than PATH_MAX ({PATH_MAX})")
        if any(guest == own or guest.startswith(own + "/") for own in OWN):
            raise MinivmmError(f"--mount '{spec}': {guest} is minivmm's own (made from the VM, not the machine)")
        return cls(host, guest)

    def __str__(self) -> str:
        """As --mount takes it."""
        return self.host if self.host == self.guest else f"{self.host}:{self.guest}"

    def host_path(self, path: str) -> str | None:
        """The machine's path this mount shows at the program's canonical ``path``, or
        None where it shows nothing."""
        top = self.guest.rstrip("/")
        if path != self.guest and not path.startswith(top + "/"):
            return None
        return self.host.rstrip("/") + path[len(top):] or "/"


# ---- nodes -----------------------------------------------------------------------------

@dataclass(frozen=True)
class HostNode:
    """A file or directory of the machine, seen through a mount."""
    host: str
    stat: os.stat_result

    @property
    def mode(self) -> int:
        return self.stat.st_mode


@dataclass(frozen=True)
class MemoryNode:
    """A synthesized file (``data`` is bytes, or a callable made at open time), a
    directory (``entries``: name -> node), a symbolic link (``target``: a path, or a
    callable that says it when the link is read), or a character device."""
    mode: int
    data: object = b""
    entries: dict | None = None
    target: object = ""
    device: str = ""            # null, zero, random

    def contents(self) -> bytes:
        return self.data() if callable(self.data) else self.data


def file(data) -> MemoryNode:
    return MemoryNode(st.S_IFREG | 0o444, data)


def directory(entries: dict) -> MemoryNode:
    return MemoryNode(st.S_IFDIR | 0o555, entries=entries)


def link(target) -> MemoryNode:
    return MemoryNode(st.S_IFLNK | 0o777, target=target)


def device(name: str) -> MemoryNode:
    return MemoryNode(st.S_IFCHR | 0o666, device=name)


def is_dir(node) -> bool:
    return st.S_ISDIR(node.mode)


class FileSystem:
    def __init__(self, mounts: list[Mount], own: dict[str, MemoryNode]):
        """``own``: the synthesized trees, by their top directory (/proc, /dev, /sys)."""
        self.mounts = sorted(mounts, key=lambda m: len(m.guest), reverse=True)
        self.own = own

    # -- one path, already free of links and dots -----------------------------------------

    def node_at(self, path: str):
        for top, tree in self.own.items():
            if path == top or path.startswith(top + "/"):
                node = tree
                for part in path[len(top):].split("/")[1:]:
                    if node.entries is None or part not in node.entries:
                        raise SyscallError(ENOENT if node.entries is not None else ENOTDIR)
                    node = node.entries[part]
                return node
        for mount in self.mounts:  # the longest mount point first
            host = mount.host_path(path)
            if host is not None:
                try:
                    return HostNode(host, os.lstat(host))
                except FileNotFoundError:
                    raise SyscallError(ENOENT) from None
                except NotADirectoryError:
                    raise SyscallError(ENOTDIR) from None
                except OSError as e:
                    raise SyscallError(e.errno or ENOENT) from None
        below = self._children(path)
        if below is None:
            raise SyscallError(ENOENT)
        return directory({name: None for name in below})  # a directory on the way to a mount

    def _children(self, path: str):
        """Names below ``path`` that lead to a mount point or minivmm's own trees."""
        prefix = path.rstrip("/") + "/"
        names = set()
        for point in [m.guest for m in self.mounts] + list(self.own):
            if point.startswith(prefix) and point != prefix.rstrip("/"):
                names.add(point[len(prefix):].split("/")[0])
        return sorted(names) if names or path == "/" else None

    def listing(self, path: str, node) -> list[tuple[str, object]]:
        """A directory's entries (name, node), in a stable order."""
        if isinstance(node, HostNode):
            try:
                names = sorted(os.listdir(node.host))
            except OSError as e:
                raise SyscallError(e.errno or ENOENT) from None
            out = []
            for name in names:
                try:
                    out.append((name, self.node_at(path.rstrip("/") + "/" + name)))
                except SyscallError:
                    continue
            return out
        if node.entries is not None and all(child is None for child in node.entries.values()):
            return [(name, self.node_at(path.rstrip("/") + "/" + name)) for name in node.entries]
        return list((node.entries or {}).items())

    # -- namei -----------------------------------------------------------------------------

    def resolve(self, path: str, cwd: str = "/", follow: bool = True) -> tuple[str, object]:
        """The program's ``path`` (relative to ``cwd``): its canonical form and node.
        ``follow`` decides for a link in the last component (O_NOFOLLOW, lstat)."""
        if len(path) >= PATH_MAX:
            raise SyscallError(ENAMETOOLONG)
        if not path:
            raise SyscallError(ENOENT)
        pending = [p for p in path.split("/") if p]
        current = "/" if path.startswith("/") else cwd
        node = self.node_at(current)
        links = 0
        while pending:
            part = pending.pop(0)
            if part == ".":
                continue
            if not is_dir(node):
                raise SyscallError(ENOTDIR)
            if part == "..":
                current = os.path.dirname(current.rstrip("/")) or "/"
                node = self.node_at(current)
                continue
            candidate = current.rstrip("/") + "/" + part
            if len(candidate) >= PATH_MAX:  # links may lengthen it: every path minivmm keeps fits PATH_MAX
                raise SyscallError(ENAMETOOLONG)
            child = self.node_at(candidate)
            if st.S_ISLNK(child.mode) and (pending or follow):
                links += 1
                if links > MAX_LINKS:
                    raise SyscallError(ELOOP)
                target = self.read_link(child)
                pending = [p for p in target.split("/") if p] + pending
                if target.startswith("/"):
                    current = "/"
                node = self.node_at(current)
                continue
            current, node = candidate, child
        return current, node

    @staticmethod
    def read_link(node) -> str:
        if isinstance(node, HostNode):
            try:
                return os.readlink(node.host)
            except OSError as e:
                raise SyscallError(e.errno or ENOENT) from None
        return node.target() if callable(node.target) else node.target
