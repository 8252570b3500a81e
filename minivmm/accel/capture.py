"""What a stopped native process is, read from the kernel: the state a snapshot of it
holds, as CRIU reads it for a checkpoint (/proc/PID/maps and mem, fdinfo, status;
PTRACE_GETREGS and NT_X86_XSTATE), and what /proc does not show (signal handlers, the
alternate stack, brk, interval timers) asked of the process itself, by system calls the
supervisor makes in it.

A process is carried only when all of it can be: one thread, its mappings inside the
VM's RAM, no signal pending, no timer armed, and descriptors that are files,
directories at their start, or the standard streams. Anything else is refused with a
reason naming it (:class:`Uncarried`), and the process runs on as it was.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, field

from . import ptrace as pt
from .placement import KERNEL_AREAS, Area, parse_maps

MMAP_MIN = 0x10000        # vm.mmap_min_addr
NSIG = 64
SIGKILL, SIGSTOP = 9, 19
RED_ZONE = 128
STREAMS = ("/dev/stdin", "/dev/stdout", "/dev/stderr")


class Uncarried(Exception):
    """The process cannot be carried into the emulator: why, in one line."""


@dataclass
class NativeProcess:
    regs: pt.Regs
    xsave: bytes
    areas: list[Area]
    contents: dict[int, bytes]                 # area start -> its bytes (zero pages left out: absent)
    brk_start: int
    brk: int
    actions: dict[int, tuple[int, int, int, int]]   # signal -> (handler, flags, restorer, mask), non-default
    blocked: int
    altstack: tuple[int, int, int]            # sp, flags, size
    umask: int
    cwd: str
    exe: str
    files: dict[int, dict] = field(default_factory=dict)   # fd -> path, flags, offset, kind, cloexec


def capture(tid: int, read, call, memory: int) -> NativeProcess:
    """The stopped single-threaded process ``tid``: ``read(address, size)`` reads its
    memory, ``call(nr, *args)`` makes a system call in it; ``memory`` is the VM's RAM."""
    status = _status(tid)
    if int(status.get("Threads", "1")) != 1:
        raise Uncarried(f"it has {status['Threads']} threads; minivmm carries a process of one thread")
    pending = int(status.get("SigPnd", "0"), 16) | int(status.get("ShdPnd", "0"), 16)
    if pending:
        raise Uncarried(f"signals are pending for it (mask {pending:#x})")
    with open(f"/proc/{tid}/timers", "rb") as timers:
        if timers.read(1):
            raise Uncarried("it has POSIX timers")
    regs = pt.get_regs(tid)
    scratch = (regs.rsp - RED_ZONE - 64) & ~0xF

    def asked(nr, *args, size=0) -> bytes:
        result = call(nr, *args)
        if result < 0:
            raise Uncarried(f"system call {nr} failed in it ({os.strerror(-result)})")
        return read(scratch, size) if size else result.to_bytes(8, "little")

    for which in range(3):
        value = asked(pt.SYS_GETITIMER, which, scratch, size=32)
        if any(struct.unpack("<4Q", value)):
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
        areas = [a for a in parse_maps(maps.read()) if a.name not in KERNEL_AREAS]
    for area in areas:
        if area.start < MMAP_MIN or area.end > memory:
            raise Uncarried(f"its mapping {area.start:#x}-{area.end:#x} {area.name or '(anonymous)'} lies outside "
                            f"the VM's {memory >> 20} MiB of RAM")
    contents = {}
    for area in areas:
        data = read(area.start, area.end - area.start)
        if len(data) != area.end - area.start:
            raise Uncarried(f"its mapping {area.start:#x}-{area.end:#x} cannot be read")
        if data.count(0) != len(data):
            contents[area.start] = data
    return NativeProcess(
        regs=regs, xsave=pt.xstate(tid), areas=areas, contents=contents, brk_start=brk_start, brk=brk,
        actions=actions, blocked=int(status.get("SigBlk", "0"), 16), altstack=(altstack[0], altstack[1], altstack[3]),
        umask=int(status.get("Umask", "022"), 8), cwd=os.readlink(f"/proc/{tid}/cwd"),
        exe=os.readlink(f"/proc/{tid}/exe"), files=_files(tid))


def _status(tid: int) -> dict[str, str]:
    with open(f"/proc/{tid}/status") as status:
        return {name: value.strip() for name, _, value in (line.partition(":") for line in status)}


def _files(tid: int) -> dict[int, dict]:
    """Its descriptors as the emulator's kinds: the standard streams (0-2, whatever the
    supervisor connected them to), files of the machine, directories not yet read."""
    out = {}
    for name in sorted(os.listdir(f"/proc/{tid}/fd"), key=int):
        fd = int(name)
        target = os.readlink(f"/proc/{tid}/fd/{fd}")
        with open(f"/proc/{tid}/fdinfo/{fd}") as info:
            fields = dict(line.split(":", 1) for line in info if ":" in line)
        flags, offset = int(fields["flags"].strip(), 8), int(fields["pos"].strip())
        record = {"path": target, "flags": flags & ~0o2000000, "offset": offset, "cloexec": bool(flags & 0o2000000)}
        if fd <= 2 and (not target.startswith("/") or target.startswith("/dev/")):
            out[fd] = {**record, "kind": "Stream", "path": STREAMS[fd]}
            continue
        try:
            mode = os.stat(f"/proc/{tid}/fd/{fd}").st_mode
        except OSError:
            mode = 0
        if stat.S_ISREG(mode) and target.startswith("/") and not target.endswith(" (deleted)"):
            out[fd] = {**record, "kind": "HostFile"}
        elif stat.S_ISDIR(mode) and target.startswith("/") and offset == 0:
            out[fd] = {**record, "kind": "Directory"}
        else:
            raise Uncarried(f"its descriptor {fd} is {target}: minivmm carries files, directories not yet read "
                            f"and the standard streams")
    return out
