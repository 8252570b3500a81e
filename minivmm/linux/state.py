"""A Linux process's kernel state in a snapshot (plain JSON, validated field by field
before anything is used): the address space, the descriptors (files by path, offsets,
and what each file was, so that a resume re-opens them and refuses a file that
changed), signal dispositions, the mask and alternate stack, the pending signals, the
clock and its timers, the random generator, the system-call statistics, the mounts. A
resume gets only the mounts it grants (:func:`check_grants`)."""

from __future__ import annotations

import base64
import dataclasses
import re
from collections import Counter

from .. import digits
from ..errors import MinivmmError
from .calls import TABLE
from .calls.files import open_node
from .cpuinfo import cpuinfo
from .errno import SyscallError
from .files import IDENTITY, MAX_FDS, O_NOFOLLOW, MemoryFile, OpenFile
from .kernel import STDERR_KEPT, UNKNOWN_KEPT, Kernel
from .memory import PAGE, AddressSpace
from .proc import own_trees
from .process import SAMPLE, Process
from .signals import MAX_QUEUED, Action, Queued, xsave_layout
from .start import ARG_ROOM
from .threads import MAX_THREADS, Thread, Threads
from .timers import MAX_TIMERS, Timer
from .vfs import MAX_MOUNTS, PATH_MAX, FileSystem, Mount

FORMAT = 4                # 2: a file of the machine is known by its inode and change time too; 3: timers,
                          # pending signals, the clock's work-driven time and epoch; 4: threads
READ_FORMATS = (3, 4)     # a format 3 state is a process of one thread
STREAMS = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}
KINDS = ("HostFile", "MemoryFile", "Directory", "Device", "Stream", "OpenFile")  # the classes of files.py
NAMES = frozenset(name for name, _ in TABLE.values())   # the system calls counted by name
NSIG = 64

# Each list and string is bounded by what minivmm makes: paths by PATH_MAX (vfs keeps
# every path below it), descriptors by MAX_FDS, mounts by MAX_MOUNTS, argv by ARG_ROOM
# (execve's quarter of the stack), stderr by STDERR_KEPT, the statistics by UNKNOWN_KEPT
# numbers and SAMPLE calls, and:
MAX_STATE = 64 << 20      # the whole state: stderr's 16 MiB take 22 MB of base64, the rest far less
MAX_MAPS = 65530          # mappings: Linux's vm.max_map_count (DEFAULT_MAX_MAP_COUNT)
MAX_AUXV = PAGE           # the auxiliary vector: build_stack writes 20 pairs, 320 bytes
MAX_PENDING = 31 + MAX_QUEUED + MAX_TIMERS   # standard signals once, real-time ones sent, one per timer
THREAD_VALUES = 1200      # a thread's record: its fields and the snapshot's registers (about 230 names, 4 values
                          # for a descriptor table, 2 per x87 register)
RESUMES = ("run", "again", "result", "start")   # how a thread goes on: where it is, its system call made again,
                                                # a result its wait left, or a new thread's first run
TIMER_FIELDS = dataclasses.fields(Timer)
# The lists and objects, and their elements, that a state within those bounds holds:
# snapshot.py counts them before json.loads builds any (a few bytes such as "[]," make
# a hundred bytes of Python objects, so the section's size alone bounds too little).
# Elements: an argument per 9 bytes of ARG_ROOM, 7 per mapping, 16 per descriptor (its
# fields, its cloexec), 3 per mount, 5 per signal, 5 per pending signal, one more than
# its fields per timer, the generator's 625 words, the statistics, and the state's own fields.
JSON_CONTAINERS = 26 + MAX_FDS + MAX_MAPS + MAX_MOUNTS + NSIG + MAX_PENDING + 3 + MAX_TIMERS + 40 * MAX_THREADS
JSON_VALUES = (80 + ARG_ROOM // 9 + 7 * MAX_MAPS + 16 * MAX_FDS + 3 * MAX_MOUNTS + 5 * NSIG + 625 + SAMPLE
               + len(NAMES) + UNKNOWN_KEPT + 5 * MAX_PENDING + (len(TIMER_FIELDS) + 1) * (3 + MAX_TIMERS)
               + THREAD_VALUES * MAX_THREADS)
BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def _b64(data: bytes) -> str:
    return base64.b64encode(bytes(data)).decode()


def thread_record(thread, regs: dict | None) -> dict:
    """A thread as a snapshot keeps it: its per-thread kernel state, its registers (None
    for the running thread: the snapshot's own), and how it goes on. A thread waiting
    in a system call makes that call again (a futex wait checks its word again, a read
    finds its pipe again), as after a spurious wake-up."""
    resume, call, result, start = "run", [0, 0], 0, [0, -1]
    waited = thread.wait.call if thread.wait is not None else thread.again
    if waited is not None:
        resume, call = "again", list(waited)
    elif thread.start is not None:
        resume, start = "start", [thread.start[0], -1 if thread.start[1] is None else thread.start[1]]
    elif thread.result is not None:
        resume, result = "result", thread.result & (1 << 64) - 1
    return {"tid": thread.tid, "blocked": thread.blocked, "altstack": list(thread.altstack),
            "saved_mask": -1 if thread.saved_mask is None else thread.saved_mask,
            "clear_child_tid": thread.clear_child_tid, "robust": list(thread.robust_list), "regs": regs,
            "resume": resume, "call": call, "result": result, "start": start}


def capture(kernel: Kernel, threads: list[dict]) -> dict:
    """The process's kernel state; ``threads``: its threads' records (:func:`thread_record`),
    the running one first."""
    p = kernel.p
    files, first_fd = {}, {}
    for fd, entry in sorted(kernel.fds.table.items()):
        if id(entry) in first_fd:  # dup: the same open file description
            files[str(fd)] = {"same_as": first_fd[id(entry)]}
            continue
        first_fd[id(entry)] = fd
        record = {**entry.state(), "kind": type(entry).__name__}
        if isinstance(entry, MemoryFile):
            record["data"] = _b64(entry.data)  # as it was opened (/proc/self/maps changes)
        files[str(fd)] = record
    return {
        "format": FORMAT, "brk_start": p.brk_start, "brk": p.brk, "mmap_top": p.mmap_top,
        "stack_bottom": p.stack_bottom, "exe": p.exe, "argv": list(p.argv), "tid": p.tid, "auxv": _b64(p.auxv),
        "maps": p.memory.state(), "files": files, "cloexec": sorted(kernel.fds.cloexec), "cwd": kernel.cwd,
        "umask": kernel.umask, "mounts": [[m.host, m.guest] for m in kernel.fs.mounts],
        "signals": {"actions": {str(n): [a.handler, a.flags, a.restorer, a.mask]
                                for n, a in sorted(kernel.signals.actions.items())},
                    "blocked": kernel.signals.blocked, "altstack": list(kernel.signals.altstack),
                    "pending": [[q.signo, q.code, _b64(q.fields), -1 if q.timer is None else q.timer]
                                for q in kernel.signals.pending]},
        "clock": {"calls": kernel.clock.calls, "code_ns": kernel.clock.counter[0], "kernel_ns": kernel.clock.kernel_ns,
                  "slept_ns": kernel.clock.slept_ns, "epoch": kernel.clock.epoch, "realtime": kernel.clock.realtime},
        "timers": {"itimers": [list(dataclasses.astuple(t)) for t in kernel.timers.itimers],
                   "posix": [list(dataclasses.astuple(t)) for t in kernel.timers.posix.values()],
                   "next_id": kernel.timers.next_id},
        "random": list(kernel.random.getstate()[1]),
        "stats": {"counts": dict(p.counts), "unknown": {str(n): c for n, c in p.unknown.items()},
                  "unknown_others": p.unknown_others, "sample": list(p.sample)},
        "stderr": _b64(p.stderr), "stderr_left_out": p.stderr_left_out, "threads": threads,
    }


# ---- validation ----------------------------------------------------------------------------

def _int(value, lo=0, hi=(1 << 64) - 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _path(value) -> bool:
    return isinstance(value, str) and len(value) < PATH_MAX


def _is_b64(value, size: int) -> bool:
    """Base64 of at most ``size`` bytes (it decodes)."""
    return (isinstance(value, str) and len(value) <= 4 * -(-size // 3) and len(value) % 4 == 0
            and BASE64.fullmatch(value) is not None)


def _numbered(table: dict, lo: int, hi: int) -> bool:
    """An object keyed by numbers from ``lo`` to ``hi``, each written one way."""
    return all(digits.canonical(key) is not None and lo <= int(key) <= hi for key in table)


def validate(state, memory: int) -> None:
    """Raise ValueError naming the first field that is not what this format holds."""
    def need(ok, what):
        if not ok:
            raise ValueError(what)
    need(isinstance(state, dict) and state.get("format") in READ_FORMATS,
         f"format is not one of {', '.join(map(str, READ_FORMATS))}")
    for key in ("brk_start", "brk", "mmap_top", "stack_bottom"):
        need(_int(state.get(key), 0, memory), f"{key} is not an address in the guest's RAM")
    need(_int(state.get("tid"), 1, 1 << 22) and _int(state.get("umask"), 0, 0o777), "tid or umask is out of range")
    argv = state.get("argv")
    need(isinstance(argv, list) and all(isinstance(a, str) for a in argv)
         and sum(len(a) + 9 for a in argv) <= ARG_ROOM, f"argv is not a list of strings within {ARG_ROOM} bytes")
    for key in ("exe", "cwd"):
        need(_path(state.get(key)), f"{key} is not a path shorter than {PATH_MAX}")
    need(_is_b64(state.get("auxv"), MAX_AUXV), f"auxv is not base64 of at most {MAX_AUXV} bytes")
    need(_is_b64(state.get("stderr"), STDERR_KEPT), f"stderr is not base64 of at most {STDERR_KEPT} bytes")
    maps = state.get("maps")
    need(isinstance(maps, list) and len(maps) <= MAX_MAPS and all(
        isinstance(m, list) and len(m) == 6 and _int(m[0], 0, memory) and _int(m[1], 0, memory) and m[0] < m[1]
        and _int(m[2], 0, 7) and _path(m[3]) and _int(m[4]) and isinstance(m[5], bool) for m in maps),
        f"maps is not a list of at most {MAX_MAPS} [start, end, prot, name, offset, shared]")
    _validate_threads(state, need, memory)
    files = state.get("files")
    _validate_files(files, need)
    cloexec = state.get("cloexec")
    need(isinstance(cloexec, list) and len(cloexec) <= MAX_FDS
         and all(_int(fd, 0, MAX_FDS - 1) and str(fd) in files for fd in cloexec),
         "cloexec is not a list of open descriptors")
    mounts = state.get("mounts")
    need(isinstance(mounts, list) and len(mounts) <= MAX_MOUNTS and all(
        isinstance(m, list) and len(m) == 2 and all(_path(x) and x.startswith("/") for x in m) for m in mounts),
        f"mounts is not a list of at most {MAX_MOUNTS} [host, guest]")
    signals = state.get("signals")
    need(isinstance(signals, dict) and isinstance(signals.get("actions"), dict)
         and _numbered(signals["actions"], 1, NSIG) and all(
             isinstance(a, list) and len(a) == 4 and all(_int(x) for x in a) for a in signals["actions"].values())
         and _int(signals.get("blocked")) and isinstance(signals.get("altstack"), list)
         and len(signals["altstack"]) == 3 and all(_int(x, -(1 << 31)) for x in signals["altstack"]),
         "signals are malformed")
    pending = signals.get("pending")
    need(isinstance(pending, list) and len(pending) <= MAX_PENDING and all(
        isinstance(q, list) and len(q) == 4 and _int(q[0], 1, NSIG) and _int(q[1], -(1 << 31), (1 << 31) - 1)
        and _is_b64(q[2], 16) and _int(q[3], -1, (1 << 31) - 1) for q in pending), "pending signals are malformed")
    clock = state.get("clock")
    need(isinstance(clock, dict) and all(_int(clock.get(k)) for k in ("calls", "code_ns", "kernel_ns", "slept_ns",
                                                                       "epoch"))
         and isinstance(clock.get("realtime"), bool), "clock is malformed")
    timers = state.get("timers")
    need(isinstance(timers, dict) and isinstance(timers.get("itimers"), list) and len(timers["itimers"]) == 3
         and isinstance(timers.get("posix"), list) and len(timers["posix"]) <= MAX_TIMERS
         and all(_timer(t) for t in timers["itimers"] + timers["posix"])
         and [t[3] for t in timers["itimers"]] == [-1] * 3 and all(t[3] >= 0 for t in timers["posix"])
         and len({t[3] for t in timers["posix"]}) == len(timers["posix"])
         and _int(timers.get("next_id"), 0, (1 << 31) - 1), "timers are malformed")
    need({q[3] for q in pending} - {-1} <= {t[3] for t in timers["posix"]},
         "a pending signal names a timer that does not exist")
    need(isinstance(state.get("random"), list) and len(state["random"]) == 625
         and all(_int(x, 0, (1 << 32) - 1) for x in state["random"][:624]) and _int(state["random"][624], 0, 624),
         "random is not the generator's state")
    stats = state.get("stats")
    need(isinstance(stats, dict) and isinstance(stats.get("counts"), dict)
         and all(k in NAMES and _int(v) for k, v in stats["counts"].items())
         and isinstance(stats.get("unknown"), dict) and len(stats["unknown"]) <= UNKNOWN_KEPT
         and _numbered(stats["unknown"], 0, (1 << 64) - 1) and all(_int(v) for v in stats["unknown"].values())
         and _int(stats.get("unknown_others")) and isinstance(stats.get("sample"), list)
         and len(stats["sample"]) <= SAMPLE and all(x in NAMES if isinstance(x, str) else _int(x)
                                                    for x in stats["sample"])
         and _int(state.get("stderr_left_out")), "stats are malformed")


def _validate_threads(state, need, memory: int) -> None:
    threads = state.get("threads", [])
    need(isinstance(threads, list) and 1 <= len(threads) <= MAX_THREADS if "threads" in state else True,
         f"threads is not a list of 1 to {MAX_THREADS} records")
    tids = set()
    for i, t in enumerate(threads):
        need(isinstance(t, dict) and _int(t.get("tid"), 1, 1 << 22) and t["tid"] not in tids
             and _int(t.get("blocked")) and _int(t.get("clear_child_tid")) and _int(t.get("saved_mask"), -1)
             and isinstance(t.get("altstack"), list) and len(t["altstack"]) == 3
             and all(_int(x, -(1 << 31)) for x in t["altstack"])
             and isinstance(t.get("robust"), list) and len(t["robust"]) == 2 and all(_int(x) for x in t["robust"])
             and t.get("resume") in RESUMES and isinstance(t.get("call"), list) and len(t["call"]) == 2
             and all(_int(x) for x in t["call"]) and _int(t.get("result"))
             and isinstance(t.get("start"), list) and len(t["start"]) == 2 and _int(t["start"][0])
             and _int(t["start"][1], -1) and (t.get("regs") is None) == (i == 0)
             and (i == 0 or isinstance(t["regs"], dict)), f"thread {i} is malformed")
        tids.add(t["tid"])


def _timer(value) -> bool:
    """A timer's fields in order (timers.Timer): a signal's number, booleans where it has
    them, else whole numbers."""
    return isinstance(value, list) and len(value) == len(TIMER_FIELDS) and _int(value[0], 1, NSIG) and all(
        isinstance(v, bool) if isinstance(f.default, bool) else _int(v, -(1 << 63))
        for v, f in zip(value, TIMER_FIELDS))


def _validate_files(files, need) -> None:
    need(isinstance(files, dict) and len(files) <= MAX_FDS and _numbered(files, 0, MAX_FDS - 1),
         f"files is not a table of at most {MAX_FDS} descriptors")
    for fd, record in files.items():
        need(isinstance(record, dict), f"descriptor {fd} is malformed")
        if "same_as" in record:
            need(_int(record["same_as"], 0, MAX_FDS - 1) and str(record["same_as"]) in files and
                 "same_as" not in files[str(record["same_as"])], f"descriptor {fd} shares a missing one")
            continue
        kind = record.get("kind")
        named = repr(kind[:20]) if isinstance(kind, str) else "(not a name)"
        need(kind in KINDS, f"descriptor {fd} is of kind {named}, not one of {', '.join(KINDS)}")
        need(_path(record.get("path")) and _int(record.get("flags"), 0, 1 << 32)
             and _int(record.get("offset"), 0, 1 << 63), f"descriptor {fd} is malformed")
        if kind == "HostFile":
            need(_path(record.get("host")) and all(_int(record.get(k)) for k in IDENTITY),
                 f"descriptor {fd} does not say which file it was")
        elif kind == "MemoryFile":
            need(_is_b64(record.get("data"), MAX_STATE), f"descriptor {fd} lacks its contents")
        elif kind == "Stream":
            need(record["path"] in STREAMS, f"descriptor {fd} is not a standard stream")


# ---- what it needs of the machine ----------------------------------------------------------

def check_grants(state: dict, granted, origin: str) -> None:
    """Refuse, naming the --mount it lacks, a process whose mounts and open files the
    ``granted`` mounts do not show where it had them: a snapshot gets nothing of the
    machine that the person resuming it did not grant."""
    for mount, why in _needs(state):
        if not any(grant.host_path(mount.guest) == mount.host for grant in granted):
            raise MinivmmError(f"{origin} needs --mount {mount} ({why})")


def _needs(state: dict) -> list[tuple[Mount, str]]:
    """The mount of each open file of the machine (the line then names the file), and
    every mount the program had."""
    mounts = sorted((Mount(host, guest) for host, guest in state["mounts"]), key=lambda m: -len(m.guest))
    out = []
    for record in state["files"].values():
        if record.get("kind") == "HostFile":
            path = record["path"]
            under = next((m for m in mounts if m.host_path(path) is not None), Mount(record["host"], path))
            out.append((under, f"its open file {path}"))
    return out + [(m, f"its mount at {m.guest}") for m in mounts]


# ---- restoring -----------------------------------------------------------------------------

def _reopen(kernel: Kernel, fd: int, record: dict, origin: str) -> OpenFile:
    """One open file description, as it was: opened as the program would open it now,
    it must be the same kind of file, and a file of the machine the same file."""
    path, kind = record["path"], record["kind"]
    if kind == "Stream":
        return kernel.fds.table[STREAMS[path]]
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
            f"it was of kind {kind}, it opens as {now}" if now != kind else
            ", ".join(f"{k} {record[k]} -> {entry.identity[k]}" for k in IDENTITY if record[k] != entry.identity[k])))
    if kind == "MemoryFile":
        entry.data = base64.b64decode(record["data"])  # as it was opened (/proc/self/maps changes)
    entry.offset = record["offset"]
    return entry


def restore(state: dict, ram, host, view, console, options, origin: str) -> Kernel:
    """The kernel of a snapshot's process over ``ram`` (already holding its memory), on
    ``host`` with the VM's ``view`` (/proc/cpuinfo), writing to ``console``; ``options``
    give its standard input and terminal, and the mounts the resume granted (checked
    with :func:`check_grants`): the program sees those, whatever the snapshot says."""
    memory = AddressSpace(ram)
    try:
        memory.restore(state["maps"])
    except ValueError as e:
        raise MinivmmError(f"{origin}: process: {e}") from None
    p = Process(memory, state["brk_start"], state["brk"], state["mmap_top"], state["stack_bottom"], state["exe"],
                tid=state["tid"], auxv=base64.b64decode(state["auxv"]), argv=list(state["argv"]))
    p.counts, p.unknown = Counter(state["stats"]["counts"]), Counter({int(k): v for k, v in
                                                                      state["stats"]["unknown"].items()})
    p.unknown_others, p.sample = state["stats"]["unknown_others"], list(state["stats"]["sample"])
    p.stderr, p.stderr_left_out = bytearray(base64.b64decode(state["stderr"])), state["stderr_left_out"]
    fs = FileSystem(list(options.mounts), {})
    p.stdout_sink = console
    kernel = Kernel(p, fs, 0, options.stdin, state["clock"]["realtime"], options.terminal, xsave_layout(view),
                    state["clock"]["epoch"])
    fs.own = own_trees(p, cpuinfo(host, view))
    kernel.view = view
    kernel.random.setstate((3, tuple(state["random"]), None))
    clock = state["clock"]
    kernel.clock.calls, kernel.clock.counter[0] = clock["calls"], clock["code_ns"]
    kernel.clock.kernel_ns, kernel.clock.slept_ns = clock["kernel_ns"], clock["slept_ns"]
    kernel.cwd, kernel.umask = state["cwd"], state["umask"]
    signals = state["signals"]
    kernel.signals.actions = {int(n): Action(*a) for n, a in signals["actions"].items()}
    kernel.signals.blocked, kernel.signals.altstack = signals["blocked"], tuple(signals["altstack"])
    kernel.signals.pending = [Queued(signo, code, base64.b64decode(fields), None if timer < 0 else timer)
                              for signo, code, fields, timer in signals["pending"]]
    timers = state["timers"]
    kernel.timers.itimers = [Timer(*t) for t in timers["itimers"]]
    kernel.timers.posix = {t[3]: Timer(*t) for t in timers["posix"]}
    kernel.timers.next_id = timers["next_id"]
    kernel.timers.arm()
    files = state["files"]
    reopened: dict[int, OpenFile] = {}
    for fd in sorted(files, key=int):
        if "same_as" not in files[fd]:
            reopened[int(fd)] = _reopen(kernel, int(fd), files[fd], origin)
    kernel.fds.table = {int(fd): reopened[record["same_as"]] if "same_as" in record else reopened[int(fd)]
                        for fd, record in files.items()}
    kernel.fds.cloexec = set(state["cloexec"])
    kernel.fds.recount()
    records = state.get("threads")
    if records:
        kernel.threads = Threads(p.tid, 0)
        kernel.threads.all = {r["tid"]: _thread(r) for r in records}
        kernel.threads.current = records[0]["tid"]
        kernel.threads.next_tid = max(kernel.threads.all) + 1
        kernel.signals.current = kernel.threads.current
    return kernel


def _thread(record: dict) -> Thread:
    """A thread of a snapshot; the VMM makes its registers (``regs``) a context."""
    thread = Thread(record["tid"], blocked=record["blocked"], altstack=tuple(record["altstack"]),
                    saved_mask=None if record["saved_mask"] < 0 else record["saved_mask"],
                    clear_child_tid=record["clear_child_tid"], robust_list=tuple(record["robust"]))
    if record["resume"] == "again":
        thread.again = tuple(record["call"])
    elif record["resume"] == "result":
        thread.result = record["result"]
    elif record["resume"] == "start":
        stack, tls = record["start"]
        thread.start, thread.result = (stack, None if tls < 0 else tls), 0
    thread.regs = record["regs"]
    return thread
