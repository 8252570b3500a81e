"""File system calls over the program's read-only file system (fs/open.c,
fs/read_write.c, fs/stat.c, fs/readdir.c, fs/fcntl.c): what a bind mount mounted
read-only answers, EROFS for anything that would change it."""

from __future__ import annotations

import ctypes
import os
import shutil
import stat as st
import struct

from ..errno import (EACCES, EBADF, EINVAL, EIO, EISDIR, ELOOP, ENOENT, ENOTDIR, ENOTTY, ENXIO, ERANGE, EROFS,
                     SyscallError)
from ..files import (MAX_IO, O_ACCMODE, O_CLOEXEC, O_CREAT, O_DIRECTORY, O_NOFOLLOW, O_PATH, O_TRUNC, O_WRONLY,
                     Device, Directory, HostFile, MemoryFile, OpenFile, Stream, pack_stat, pack_statx, stat_of)
from ..vfs import HostNode, is_dir
from .base import signed, signed32

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW, AT_EMPTY_PATH = 0x100, 0x1000
W_OK, X_OK = 2, 1
MAX_READ = 64 << 20             # one read moves at most this much (a short read, as Linux may give)


# ---- paths ---------------------------------------------------------------------------------

def _path(k, address: int) -> str:
    return k.p.read_string(address).decode("utf-8", "surrogateescape")


def _base(k, dirfd: int, path: str) -> str:
    """Where a relative path starts: the working directory, or the directory ``dirfd``."""
    dirfd = signed32(dirfd)
    if path.startswith("/") or dirfd == AT_FDCWD:
        return k.cwd
    entry = k.fds.get(dirfd)
    if not is_dir(entry.node):
        raise SyscallError(ENOTDIR)
    return entry.path


def _lookup(k, dirfd: int, address: int, follow: bool = True, empty_ok: bool = False):
    """(canonical path, node), or the open file itself for AT_EMPTY_PATH."""
    path = _path(k, address)
    if not path and empty_ok:
        return None, k.fds.get(signed32(dirfd))
    return k.fs.resolve(path, _base(k, dirfd, path), follow)


def open_node(k, path: str, node, flags: int) -> OpenFile:
    if flags & O_PATH:
        return OpenFile(path, node, flags)
    if isinstance(node, HostNode):
        if is_dir(node):
            return Directory(path, node, flags, k.fs.listing(path, node))
        if not st.S_ISREG(node.mode):
            raise SyscallError(EACCES)  # the machine's FIFOs, sockets and devices stay closed
        try:
            return HostFile(path, node, flags)
        except PermissionError:
            raise SyscallError(EACCES) from None
        except OSError as e:
            raise SyscallError(e.errno or EACCES) from None
    if is_dir(node):
        return Directory(path, node, flags, k.fs.listing(path, node))
    if st.S_ISCHR(node.mode):
        if node.device == "tty":
            raise SyscallError(ENXIO)  # no controlling terminal
        return Device(path, node, flags, k.random)
    return MemoryFile(path, node, flags)


def sys_openat(k, uc, dirfd, path_at, flags, mode=0, *_):
    path = _path(k, path_at)
    writing = flags & O_ACCMODE != 0 or flags & (O_CREAT | O_TRUNC)
    try:
        canonical, node = k.fs.resolve(path, _base(k, dirfd, path), not flags & O_NOFOLLOW)
    except SyscallError as e:
        raise SyscallError(EROFS if e.errno == ENOENT and flags & O_CREAT else e.errno) from None
    if st.S_ISLNK(node.mode) and not flags & O_PATH:
        raise SyscallError(ELOOP)
    if flags & O_DIRECTORY and not is_dir(node):
        raise SyscallError(ENOTDIR)
    if writing and not st.S_ISCHR(node.mode):
        raise SyscallError(EISDIR if is_dir(node) else EROFS)
    return k.fds.add(open_node(k, canonical, node, flags), cloexec=bool(flags & O_CLOEXEC))


def sys_open(k, uc, path_at, flags, mode, *_):
    return sys_openat(k, uc, AT_FDCWD, path_at, flags, mode)


def sys_creat(k, uc, path_at, mode, *_):
    return sys_openat(k, uc, AT_FDCWD, path_at, O_CREAT | O_WRONLY | O_TRUNC, mode)


def sys_close(k, uc, fd, *_):
    k.fds.close(fd)
    return 0


# ---- reading and writing -------------------------------------------------------------------

def _readable(k, fd) -> OpenFile:
    entry = k.fds.get(fd)
    if entry.flags & O_ACCMODE == O_WRONLY or entry.flags & O_PATH:
        raise SyscallError(EBADF)
    if isinstance(entry, Directory):
        raise SyscallError(EISDIR)
    return entry


def _writable(k, fd) -> OpenFile:
    entry = k.fds.get(fd)
    if entry.flags & O_ACCMODE == 0 and not isinstance(entry, (Stream, Device)):
        raise SyscallError(EBADF)
    return entry


def sys_read(k, uc, fd, buf, count, *_):
    data = _readable(k, fd).read(min(count, MAX_READ))
    k.p.write(buf, data)
    return len(data)


def sys_pread64(k, uc, fd, buf, count, offset, *_):
    k.fds.seekable(fd)
    if signed(offset) < 0:
        raise SyscallError(EINVAL)
    data = _readable(k, fd).pread(min(count, MAX_READ), offset)
    k.p.write(buf, data)
    return len(data)


def _iovecs(k, iov, count) -> list[tuple[int, int]]:
    if not 0 <= count <= 1024:  # UIO_MAXIOV
        raise SyscallError(EINVAL)
    return [struct.unpack("<QQ", k.p.read(iov + 16 * i, 16)) for i in range(count)]


def sys_readv(k, uc, fd, iov, count, *_):
    entry, total = _readable(k, fd), 0
    for base, length in _iovecs(k, iov, count):
        data = entry.read(min(length, MAX_READ))
        k.p.write(base, data)
        total += len(data)
        if len(data) < length:
            break
    return total


def sys_write(k, uc, fd, buf, count, *_):
    return _writable(k, fd).write(k.p.read(buf, min(count, MAX_IO)))


def sys_writev(k, uc, fd, iov, count, *_):
    entry = _writable(k, fd)
    return entry.write(b"".join(k.p.read(base, length) for base, length in _iovecs(k, iov, count)))


def sys_lseek(k, uc, fd, offset, whence, *_):
    entry = k.fds.seekable(fd)
    offset = signed(offset)
    size = entry.size()
    if whence == 3:    # SEEK_DATA: a file without holes is data up to its end
        if offset >= size:
            raise SyscallError(ENXIO)
        base, offset = offset, 0
    elif whence == 4:  # SEEK_HOLE: the end
        if offset >= size:
            raise SyscallError(ENXIO)
        base, offset = size, 0
    else:
        base = {0: 0, 1: entry.offset, 2: size}.get(whence)
    if base is None or base + offset < 0:
        raise SyscallError(EINVAL)
    entry.offset = base + offset
    return entry.offset


# ---- what files are ------------------------------------------------------------------------

def _stat_of(k, dirfd, path_at, flags) -> dict:
    target = _lookup(k, dirfd, path_at, not flags & AT_SYMLINK_NOFOLLOW, bool(flags & AT_EMPTY_PATH))
    if isinstance(target, tuple) and target[0] is None:
        return target[1].stat()
    path, node = target
    return stat_of(node, path)


def sys_fstat(k, uc, fd, buf, *_):
    k.p.write(buf, pack_stat(k.fds.get(fd).stat()))
    return 0


def sys_stat(k, uc, path_at, buf, *_):
    k.p.write(buf, pack_stat(_stat_of(k, AT_FDCWD, path_at, 0)))
    return 0


def sys_lstat(k, uc, path_at, buf, *_):
    k.p.write(buf, pack_stat(_stat_of(k, AT_FDCWD, path_at, AT_SYMLINK_NOFOLLOW)))
    return 0


def sys_newfstatat(k, uc, dirfd, path_at, buf, flags, *_):
    k.p.write(buf, pack_stat(_stat_of(k, dirfd, path_at, flags)))
    return 0


def sys_statx(k, uc, dirfd, path_at, flags, mask, buf, *_):
    k.p.write(buf, pack_statx(_stat_of(k, dirfd, path_at, flags)))
    return 0


# struct statfs (include/uapi/asm-generic/statfs.h on x86-64): f_type, f_bsize, f_blocks,
# f_bfree, f_bavail, f_files, f_ffree, f_fsid, f_namelen, f_frsize, f_flags, f_spare[4]
STATFS = struct.Struct("<7q2i3q4q")
PROC_SUPER_MAGIC, SYSFS_MAGIC, TMPFS_MAGIC = 0x9FA0, 0x62656572, 0x01021994    # include/uapi/linux/magic.h
DEVPTS_SUPER_MAGIC, PIPEFS_MAGIC = 0x1CD1, 0x50495045
# the file system of minivmm's own trees (/dev is devtmpfs, which says TMPFS_MAGIC), and
# of the directories on the way to a mount point
MAGIC = {"/proc": PROC_SUPER_MAGIC, "/dev": TMPFS_MAGIC, "/sys": SYSFS_MAGIC}
ST_RDONLY, ST_VALID, ST_RELATIME = 0x1, 0x20, 0x1000    # f_flags (fs/statfs.c calculate_f_flags)
OWN_DEVICE = 0x16                                        # st_dev of minivmm's own files (files.stat_of)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.statfs.argtypes = (ctypes.c_char_p, ctypes.c_void_p)
_libc.fstatfs.argtypes = (ctypes.c_int, ctypes.c_void_p)


def _machine_statfs(call, target) -> bytes:
    """The machine's own statfs of a mounted file, read-only as every mount is."""
    buf = ctypes.create_string_buffer(STATFS.size)
    if call(target, buf) != 0:
        raise SyscallError(ctypes.get_errno() or EIO)
    fields = list(STATFS.unpack(buf.raw))
    fields[11] |= ST_RDONLY
    return STATFS.pack(*fields)


def _statfs(k, path: str, node, entry: OpenFile | None = None) -> bytes:
    """What statfs says of a file: for the machine's, the machine's file system; for
    minivmm's own, procfs, sysfs or devtmpfs as Linux mounts them, read-only; the
    standard streams are a terminal's (devpts) or a pipe's."""
    if isinstance(entry, HostFile):
        return _machine_statfs(_libc.fstatfs, entry.fd)
    if isinstance(node, HostNode):
        return _machine_statfs(_libc.statfs, os.fsencode(node.host))
    if isinstance(entry, Stream):
        magic = DEVPTS_SUPER_MAGIC if k.terminal else PIPEFS_MAGIC
    else:
        magic = next((m for top, m in MAGIC.items() if path == top or path.startswith(top + "/")), TMPFS_MAGIC)
    return STATFS.pack(magic, 4096, 0, 0, 0, 0, 0, OWN_DEVICE, 0, 255, 4096, ST_RDONLY | ST_VALID | ST_RELATIME,
                       0, 0, 0, 0)


def sys_statfs(k, uc, path_at, buf, *_):
    path, node = _lookup(k, AT_FDCWD, path_at)
    k.p.write(buf, _statfs(k, path, node))
    return 0


def sys_fstatfs(k, uc, fd, buf, *_):
    entry = k.fds.get(fd)
    k.p.write(buf, _statfs(k, entry.path, entry.node, entry))
    return 0


def sys_faccessat2(k, uc, dirfd, path_at, mode, flags=0, *_):
    _, node = _lookup(k, dirfd, path_at, not flags & AT_SYMLINK_NOFOLLOW)
    if mode & W_OK and not st.S_ISCHR(node.mode):
        raise SyscallError(EROFS)
    if mode & X_OK and not node.mode & 0o111:
        raise SyscallError(EACCES)
    return 0


def sys_access(k, uc, path_at, mode, *_):
    return sys_faccessat2(k, uc, AT_FDCWD, path_at, mode)


def sys_faccessat(k, uc, dirfd, path_at, mode, *_):
    return sys_faccessat2(k, uc, dirfd, path_at, mode)


def sys_readlinkat(k, uc, dirfd, path_at, buf, size, *_):
    if signed32(size) <= 0:
        raise SyscallError(EINVAL)
    _, node = _lookup(k, dirfd, path_at, follow=False)
    if not st.S_ISLNK(node.mode):
        raise SyscallError(EINVAL)
    target = k.fs.read_link(node).encode("utf-8", "surrogateescape")[:size]
    k.p.write(buf, target)
    return len(target)


def sys_readlink(k, uc, path_at, buf, size, *_):
    return sys_readlinkat(k, uc, AT_FDCWD, path_at, buf, size)


def sys_getdents64(k, uc, fd, buf, count, *_):
    entry = k.fds.get(fd)
    if not isinstance(entry, Directory):
        raise SyscallError(ENOTDIR)
    data = entry.dirents(min(count, MAX_READ))
    if not data and entry.offset < len(entry.entries):
        raise SyscallError(EINVAL)  # the buffer holds not even one entry
    k.p.write(buf, data)
    return len(data)


# ---- descriptors ---------------------------------------------------------------------------

F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_GETLK, F_SETLK, F_SETLKW = 0, 1, 2, 3, 4, 5, 6, 7
F_DUPFD_CLOEXEC, FD_CLOEXEC = 1030, 1
O_LARGEFILE = 0o100000


def sys_fcntl(k, uc, fd, command, argument, *_):
    entry = k.fds.get(fd)
    if command in (F_DUPFD, F_DUPFD_CLOEXEC):
        return k.fds.add(entry, lowest=signed32(argument), cloexec=command == F_DUPFD_CLOEXEC)
    if command == F_GETFD:
        return FD_CLOEXEC if fd in k.fds.cloexec else 0
    if command == F_SETFD:
        (k.fds.cloexec.add if argument & FD_CLOEXEC else k.fds.cloexec.discard)(fd)
        return 0
    if command == F_GETFL:
        return entry.flags & ~O_CLOEXEC | O_LARGEFILE
    if command == F_SETFL:
        entry.flags = entry.flags & ~0o6000 | argument & 0o6000  # O_APPEND, O_NONBLOCK
        return 0
    if command in (F_GETLK, F_SETLK, F_SETLKW):
        return 0  # no other process holds a lock
    raise SyscallError(EINVAL)


def sys_dup(k, uc, fd, *_):
    return k.fds.add(k.fds.get(fd))


def sys_dup3(k, uc, old, new, flags, *_):
    entry = k.fds.get(old)
    if old == new or flags & ~O_CLOEXEC or not 0 <= signed32(new) < 1024:
        raise SyscallError(EINVAL if old == new or flags & ~O_CLOEXEC else EBADF)
    k.fds.put(new, entry)
    if flags & O_CLOEXEC:
        k.fds.cloexec.add(new)
    return new


def sys_dup2(k, uc, old, new, *_):
    if old == new:
        k.fds.get(old)
        return new
    return sys_dup3(k, uc, old, new, 0)


CLOSE_RANGE_UNSHARE, CLOSE_RANGE_CLOEXEC = 0x2, 0x4


def sys_close_range(k, uc, first, last, flags, *_):
    """Close, or mark close-on-exec, the open descriptors from ``first`` to ``last``
    (fs/open.c, fs/file.c __close_range; unsigned ints). CLOSE_RANGE_UNSHARE unshares a
    table no other process shares here."""
    first, last, flags = first & 0xFFFFFFFF, last & 0xFFFFFFFF, flags & 0xFFFFFFFF
    if flags & ~(CLOSE_RANGE_UNSHARE | CLOSE_RANGE_CLOEXEC) or first > last:
        raise SyscallError(EINVAL)
    for fd in sorted(fd for fd in k.fds.table if first <= fd <= last):
        if flags & CLOSE_RANGE_CLOEXEC:
            k.fds.cloexec.add(fd)
        else:
            k.fds.close(fd)
    return 0


def sys_getcwd(k, uc, buf, size, *_):
    path = k.cwd.encode() + b"\0"
    if size < len(path):
        raise SyscallError(ERANGE)
    k.p.write(buf, path)
    return len(path)


def sys_chdir(k, uc, path_at, *_):
    path, node = _lookup(k, AT_FDCWD, path_at)
    if not is_dir(node):
        raise SyscallError(ENOTDIR)
    k.cwd = path
    return 0


def sys_fchdir(k, uc, fd, *_):
    entry = k.fds.get(fd)
    if not is_dir(entry.node):
        raise SyscallError(ENOTDIR)
    k.cwd = entry.path
    return 0


TCGETS, TIOCGPGRP, TIOCGWINSZ = 0x5401, 0x540F, 0x5413
# struct termios as the kernel's TCGETS fills it (c_iflag ICRNL|IXON, c_oflag OPOST|ONLCR,
# c_cflag B38400|CS8|CREAD, c_lflag ISIG|ICANON|ECHO|ECHOE|ECHOK|ECHOCTL|ECHOKE|IEXTEN; tty_std_termios)
TERMIOS = struct.pack("<IIIIB19B", 0x500, 0x5, 0xBF, 0x8A3B, 0,
                      3, 28, 127, 21, 4, 0, 1, 0, 17, 19, 26, 0, 18, 15, 23, 22, 0, 0, 0)


def sys_ioctl(k, uc, fd, request, argument, *_):
    entry = k.fds.get(fd)
    if not (isinstance(entry, Stream) and k.terminal):
        raise SyscallError(ENOTTY)  # TCGETS, TIOCGWINSZ ...: a terminal only when the run's is one
    if request == TCGETS:
        k.p.write(argument, TERMIOS)
    elif request == TIOCGWINSZ:
        columns, rows = shutil.get_terminal_size()
        k.p.write(argument, struct.pack("<HHHH", rows, columns, 0, 0))
    elif request == TIOCGPGRP:
        k.p.write(argument, struct.pack("<i", k.p.tid))
    else:
        raise SyscallError(EINVAL)
    return 0


def sys_umask(k, uc, mask, *_):
    old, k.umask = k.umask, mask & 0o777
    return old


def sys_erofs(k, uc, *_):
    raise SyscallError(EROFS)  # every change to a read-only file system


TABLE = {
    0: ("read", sys_read), 1: ("write", sys_write), 2: ("open", sys_open), 3: ("close", sys_close),
    4: ("stat", sys_stat), 5: ("fstat", sys_fstat), 6: ("lstat", sys_lstat),
    8: ("lseek", sys_lseek), 16: ("ioctl", sys_ioctl), 17: ("pread64", sys_pread64), 19: ("readv", sys_readv),
    20: ("writev", sys_writev), 21: ("access", sys_access), 32: ("dup", sys_dup), 33: ("dup2", sys_dup2),
    72: ("fcntl", sys_fcntl), 79: ("getcwd", sys_getcwd), 80: ("chdir", sys_chdir),
    81: ("fchdir", sys_fchdir), 85: ("creat", sys_creat), 89: ("readlink", sys_readlink), 95: ("umask", sys_umask),
    217: ("getdents64", sys_getdents64), 257: ("openat", sys_openat), 262: ("newfstatat", sys_newfstatat),
    267: ("readlinkat", sys_readlinkat), 269: ("faccessat", sys_faccessat),
    292: ("dup3", sys_dup3), 332: ("statx", sys_statx), 439: ("faccessat2", sys_faccessat2),
    137: ("statfs", sys_statfs), 138: ("fstatfs", sys_fstatfs), 436: ("close_range", sys_close_range),
    **{number: (name, sys_erofs) for number, name in (
        (76, "truncate"), (77, "ftruncate"), (82, "rename"), (83, "mkdir"), (84, "rmdir"), (86, "link"),
        (87, "unlink"), (88, "symlink"), (90, "chmod"), (91, "fchmod"), (92, "chown"), (93, "fchown"),
        (94, "lchown"), (133, "mknod"), (258, "mkdirat"), (259, "mknodat"), (260, "fchownat"),
        (263, "unlinkat"), (264, "renameat"), (265, "linkat"), (266, "symlinkat"), (268, "fchmodat"),
        (280, "utimensat"), (316, "renameat2"))},
}
