"""Open file descriptions in a snapshot. A file of the machine is kept by its path,
offset and identity, and opened again at a resume (refused if it changed); what exists
only in the VM is kept whole: a synthesized file's contents, a pipe with its buffered
bytes, an eventfd's counter, an epoll's interest list. A description that fork or
dup shares is one description: numbered once over the whole VM (``id``), it is made
once at a resume and shared again, its offset with it."""

from __future__ import annotations

import base64

from ..errors import MinivmmError, NotCarried
from .calls.files import open_node
from .errno import SyscallError
from .events import COUNTER_MAX, Epoll, EventFd
from .files import IDENTITY, MAX_FDS, O_NOFOLLOW, MemoryFile, OpenFile
from .pipes import PIPE_BUF, PIPE_SIZE, PipeEnd

STREAMS = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}
KINDS = ("HostFile", "MemoryFile", "Directory", "Device", "Stream", "OpenFile", "PipeEnd", "EventFd", "Epoll")
MAX_DESCRIPTIONS = 1 << 20      # numbers of descriptions (MAX_FDS in each of the VM's processes, and more)


def b64(data: bytes) -> str:
    return base64.b64encode(bytes(data)).decode()


class Numbering:
    """A snapshot's numbers for the VM's open file descriptions and pipes, each given
    once, in the order the processes' descriptors meet them."""

    def __init__(self):
        self.descriptions: dict[int, tuple[int, OpenFile]] = {}
        self.pipes: dict[int, tuple[int, object]] = {}
        self.epolls: list[tuple[Epoll, dict]] = []

    def number(self, entry: OpenFile) -> int:
        return self.descriptions.setdefault(id(entry), (len(self.descriptions), entry))[0]

    def pipe(self, pipe) -> int:
        return self.pipes.setdefault(id(pipe), (len(self.pipes), pipe))[0]

    def record(self, fd: int, entry: OpenFile) -> dict:
        """What a resume makes the description again from."""
        if type(entry).__name__ not in KINDS:
            raise NotCarried(f"fd {fd} is {entry.path}, which a snapshot cannot carry")
        record = {**entry.state(), "kind": type(entry).__name__, "id": self.number(entry)}
        if isinstance(entry, MemoryFile):
            record["data"] = b64(entry.data)  # as it was opened (/proc/self/maps changes)
        elif isinstance(entry, PipeEnd):
            record["pipe"] = self.pipe(entry.pipe)
        elif isinstance(entry, EventFd):
            record.update(counter=entry.counter, semaphore=entry.semaphore)
        elif isinstance(entry, Epoll):
            self.epolls.append((entry, record))   # its interest, once every description has its number
        return record

    def finish(self) -> list[list]:
        """Each epoll's interest by description numbers; the pipes as [capacity, buffered
        bytes]. A watched file that no descriptor holds any more cannot be made again."""
        for epoll, record in self.epolls:
            interest = []
            for fd, (description, events, data) in sorted(epoll.interest.items()):
                if id(description) not in self.descriptions:
                    raise NotCarried(f"an epoll watches {description.path} (fd {fd}), which no descriptor of "
                                       f"the VM holds any more: it cannot be carried")
                interest.append([fd, self.number(description), events, data])
            record["interest"] = interest
        return [[pipe.capacity, b64(pipe.buffer)] for _, pipe in sorted(self.pipes.values(), key=lambda p: p[0])]


def files_record(fds, numbering: Numbering) -> dict:
    """fd -> its description's record; a descriptor dup() made of an earlier one names it."""
    files, first_fd = {}, {}
    for fd, entry in sorted(fds.table.items()):
        if id(entry) in first_fd:
            files[str(fd)] = {"same_as": first_fd[id(entry)]}
        else:
            first_fd[id(entry)] = fd
            files[str(fd)] = numbering.record(fd, entry)
    return files


# ---- validation ----------------------------------------------------------------------------

def validate_files(files, need, checks) -> None:
    """``checks``: the validators of state.py (int, path, base64, numbered); ``need(ok,
    what)`` raises. Pipe numbers are checked against the VM's pipes by the caller."""
    is_int, is_path, is_b64, numbered = checks
    need(isinstance(files, dict) and len(files) <= MAX_FDS and numbered(files, 0, MAX_FDS - 1),
         f"files is not a table of at most {MAX_FDS} descriptors")
    for fd, record in files.items():
        need(isinstance(record, dict), f"descriptor {fd} is malformed")
        if "same_as" in record:
            need(is_int(record["same_as"], 0, MAX_FDS - 1) and str(record["same_as"]) in files and
                 "same_as" not in files[str(record["same_as"])], f"descriptor {fd} shares a missing one")
            continue
        kind = record.get("kind")
        named = repr(kind[:20]) if isinstance(kind, str) else "(not a name)"
        need(kind in KINDS, f"descriptor {fd} is of kind {named}, not one of {', '.join(KINDS)}")
        need(is_path(record.get("path")) and is_int(record.get("flags"), 0, 1 << 32)
             and is_int(record.get("offset"), 0, 1 << 63) and is_int(record.get("id", 0), 0, MAX_DESCRIPTIONS),
             f"descriptor {fd} is malformed")
        if kind == "HostFile":
            need(is_path(record.get("host")) and all(is_int(record.get(k)) for k in IDENTITY),
                 f"descriptor {fd} does not say which file it was")
        elif kind == "MemoryFile":
            need(is_b64(record.get("data"), 1 << 26), f"descriptor {fd} lacks its contents")
        elif kind == "Stream":
            need(record["path"] in STREAMS, f"descriptor {fd} is not a standard stream")
        elif kind == "PipeEnd":
            need(is_int(record.get("pipe"), 0, MAX_DESCRIPTIONS), f"descriptor {fd} does not name its pipe")
        elif kind == "EventFd":
            need(is_int(record.get("counter"), 0, COUNTER_MAX) and isinstance(record.get("semaphore"), bool),
                 f"descriptor {fd} lacks its eventfd's counter")
        elif kind == "Epoll":
            interest = record.get("interest")
            need(isinstance(interest, list) and len(interest) <= MAX_FDS and all(
                isinstance(i, list) and len(i) == 4 and is_int(i[0], 0, MAX_FDS - 1)
                and is_int(i[1], 0, MAX_DESCRIPTIONS) and is_int(i[2], 0, (1 << 32) - 1) and is_int(i[3])
                for i in interest) and len({i[0] for i in interest}) == len(interest),
                f"descriptor {fd} lacks its epoll's interest list")


def pipe_is_valid(pipe, is_int, is_b64) -> bool:
    return (isinstance(pipe, list) and len(pipe) == 2 and pipe[0] in (PIPE_BUF, PIPE_SIZE) and is_int(pipe[0])
            and is_b64(pipe[1], PIPE_SIZE) and len(base64.b64decode(pipe[1])) <= pipe[0])


# ---- restoring -----------------------------------------------------------------------------

class Reopening:
    """A resume's descriptions: each number made once (later descriptors share it), the
    pipes made as they are met, and the epolls filled once every description exists."""

    def __init__(self, pipes: list, new_pipe):
        self.pipe_records, self.new_pipe = pipes, new_pipe   # new_pipe(capacity) -> Pipe
        self.made: dict[int, OpenFile] = {}
        self.pipes: dict[int, object] = {}
        self.epolls: list[tuple[Epoll, list]] = []

    def pipe(self, number: int):
        if number not in self.pipes:
            capacity, buffered = self.pipe_records[number]
            self.pipes[number] = pipe = self.new_pipe(capacity)
            pipe.buffer += base64.b64decode(buffered)
        return self.pipes[number]

    def description(self, kernel, fd: int, record: dict, origin: str) -> OpenFile:
        number = record.get("id")
        if number is not None and number in self.made:
            return self.made[number]
        entry = self._make(kernel, fd, record, origin)
        if number is not None:
            self.made[number] = entry
        return entry

    def _make(self, kernel, fd: int, record: dict, origin: str) -> OpenFile:
        """One open file description, as it was: a file opened as the program would open
        it now must be the same kind of file, and a file of the machine the same file."""
        path, kind = record["path"], record["kind"]
        if kind == "Stream":
            return kernel.fds.table[STREAMS[path]]
        if kind == "PipeEnd":
            entry = PipeEnd(self.pipe(record["pipe"]), record["flags"])
        elif kind == "EventFd":
            entry = EventFd(record["counter"], record["flags"])
            entry.semaphore = record["semaphore"]
        elif kind == "Epoll":
            entry = Epoll(record["flags"])
            self.epolls.append((entry, record["interest"]))
        else:
            entry = self._open(kernel, fd, record, origin)
        entry.offset = record["offset"]
        return entry

    @staticmethod
    def _open(kernel, fd: int, record: dict, origin: str) -> OpenFile:
        path, kind = record["path"], record["kind"]
        where = f"{origin}: its open file {path} (fd {fd})"
        try:
            follow = not record["flags"] & O_NOFOLLOW
            entry = open_node(kernel, *kernel.fs.resolve(path, "/", follow), record["flags"])
        except SyscallError as e:
            raise MinivmmError(f"{where} does not open in the program's file system (error {e.errno})") from None
        now = type(entry).__name__
        changed = now != kind or (kind == "HostFile" and entry.identity != {k: record[k] for k in IDENTITY})
        if changed:
            entry.close()
            raise MinivmmError(f"{where} changed since the snapshot was taken: " + (
                f"it was of kind {kind}, it opens as {now}" if now != kind else ", ".join(
                    f"{k} {record[k]} -> {entry.identity[k]}" for k in IDENTITY if record[k] != entry.identity[k])))
        if kind == "MemoryFile":
            entry.data = base64.b64decode(record["data"])  # as it was opened (/proc/self/maps changes)
        return entry

    def finish(self, origin: str) -> None:
        for epoll, interest in self.epolls:
            for fd, number, events, data in interest:
                if number not in self.made:
                    raise MinivmmError(f"{origin}: an epoll watches description {number}, which no descriptor holds")
                epoll.interest[fd] = [self.made[number], events, data]
