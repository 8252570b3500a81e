"""A native process as the emulator's snapshot (``--accel native`` with ``--migrate`` or
``--snapshot-at``).

The snapshot is the one the emulator would write of the same program on the same view
(the ``native`` profile, the same masks and EVC mode), so that everything that resumes
or migrates an emulated VM takes it: the run is booted on the emulator (its registers,
descriptor tables and XCR0 as Linux sets them for the view) and then given the native
process's memory, registers and kernel state. Two things are the emulator's, not the
process's, and documented as such: XCR0 (natively the operating system's; here the
view's, so extended state the view hides is dropped) and the clock (the machine's
real time, as the program saw it natively).
"""

from __future__ import annotations

import base64
import os
import struct
from collections import Counter

import unicorn.x86_const as x86

from ..cpu import xstate
from ..linux.calls import TABLE
from ..linux.files import identity
from ..linux.kernel import UNKNOWN_KEPT
from ..linux.signals import xsave_layout
from ..linux.files_state import STREAMS
from ..masking.view import GuestCpuidView

GENERAL = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
           "r15", "rip")
LEGACY_SIZE = 512
NAMES = {nr: name for nr, (name, _) in TABLE.items()}


def load_registers(engine, host, regs, xsave: bytes) -> None:
    """The native task's registers into the emulator's engine: the general ones, RFLAGS,
    the FS and GS bases, and from its XSAVE image what the engine's XCR0 enables (x87,
    SSE, YMM, and with AVX-512 the opmask and ZMM state)."""
    uc = engine.uc
    for name in GENERAL:
        uc.reg_write(getattr(x86, f"UC_X86_REG_{name.upper()}"), getattr(regs, name))
    uc.reg_write(x86.UC_X86_REG_RFLAGS, regs.eflags)
    uc.reg_write(x86.UC_X86_REG_FS_BASE, regs.fs_base)
    uc.reg_write(x86.UC_X86_REG_GS_BASE, regs.gs_base)
    xcr0 = engine.read_xcr0()
    if xcr0 is None:
        xstate.fxrstor_image(uc, xsave[:LEGACY_SIZE])
        return
    held = 0x7 | (0xE0 if engine.opmasks is not None else 0)
    area = bytearray(xsave)
    header = struct.unpack_from("<Q", area, LEGACY_SIZE)[0]
    struct.pack_into("<Q", area, LEGACY_SIZE, header & xcr0 & held)   # what the view hides stays behind
    components = xsave_layout(GuestCpuidView.for_host(host))
    xstate.xrstor(uc, 0, lambda at, size: bytes(area[at:at + size]).ljust(size, b"\0"), xcr0, xcr0 & held,
                  components, held, engine.opmasks)


def by_name(calls: Counter) -> tuple[dict[str, int], dict[int, int]]:
    """System calls counted by number: those of the emulator's table by name, the others."""
    return (dict(sorted((NAMES[nr], n) for nr, n in calls.items() if nr in NAMES)),
            {nr: n for nr, n in sorted(calls.items()) if nr not in NAMES})


def process_state(template: dict, process, layout: tuple[int, int], stderr: bytes, calls: Counter,
                  sample: list[int], cpuinfo: str) -> dict:
    """The kernel state of a snapshot (linux/state.py) for the native process, on the
    emulator's ``template`` of the same program: its id, arguments, mappings, heap,
    descriptors, signal dispositions, mask and alternate stack, working directory and
    umask; the machine's file system at / (what the process saw); the machine's clock;
    /proc/cpuinfo the view's (``cpuinfo``), as it read it natively."""
    _, stack_bottom = layout
    maps = []
    for area in sorted(process.areas, key=lambda a: a.start):
        name = "[stack]" if area.start == stack_bottom else "" if area.anonymous and not area.name.startswith("[") \
            else area.name
        name = name.removesuffix(" (deleted)") if name.startswith("/") else name
        maps.append([area.start, area.end, area.prot, name, area.offset if name.startswith("/") else 0, area.shared])
    files, cloexec = {}, []
    for fd, record in process.files.items():
        kept = {"path": record["path"], "flags": record["flags"], "offset": record["offset"], "kind": record["kind"]}
        if record["kind"] == "Stream":
            kept = template["files"][str(STREAMS[record["path"]])]
        elif record["kind"] == "HostFile":
            kept.update(host=record["path"], **identity(os.stat(record["path"])))
        elif record["kind"] == "MemoryFile":
            kept["data"] = base64.b64encode(cpuinfo.encode("latin-1")).decode()
        files[str(fd)] = kept
        if record["cloexec"]:
            cloexec.append(fd)
    counted, unknown = by_name(calls)
    kept_unknown = dict(list(unknown.items())[:UNKNOWN_KEPT])
    return {
        **template, "tid": process.pid, "brk_start": process.brk_start, "brk": process.brk,
        "mmap_top": stack_bottom - 4096, "stack_bottom": stack_bottom, "exe": process.exe, "argv": process.argv,
        "auxv": base64.b64encode(process.auxv).decode(), "maps": maps, "files": files, "cloexec": sorted(cloexec),
        "cwd": process.cwd, "umask": process.umask, "mounts": [["/", "/"]],
        "ppid": 1, "pgid": process.pid, "sid": process.pid, "execs": 0,
        "threads": [{**template["threads"][0], "tid": process.pid}],
        "machine": {**template["machine"], "first": process.pid, "next_pid": process.pid + 1},
        "signals": {"actions": {str(n): list(a) for n, a in sorted(process.actions.items())},
                    "blocked": process.blocked, "altstack": list(process.altstack), "pending": []},
        "clock": {**template["clock"], "calls": sum(calls.values()), "realtime": True},
        "stats": {"counts": counted, "unknown": {str(nr): n for nr, n in kept_unknown.items()},
                  "unknown_others": sum(n for nr, n in unknown.items() if nr not in kept_unknown),
                  "sample": [NAMES.get(nr, nr) for nr in sample]},
        "stderr": base64.b64encode(stderr).decode(), "stderr_left_out": 0,
    }
