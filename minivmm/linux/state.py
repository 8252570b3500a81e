"""A Linux process's kernel state in a snapshot (plain JSON, validated field by field
before anything is used): the address space, the descriptors (files by path, offsets,
and what each file was, so that a resume re-opens them and refuses a file that
changed), signal dispositions, the mask and alternate stack, the clock, the random
generator, the system-call statistics, the mounts."""

from __future__ import annotations

import base64
import os
from collections import Counter

from ..errors import MinivmmError
from .cpuinfo import cpuinfo
from .errno import SyscallError
from .files import Device, Directory, HostFile, MemoryFile, OpenFile
from .kernel import Kernel
from .memory import AddressSpace
from .proc import own_trees
from .process import SAMPLE, Process
from .signals import Action, xsave_layout
from .vfs import FileSystem, Mount

FORMAT = 1
STREAMS = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}


def _b64(data: bytes) -> str:
    return base64.b64encode(bytes(data)).decode()


def capture(kernel: Kernel) -> dict:
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
                    "blocked": kernel.signals.blocked, "altstack": list(kernel.signals.altstack)},
        "clock": {"calls": kernel.clock.calls, "slept_ns": kernel.clock.slept_ns, "realtime": kernel.clock.realtime},
        "random": list(kernel.random.getstate()[1]),
        "stats": {"counts": dict(p.counts), "unknown": {str(n): c for n, c in p.unknown.items()},
                  "unknown_others": p.unknown_others, "sample": list(p.sample)},
        "stderr": _b64(p.stderr), "stderr_left_out": p.stderr_left_out,
    }


# ---- validation ----------------------------------------------------------------------------

def _int(value, lo=0, hi=(1 << 64) - 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def validate(state, memory: int) -> None:
    """Raise ValueError naming the first field that is not what this format holds."""
    def need(ok, what):
        if not ok:
            raise ValueError(what)
    need(isinstance(state, dict) and state.get("format") == FORMAT, f"format is not {FORMAT}")
    for key in ("brk_start", "brk", "mmap_top", "stack_bottom"):
        need(_int(state.get(key), 0, memory), f"{key} is not an address in the guest's RAM")
    need(_int(state.get("tid"), 1, 1 << 22) and _int(state.get("umask"), 0, 0o777), "tid or umask is out of range")
    need(isinstance(state.get("argv"), list) and len(state["argv"]) < 4096
         and all(isinstance(a, str) for a in state["argv"]), "argv is not a list of strings")
    for key in ("exe", "cwd", "auxv", "stderr"):
        need(isinstance(state.get(key), str) and len(state[key]) < 64 << 20, f"{key} is not a string")
    maps = state.get("maps")
    need(isinstance(maps, list) and len(maps) < 1 << 16 and all(
        isinstance(m, list) and len(m) == 6 and _int(m[0], 0, memory) and _int(m[1], 0, memory) and m[0] < m[1]
        and _int(m[2], 0, 7) and isinstance(m[3], str) and _int(m[4]) and isinstance(m[5], bool) for m in maps),
        "maps is not a list of [start, end, prot, name, offset, shared]")
    files = state.get("files")
    need(isinstance(files, dict) and len(files) <= 1024, "files is not a table of descriptors")
    for fd, record in files.items():
        need(fd.isdigit() and int(fd) < 1024 and isinstance(record, dict), f"descriptor {fd[:8]!r} is malformed")
        if "same_as" in record:
            need(_int(record["same_as"], 0, 1023) and str(record["same_as"]) in files and
                 "same_as" not in files[str(record["same_as"])], f"descriptor {fd} shares a missing one")
            continue
        need(record.get("kind") in ("HostFile", "MemoryFile", "Directory", "Device", "Stream", "OpenFile")
             and isinstance(record.get("path"), str) and _int(record.get("flags"), 0, 1 << 32)
             and _int(record.get("offset"), 0, 1 << 63), f"descriptor {fd} is malformed")
        if record["kind"] == "HostFile":
            need(isinstance(record.get("host"), str) and _int(record.get("size")) and _int(record.get("mtime_ns")),
                 f"descriptor {fd} does not say which file it was")
    need(isinstance(state.get("cloexec"), list) and all(_int(fd, 0, 1023) for fd in state["cloexec"]),
         "cloexec is not a list of descriptors")
    need(isinstance(state.get("mounts"), list) and all(
        isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m) for m in state["mounts"]),
        "mounts is not a list of [host, guest]")
    signals = state.get("signals")
    need(isinstance(signals, dict) and isinstance(signals.get("actions"), dict) and all(
        n.isdigit() and 1 <= int(n) <= 64 and isinstance(a, list) and len(a) == 4 and all(_int(x) for x in a)
        for n, a in signals["actions"].items()) and _int(signals.get("blocked"))
        and isinstance(signals.get("altstack"), list) and len(signals["altstack"]) == 3
        and all(_int(x, -(1 << 31)) for x in signals["altstack"]), "signals are malformed")
    clock = state.get("clock")
    need(isinstance(clock, dict) and _int(clock.get("calls")) and _int(clock.get("slept_ns"))
         and isinstance(clock.get("realtime"), bool), "clock is malformed")
    need(isinstance(state.get("random"), list) and len(state["random"]) == 625
         and all(_int(x, 0, (1 << 32) - 1) for x in state["random"][:624]) and _int(state["random"][624], 0, 624),
         "random is not the generator's state")
    stats = state.get("stats")
    need(isinstance(stats, dict) and isinstance(stats.get("counts"), dict)
         and all(isinstance(k, str) and _int(v) for k, v in stats["counts"].items())
         and isinstance(stats.get("unknown"), dict) and len(stats["unknown"]) <= 1000
         and all(k.isdigit() and _int(v) for k, v in stats["unknown"].items())
         and _int(stats.get("unknown_others")) and isinstance(stats.get("sample"), list)
         and len(stats["sample"]) <= SAMPLE and all(isinstance(x, (str, int)) for x in stats["sample"])
         and _int(state.get("stderr_left_out")), "stats are malformed")


# ---- restoring -----------------------------------------------------------------------------

def _reopen(kernel: Kernel, fd: int, record: dict) -> OpenFile:
    """One open file description, as it was: a file of the machine must be the same file."""
    path, flags, kind = record["path"], record["flags"], record["kind"]
    if kind == "Stream":
        return kernel.fds.table[STREAMS.get(path, 0)]
    try:
        resolved, node = kernel.fs.resolve(path)
    except SyscallError as e:
        raise MinivmmError(f"snapshot: {path} (fd {fd}) is not in the program's file system any more "
                           f"(error {e.errno})") from None
    if kind == "HostFile":
        try:
            entry = HostFile(resolved, node, flags)
        except (OSError, SyscallError, AttributeError):
            raise MinivmmError(f"snapshot: {path} (fd {fd}) cannot be opened again") from None
        if entry.identity != (record["size"], record["mtime_ns"]):
            entry.close()
            raise MinivmmError(f"snapshot: {path} (fd {fd}) changed since the snapshot was taken "
                               f"(size {record['size']} -> {entry.identity[0]}, or its modification time)")
    elif kind == "MemoryFile":
        entry = MemoryFile(resolved, node, flags)
        entry.data = base64.b64decode(record.get("data", ""))
    elif kind == "Directory":
        entry = Directory(resolved, node, flags, kernel.fs.listing(resolved, node))
    elif kind == "Device":
        entry = Device(resolved, node, flags, kernel.random)
    else:
        entry = OpenFile(resolved, node, flags)
    entry.offset = record["offset"]
    return entry


def restore(state: dict, ram, host, view, console, stdin=None, terminal: bool = False) -> Kernel:
    """The kernel of a snapshot's process over ``ram`` (already holding its memory), on
    ``host`` with the VM's ``view`` (/proc/cpuinfo), writing to ``console`` and reading
    ``stdin`` (arguments, environment and mounts come from the snapshot)."""
    memory = AddressSpace(ram)
    try:
        memory.restore(state["maps"])
    except ValueError as e:
        raise MinivmmError(f"snapshot: process: {e}") from None
    p = Process(memory, state["brk_start"], state["brk"], state["mmap_top"], state["stack_bottom"], state["exe"],
                tid=state["tid"], auxv=base64.b64decode(state["auxv"]), argv=list(state["argv"]))
    p.counts, p.unknown = Counter(state["stats"]["counts"]), Counter({int(k): v for k, v in
                                                                      state["stats"]["unknown"].items()})
    p.unknown_others, p.sample = state["stats"]["unknown_others"], list(state["stats"]["sample"])
    p.stderr, p.stderr_left_out = bytearray(base64.b64decode(state["stderr"])), state["stderr_left_out"]
    mounts = []
    for source, guest in state["mounts"]:
        if not os.path.exists(source):
            raise MinivmmError(f"snapshot: the mounted {source} (at {guest}) does not exist on this machine")
        mounts.append(Mount(source, guest))
    fs = FileSystem(mounts, {})
    p.stdout_sink = console
    kernel = Kernel(p, fs, 0, stdin, state["clock"]["realtime"], terminal, xsave_layout(view))
    fs.own = own_trees(p, cpuinfo(host, view))
    kernel.random.setstate((3, tuple(state["random"]), None))
    kernel.clock.calls, kernel.clock.slept_ns = state["clock"]["calls"], state["clock"]["slept_ns"]
    kernel.cwd, kernel.umask = state["cwd"], state["umask"]
    signals = state["signals"]
    kernel.signals.actions = {int(n): Action(*a) for n, a in signals["actions"].items()}
    kernel.signals.blocked, kernel.signals.altstack = signals["blocked"], tuple(signals["altstack"])
    files = state["files"]
    reopened: dict[int, OpenFile] = {}
    for fd in sorted(files, key=int):
        if "same_as" not in files[fd]:
            reopened[int(fd)] = _reopen(kernel, int(fd), files[fd])
    kernel.fds.table = {int(fd): reopened[record["same_as"]] if "same_as" in record else reopened[int(fd)]
                        for fd, record in files.items()}
    kernel.fds.cloexec = set(state["cloexec"])
    return kernel
