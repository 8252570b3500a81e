"""Open file descriptions and the descriptor table (include/linux/fdtable.h): what a
descriptor refers to, its offset (shared by dup), and ``struct stat``/``statx``/
``linux_dirent64`` as x86-64 Linux lays them out."""

from __future__ import annotations

import os
import stat as st
import struct
import zlib
from collections import Counter

from .errno import EBADF, EINVAL, EISDIR, EMFILE, ESPIPE, SyscallError
from .vfs import HostNode, MemoryNode, is_dir

O_ACCMODE, O_WRONLY, O_RDWR, O_CREAT, O_TRUNC, O_APPEND = 3, 1, 2, 0o100, 0o1000, 0o2000
O_DIRECTORY, O_NOFOLLOW, O_CLOEXEC, O_PATH = 0o200000, 0o400000, 0o2000000, 0o10000000
MAX_FDS = 1024                  # RLIMIT_NOFILE's soft default
MAX_IO = 0x7FFFF000             # MAX_RW_COUNT: what one read or write moves at most


# ---- what stat says ------------------------------------------------------------------------

def stat_of(node, ino_hint: str = "") -> dict:
    """The fields of struct stat for a node (the machine's own for a host file)."""
    if isinstance(node, HostNode):
        s = node.stat
        return {"dev": s.st_dev, "ino": s.st_ino, "mode": s.st_mode, "nlink": s.st_nlink, "uid": s.st_uid,
                "gid": s.st_gid, "rdev": s.st_rdev, "size": s.st_size, "blksize": s.st_blksize,
                "blocks": s.st_blocks, "atime": s.st_atime_ns, "mtime": s.st_mtime_ns, "ctime": s.st_ctime_ns}
    size = len(node.contents()) if st.S_ISREG(node.mode) and not callable(node.data) else 0
    rdev = {"null": 0x103, "zero": 0x105, "random": 0x108, "urandom": 0x109}.get(node.device, 0)
    return {"dev": 0x16, "ino": zlib.crc32(ino_hint.encode()) or 1, "mode": node.mode,
            "nlink": 2 if is_dir(node) else 1, "uid": 0, "gid": 0, "rdev": rdev, "size": size,
            "blksize": 1024, "blocks": 0, "atime": 0, "mtime": 0, "ctime": 0}


def pack_stat(s: dict) -> bytes:
    """struct stat (arch/x86/include/uapi/asm/stat.h): 144 bytes."""
    times = []
    for key in ("atime", "mtime", "ctime"):
        times += [s[key] // 10**9, s[key] % 10**9]
    return struct.pack("<QQQIIIIQqqq6q3q", s["dev"], s["ino"], s["nlink"], s["mode"], s["uid"], s["gid"], 0,
                       s["rdev"], s["size"], s["blksize"], s["blocks"], *times, 0, 0, 0)


STATX_BASIC_STATS = 0x7FF


def pack_statx(s: dict) -> bytes:
    """struct statx (include/uapi/linux/stat.h): 256 bytes."""
    def ts(ns):
        return struct.pack("<qI4x", ns // 10**9, ns % 10**9)
    head = struct.pack("<IIQIIIHHQQQQ", STATX_BASIC_STATS, s["blksize"], 0, s["nlink"], s["uid"], s["gid"],
                       s["mode"] & 0xFFFF, 0, s["ino"], s["size"], s["blocks"], 0)
    times = ts(s["atime"]) + ts(s["ctime"]) + ts(s["ctime"]) + ts(s["mtime"])
    devices = struct.pack("<IIII", os.major(s["rdev"]), os.minor(s["rdev"]), os.major(s["dev"]), os.minor(s["dev"]))
    return (head + times + devices).ljust(256, b"\0")


DT = {st.S_IFREG: 8, st.S_IFDIR: 4, st.S_IFLNK: 10, st.S_IFCHR: 2, st.S_IFBLK: 6, st.S_IFIFO: 1, st.S_IFSOCK: 12}


def dirent64(ino: int, offset: int, mode: int, name: bytes) -> bytes:
    """struct linux_dirent64: ino, off, reclen, type, name, padded to 8 bytes."""
    size = (19 + len(name) + 1 + 7) & ~7
    return struct.pack("<QqHB", ino, offset, size, DT.get(st.S_IFMT(mode), 0)) + name + bytes(size - 19 - len(name))


# ---- open file descriptions ----------------------------------------------------------------

class OpenFile:
    """An open file description: shared by the descriptors dup() and fork() made of it,
    which ``refs`` counts (the description closes with the last)."""
    seekable = True
    refs = 0

    def __init__(self, path: str, node, flags: int):
        self.path, self.node, self.flags, self.offset = path, node, flags, 0

    def size(self) -> int:
        return 0

    def pread(self, count: int, offset: int) -> bytes:
        raise SyscallError(EINVAL)

    def read(self, count: int) -> bytes:
        data = self.pread(count, self.offset)
        self.offset += len(data)
        return data

    def write(self, data: bytes) -> int:
        raise SyscallError(EBADF)

    def stat(self) -> dict:
        return stat_of(self.node, self.path)

    def close(self) -> None:
        pass

    def state(self) -> dict:
        """What a snapshot keeps to open it again."""
        return {"path": self.path, "flags": self.flags, "offset": self.offset}


IDENTITY = ("size", "mtime_ns", "ino", "ctime_ns")


def identity(s: os.stat_result) -> dict:
    """What makes a file of the machine the same file later. Its inode and change time:
    the kernel sets st_ctime on every change of content, size or times, and no user can
    set it back (utimensat sets atime and mtime only), so a file rewritten with its size
    and mtime restored still differs. Comparing content instead would read every open
    file whole at each snapshot and resume (libraries, large data files); the price of
    ctime is refusing a file that was only chmod-ed, or copied back byte for byte."""
    return dict(zip(IDENTITY, (s.st_size, s.st_mtime_ns, s.st_ino, s.st_ctime_ns)))


class HostFile(OpenFile):
    """A regular file of the machine, read where it lies (never copied whole)."""

    def __init__(self, path: str, node: HostNode, flags: int):
        super().__init__(path, node, flags)
        self.fd = os.open(node.host, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        now = os.fstat(self.fd)
        if not st.S_ISREG(now.st_mode):  # replaced since it was looked up
            os.close(self.fd)
            raise SyscallError(EINVAL)
        self.identity = identity(now)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def pread(self, count: int, offset: int) -> bytes:
        return os.pread(self.fd, min(count, MAX_IO), offset)

    def preadinto(self, buffer, offset: int) -> int:
        """Read straight into guest RAM (``buffer`` a slice of it)."""
        return os.preadv(self.fd, [buffer], offset)

    def stat(self) -> dict:
        return stat_of(HostNode(self.node.host, os.fstat(self.fd)))

    def close(self) -> None:
        os.close(self.fd)

    def state(self) -> dict:
        return {**super().state(), "host": self.node.host, **self.identity}


class MemoryFile(OpenFile):
    """A synthesized file: its contents are made when it is opened, as procfs does."""

    def __init__(self, path: str, node: MemoryNode, flags: int):
        super().__init__(path, node, flags)
        self.data = node.contents()

    def size(self) -> int:
        return len(self.data)

    def pread(self, count: int, offset: int) -> bytes:
        return self.data[offset:offset + count]

    def stat(self) -> dict:
        return {**super().stat(), "size": len(self.data) if not self.path.startswith("/proc/") else 0}

    def state(self) -> dict:
        return {**super().state(), "crc": zlib.crc32(self.data)}


class Directory(OpenFile):
    """An open directory: getdents64 walks its entries (".", "..", then by name)."""
    seekable = True

    def __init__(self, path: str, node, flags: int, entries: list[tuple[str, object]]):
        super().__init__(path, node, flags)
        self.entries = [(".", node), ("..", node)] + entries

    def pread(self, count, offset):
        raise SyscallError(EISDIR)

    def dirents(self, room: int) -> bytes:
        out = b""
        while self.offset < len(self.entries):
            name, child = self.entries[self.offset]
            record = dirent64(stat_of(child, self.path + "/" + name)["ino"], self.offset + 1, child.mode,
                              name.encode("utf-8", "surrogateescape"))
            if len(out) + len(record) > room:
                break
            out += record
            self.offset += 1
        return out


class Device(OpenFile):
    """/dev/null, /dev/zero, /dev/random and /dev/urandom (the seeded generator)."""
    seekable = False

    def __init__(self, path: str, node: MemoryNode, flags: int, random):
        super().__init__(path, node, flags)
        self.random = random

    def pread(self, count, offset):
        kind = self.node.device
        if kind == "null":
            return b""
        count = min(count, 1 << 20)
        return bytes(count) if kind == "zero" else self.random.randbytes(count)

    def write(self, data: bytes) -> int:
        return len(data)


class Stream(OpenFile):
    """Standard input, output or error: the run's input, console and stderr."""
    seekable = False

    def __init__(self, path: str, node: MemoryNode, flags: int, sink=None, source=None):
        super().__init__(path, node, flags)
        self.sink, self.source = sink, source

    def pread(self, count, offset):
        if self.source is None:
            raise SyscallError(EBADF)
        return self.source(min(count, MAX_IO))

    def write(self, data: bytes) -> int:
        if self.sink is None:
            raise SyscallError(EBADF)
        self.sink(data)
        return len(data)


def recount(tables: list[Descriptors]) -> None:
    """Each description held by every descriptor of the VM's processes that refers to
    it (after the tables were built whole, as a resume builds them)."""
    held = Counter(id(entry) for fds in tables for entry in fds.table.values())
    for fds in tables:
        for entry in fds.table.values():
            entry.refs = held[id(entry)]


class Descriptors:
    """fd -> open file description, and the close-on-exec flags."""

    def __init__(self):
        self.table: dict[int, OpenFile] = {}
        self.cloexec: set[int] = set()

    def copy(self) -> Descriptors:
        """fork's copy (dup_fd): the same descriptions, each held once more."""
        other = Descriptors()
        other.table, other.cloexec = dict(self.table), set(self.cloexec)
        for entry in other.table.values():
            entry.refs += 1
        return other

    def release(self, entry: OpenFile) -> None:
        entry.refs -= 1
        if entry.refs <= 0:
            entry.close()

    def close_all(self) -> None:
        """The process ended: every descriptor closes (exit_files)."""
        for fd in list(self.table):
            self.close(fd)

    def get(self, fd: int) -> OpenFile:
        entry = self.table.get(fd)
        if entry is None:
            raise SyscallError(EBADF)
        return entry

    def add(self, entry: OpenFile, lowest: int = 0, cloexec: bool = False) -> int:
        fd = lowest
        while fd in self.table:
            fd += 1
        if fd >= MAX_FDS:
            raise SyscallError(EMFILE)
        self.table[fd] = entry
        entry.refs += 1
        self.cloexec.discard(fd)
        if cloexec:
            self.cloexec.add(fd)
        return fd

    def put(self, fd: int, entry: OpenFile) -> None:
        """dup2: ``fd`` now refers to ``entry`` (whatever it was is closed)."""
        old = self.table.get(fd)
        self.table[fd] = entry
        entry.refs += 1
        self.cloexec.discard(fd)
        if old is not None:
            self.release(old)

    def close(self, fd: int) -> None:
        entry = self.table.pop(self.get(fd) and fd)
        self.cloexec.discard(fd)
        self.release(entry)

    def seekable(self, fd: int) -> OpenFile:
        entry = self.get(fd)
        if not entry.seekable:
            raise SyscallError(ESPIPE)
        return entry
