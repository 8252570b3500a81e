"""What a stopped native process is, read from the kernel: the state a snapshot of it
holds, as CRIU reads it for a checkpoint (/proc/PID/maps, pagemap and mem, fdinfo,
status; PTRACE_GETREGS and NT_X86_XSTATE), and what /proc does not show (signal
handlers, the alternate stack, brk, interval timers) asked of the process itself, by
system calls the supervisor makes in it.

A process is carried only when all of it can be, as the emulator would continue it:
one thread and no child, its mappings inside the VM's RAM (no shared writable file
mapping, whose writes would no longer reach the file), no signal pending, no timer
armed, no seccomp filter of its own (which could refuse the supervisor's calls), a
working directory that exists, and descriptors that are the standard streams, or files
and directories of the machine opened for reading (the emulator's mounts are
read-only), the very files their paths name now. Anything else is refused with a
reason naming it (:class:`Uncarried`), and the process runs on as it was.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, field

from . import ptrace as pt
from .placement import KERNEL_AREAS, PAGE, Area, parse_maps

MMAP_MIN = 0x10000        # vm.mmap_min_addr
NSIG = 64
SIGKILL, SIGSTOP = 9, 19
RED_ZONE = 128
O_ACCMODE, O_PATH, O_CLOEXEC = 0o3, 0o10000000, 0o2000000
KERNEL_TREES = ("/proc/", "/sys/", "/dev/")
PRESENT = 3 << 62         # a pagemap entry's present and swapped bits
READ_RUN = 1 << 22        # bytes read from the process at a time


class Uncarried(Exception):
    """The process cannot be carried into the emulator: why, in one line."""


@dataclass
class NativeProcess:
    pid: int
    regs: pt.Regs
    xsave: bytes
    areas: list[Area]
    contents: dict[int, bytes]                 # start -> bytes of a run of pages it touched (the rest are zeros)
    brk_start: int
    brk: int
    actions: dict[int, tuple[int, int, int, int]]   # signal -> (handler, flags, restorer, mask), non-default
    blocked: int
    altstack: tuple[int, int, int]            # sp, flags, size
    umask: int
    cwd: str
    exe: str
    argv: list[str]
    files: dict[int, dict] = field(default_factory=dict)   # fd -> path, flags, offset, kind, cloexec
    auxv: bytes = b""


def capture(tid: int, mem: int, call, memory: int, streams: dict[int, str], left: tuple[int, int],
            cpuinfo: str) -> NativeProcess:
    """The stopped process ``tid``: ``mem`` its /proc/PID/mem, opened; ``call(nr, *args)``
    makes a system call in it; ``memory`` is the VM's RAM; ``streams`` the inodes of
    the pipes that are its standard output and error; ``left`` the range of its old
    stack (placement.py), which stays behind; ``cpuinfo`` the file its /proc/cpuinfo
    opens as."""
    status = _status(tid)
    if int(status.get("Threads", "1")) != 1:
        raise Uncarried(f"it has {status['Threads']} threads; minivmm carries a process of one thread")
    if int(status.get("Seccomp_filters", "1")) > 1:
        raise Uncarried("it installed a seccomp filter of its own, which could refuse the calls minivmm makes in it")
    with open(f"/proc/{tid}/task/{tid}/children") as children:
        if children.read().strip():
            raise Uncarried("it has child processes; minivmm carries one process")
    pending = int(status.get("SigPnd", "0"), 16) | int(status.get("ShdPnd", "0"), 16)
    if pending:
        raise Uncarried(f"signals are pending for it (mask {pending:#x})")
    try:
        with open(f"/proc/{tid}/timers", "rb") as timers:
            if timers.read(1):
                raise Uncarried("it has POSIX timers")
    except FileNotFoundError:
        pass   # a kernel without CONFIG_CHECKPOINT_RESTORE: timer_create's ids are then unseen
    cwd = os.readlink(f"/proc/{tid}/cwd")
    if cwd.endswith(" (deleted)"):
        raise Uncarried(f"its working directory {cwd} was removed")
    files = _files(tid, streams, cpuinfo)
    regs = pt.get_regs(tid)
    scratch = (regs.rsp - RED_ZONE - 64) & ~0xF

    def asked(nr, *args, size=0) -> bytes:
        result = call(nr, *args)
        if result < 0:
            raise Uncarried(f"system call {nr} failed in it ({os.strerror(-result)})")
        return os.pread(mem, size, scratch) if size else result.to_bytes(8, "little")

    for which in range(3):
        if any(struct.unpack("<4Q", asked(pt.SYS_GETITIMER, which, scratch, size=32))):
            raise Uncarried(f"its interval timer {('ITIMER_REAL', 'ITIMER_VIRTUAL', 'ITIMER_PROF')[which]} is armed")
    actions = {}
    for signo in range(1, NSIG + 1):
        if signo in (SIGKILL, SIGSTOP):
            continue
        action = struct.unpack("<4Q", asked(pt.SYS_RT_SIGACTION, signo, 0, scratch, 8, size=32))
        if any(action):
            actions[signo] = action
    altstack = struct.unpack("<QiiQ", asked(pt.SYS_SIGALTSTACK, 0, scratch, size=24))
    brk = int.from_bytes(asked(pt.SYS_BRK, 0), "little")
    with open(f"/proc/{tid}/stat", "rb") as stat_file:
        brk_start = int(stat_file.read().rsplit(b")", 1)[1].split()[44])   # field 47, start_brk
    with open(f"/proc/{tid}/maps") as maps:
        areas = [a for a in parse_maps(maps.read()) if a.name not in KERNEL_AREAS and (a.start, a.end) != left]
    for area in areas:
        if area.start < MMAP_MIN or area.end > memory:
            raise Uncarried(f"its mapping {area.start:#x}-{area.end:#x} {area.name or '(anonymous)'} lies outside "
                            f"the VM's {memory >> 20} MiB of RAM")
        if area.shared and "w" in area.perms and area.name.startswith("/") and not area.anonymous:
            raise Uncarried(f"its shared writable mapping of {area.name} would no longer write to the file")
    with open(f"/proc/{tid}/cmdline", "rb") as cmdline:
        argv = [a.decode("utf-8", "surrogateescape") for a in cmdline.read().split(b"\0")[:-1]]
    return NativeProcess(
        pid=tid, regs=regs, xsave=pt.xstate(tid), areas=areas, contents=_touched(tid, mem, areas),
        brk_start=brk_start, brk=brk, actions=actions, blocked=int(status.get("SigBlk", "0"), 16),
        altstack=(altstack[0], altstack[1], altstack[3]), umask=int(status.get("Umask", "022"), 8), cwd=cwd,
        exe=os.readlink(f"/proc/{tid}/exe"), argv=argv, files=files)


def _touched(tid: int, mem: int, areas: list[Area]) -> dict[int, bytes]:
    """The pages the process ever touched (present or swapped out, /proc/PID/pagemap),
    read in runs; pages never touched are zeros, and reading them would only cost."""
    out = {}
    with open(f"/proc/{tid}/pagemap", "rb", buffering=0) as pagemap:
        for area in areas:
            pagemap.seek(area.start // PAGE * 8)
            entries = pagemap.read((area.end - area.start) // PAGE * 8)
            flags = [int.from_bytes(entries[i:i + 8], "little") & PRESENT for i in range(0, len(entries), 8)]
            page = 0
            while page < len(flags):
                if not flags[page]:
                    page += 1
                    continue
                run = page
                while run < len(flags) and flags[run] and (run - page) * PAGE < READ_RUN:
                    run += 1
                start = area.start + page * PAGE
                data = os.pread(mem, (run - page) * PAGE, start)
                if len(data) != (run - page) * PAGE:
                    raise Uncarried(f"its memory at {start:#x} cannot be read")
                if data.count(0) != len(data):
                    out[start] = data
                page = run
    return out


def _status(tid: int) -> dict[str, str]:
    with open(f"/proc/{tid}/status") as status:
        return {name: value.strip() for name, _, value in (line.partition(":") for line in status)}


def _files(tid: int, streams: dict[int, str], cpuinfo: str) -> dict[int, dict]:
    """Its descriptors as the emulator's kinds: its standard output and error (the
    supervisor's pipes, under any number), its standard input, /proc/cpuinfo (the view's),
    files and directories of the machine, each the file its path names now."""
    out = {}
    for name in sorted(os.listdir(f"/proc/{tid}/fd"), key=int):
        fd = int(name)
        link = f"/proc/{tid}/fd/{fd}"
        target = os.readlink(link)
        with open(f"/proc/{tid}/fdinfo/{fd}") as info:
            fields = dict(line.split(":", 1) for line in info if ":" in line)
        flags, offset = int(fields["flags"].strip(), 8), int(fields["pos"].strip())
        record = {"path": target, "flags": flags & ~O_CLOEXEC, "offset": offset, "cloexec": bool(flags & O_CLOEXEC)}
        seen = os.stat(link)
        if seen.st_ino in streams and stat.S_ISFIFO(seen.st_mode):
            out[fd] = {**record, "kind": "Stream", "path": streams[seen.st_ino]}
        elif fd == 0 and not flags & O_ACCMODE:
            out[fd] = {**record, "kind": "Stream", "path": "/dev/stdin"}
        elif target == cpuinfo:
            out[fd] = {**record, "kind": "MemoryFile", "path": "/proc/cpuinfo"}
        elif flags & (O_ACCMODE | O_PATH) or not target.startswith("/") or target.startswith(KERNEL_TREES):
            raise Uncarried(f"its descriptor {fd} ({target}) is no file of the machine open for reading: minivmm "
                            f"carries those and the standard streams")
        else:
            try:
                named = os.stat(target)
            except OSError:
                named = None
            if named is None or (named.st_dev, named.st_ino) != (seen.st_dev, seen.st_ino):
                raise Uncarried(f"its descriptor {fd} is not the file {target} names here (removed, or in a "
                                f"namespace of its own)")
            if stat.S_ISREG(seen.st_mode):
                out[fd] = {**record, "kind": "HostFile"}
            elif stat.S_ISDIR(seen.st_mode) and offset == 0:
                out[fd] = {**record, "kind": "Directory"}
            else:
                raise Uncarried(f"its descriptor {fd} ({target}) is a directory it began to read, or a device")
    return out
