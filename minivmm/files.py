"""Every file minivmm reads or writes goes through here.

Reading: only regular files (a FIFO would block forever, ``/dev/zero`` never ends, a
directory is no input), opened without blocking, checked before a byte is read, and
read up to a bound. Writing: to a temporary file beside the target, renamed into place
once complete, so an interrupted or failing write never leaves a truncated file and
never destroys the previous one.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from .errors import MinivmmError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CHUNK = 1 * MiB                 # what a file that grows while it is read is read by


def _describe(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_bytes(path: str | os.PathLike, what: str, limit: int) -> bytes:
    """The whole of a regular file of at most ``limit`` bytes; anything else is refused
    with one line naming ``what`` and the path."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise MinivmmError(f"cannot read {what} {path}: {e.strerror}") from None
    except ValueError:  # a NUL in the path
        raise MinivmmError(f"cannot read {what} {path!r}: the path contains a NUL byte") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
        os.close(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MinivmmError(f"cannot read {what} {path}: {_describe(info.st_mode)}, not a regular file")
        raise MinivmmError(f"{what} {path} is {info.st_size} bytes, more than the limit of {_size(limit)}")
    with os.fdopen(fd, "rb") as f:
        try:
            data = _read_up_to(f, info.st_size, limit + 1)
        except OSError as e:
            raise MinivmmError(f"cannot read {what} {path}: {e.strerror}") from None
        except MemoryError:
            raise MinivmmError(f"cannot read {what} {path}: its {info.st_size} bytes do not fit in memory") from None
    if len(data) > limit:  # it grew while we read
        raise MinivmmError(f"{what} {path} is more than the limit of {_size(limit)}")
    return data


def _read_up_to(f, size: int, most: int) -> bytes:
    """At most ``most`` bytes of ``f``: one read of its ``size`` (fstat's) and a byte more,
    then chunks only if it grew meanwhile. A read of ``most`` at once would allocate
    ``most`` (gigabytes for a snapshot's limit) whatever the file holds."""
    parts, got, step = [], 0, min(size + 1, most)
    while got < most:
        part = f.read(min(step, most - got))
        if not part:
            break
        parts.append(part)
        got += len(part)
        step = CHUNK
    return parts[0] if len(parts) == 1 else b"".join(parts)


def read_text(path: str | os.PathLike, what: str, limit: int) -> str:
    data = read_bytes(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MinivmmError(f"{path}: {what} is not UTF-8 text (byte {e.start})") from None


def _size(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


def is_regular_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # too long, a NUL, or not a path at all
        return False


# ---- output files ----------------------------------------------------------------------

def check_output(path: str | os.PathLike, what: str, inputs=()) -> Path:
    """Refuse, before anything runs, an output that cannot be written or that is one of
    the run's inputs (writing it would destroy the input)."""
    target = Path(path)
    if target.is_dir():
        raise MinivmmError(f"cannot write {what} {path}: it is a directory")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise MinivmmError(f"cannot write {what} {path}: no directory {parent}")
    if not os.access(parent, os.W_OK):
        raise MinivmmError(f"cannot write {what} {path}: directory {parent} is not writable")
    for source in inputs:
        with contextlib.suppress(OSError, ValueError):
            if target.exists() and os.path.samefile(target, source):
                raise MinivmmError(f"{what} {path} is also an input ({source}): refusing to overwrite it")
    return target


def write_atomically(path: str | os.PathLike, data: bytes | str, what: str) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it, renamed into place
    when complete: the old file survives any failure (disk full, ``ulimit -f``, a signal)."""
    target = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if target.exists():
            with contextlib.suppress(OSError):
                os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
        tmp = None
    except OSError as e:
        raise MinivmmError(f"cannot write {what} {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
