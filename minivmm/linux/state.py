"""A Linux VM's kernel state in a snapshot (plain JSON, validated field by field before
anything is used). Each process's: the address space, the descriptors
(:mod:`~minivmm.linux.files_state`), signal dispositions, the mask and alternate stack,
the pending signals, its timers, the random generator, its threads. The VM's, which
its processes share: the clock, the system-call statistics, stderr, the mounts; and
under ``machine`` the other processes, the zombies and the pipes. A resume gets only
the mounts it grants (:func:`check_grants`)."""

from __future__ import annotations

import base64
import dataclasses
import re
from collections import Counter

from .. import digits
from ..errors import MinivmmError
from .calls import TABLE
from .calls.processes import vfork_wait
from .cpuinfo import cpuinfo
from .events import MAX_EPOLL_DEPTH
from .files import MAX_FDS, recount
from .files_state import Numbering, Reopening, b64, files_record, pipe_is_valid, validate_files
from .kernel import STDERR_KEPT, UNKNOWN_KEPT, Kernel
from .memory import PAGE, AddressSpace
from .proc import own_trees
from .process import SAMPLE, Process
from .scheduler import MAX_PROCESSES, Zombie
from .signals import MAX_QUEUED, Action, Queued, xsave_layout
from .start import ARG_ROOM
from .threads import MAX_THREADS, Thread, Threads
from .timers import MAX_TIMERS, Timer
from .vfs import MAX_MOUNTS, PATH_MAX, FileSystem, Mount

FORMAT = 5                # 2: a file of the machine is known by its inode and change time too; 3: timers,
                          # pending signals, the clock's work-driven time and epoch; 4: threads; 5: the VM's
                          # other processes, descriptions numbered over the VM, pipes, eventfds and epolls
READ_FORMATS = (3, 4, 5)  # a format 3 state is a process of one thread, format 3 and 4 a VM of one process
NAMES = frozenset(name for name, _ in TABLE.values())   # the system calls counted by name
NSIG = 64

# Each list and string is bounded by what minivmm makes: paths by PATH_MAX (vfs keeps
# every path below it), descriptors by MAX_FDS, mounts by MAX_MOUNTS, argv by ARG_ROOM
# (execve's quarter of the stack), stderr by STDERR_KEPT, the statistics by UNKNOWN_KEPT
# numbers and SAMPLE calls, processes by MAX_PROCESSES, and:
MAX_STATE = 64 << 20      # the whole state: stderr's 16 MiB take 22 MB of base64, the rest far less
MAX_MAPS = 65530          # mappings: Linux's vm.max_map_count (DEFAULT_MAX_MAP_COUNT)
MAX_AUXV = PAGE           # the auxiliary vector: build_stack writes 20 pairs, 320 bytes
MAX_PENDING = 31 + MAX_QUEUED + MAX_TIMERS   # standard signals once, real-time ones sent, one per timer
MAX_PIPES = MAX_FDS * MAX_PROCESSES // 2      # each has two ends
THREAD_VALUES = 1200      # a thread's record: its fields and the snapshot's registers (about 230 names, 4 values
                          # for a descriptor table, 2 per x87 register)
RESUMES = ("run", "again", "result", "start", "vfork")   # how a thread goes on: where it is, its system call
                          # made again, a result its wait left, a new thread's first run, or vfork's wait for
                          # its child (``result``) going on
TIMER_FIELDS = dataclasses.fields(Timer)
VM_WIDE = ("mounts", "clock", "stats", "stderr", "stderr_left_out")   # kept once: the VM's processes share them
# The lists and objects, and their elements, that a state within those bounds holds:
# snapshot.py counts them before json.loads builds any (a few bytes such as "[]," make
# a hundred bytes of Python objects, so the section's size alone bounds too little).
# Elements: an argument per 9 bytes of ARG_ROOM, 7 per mapping, 16 per descriptor (its
# fields, its cloexec), 3 per mount, 5 per signal, 5 per pending signal, one more than
# its fields per timer, the generator's 625 words, the statistics, and the state's own
# fields. The VM's processes together get the bounds of one (``save`` refuses more).
JSON_CONTAINERS = 26 + MAX_FDS + MAX_MAPS + MAX_MOUNTS + NSIG + MAX_PENDING + 3 + MAX_TIMERS + 40 * MAX_THREADS
JSON_VALUES = (80 + ARG_ROOM // 9 + 7 * MAX_MAPS + 16 * MAX_FDS + 3 * MAX_MOUNTS + 5 * NSIG + 625 + SAMPLE
               + len(NAMES) + UNKNOWN_KEPT + 5 * MAX_PENDING + (len(TIMER_FIELDS) + 1) * (3 + MAX_TIMERS)
               + THREAD_VALUES * MAX_THREADS)
BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def thread_record(thread, regs: dict | None) -> dict:
    """A thread as a snapshot keeps it: its per-thread kernel state, its registers (None
    for the running thread: the snapshot's own), and how it goes on. A thread waiting
    in a system call makes that call again (a futex wait checks its word again, a read
    finds its pipe again), as after a spurious wake-up; vfork's parent waits on."""
    resume, call, result, start = "run", [0, 0], 0, [0, -1]
    waited = thread.wait.call if thread.wait is not None else thread.again
    if thread.wait is not None and thread.wait.vfork:
        resume, result = "vfork", thread.wait.vfork
    elif waited is not None:
        resume, call = "again", list(waited)
    elif thread.start is not None:
        resume, start = "start", [thread.start[0], -1 if thread.start[1] is None else thread.start[1]]
    elif thread.result is not None:
        resume, result = "result", thread.result & (1 << 64) - 1
    return {"tid": thread.tid, "blocked": thread.blocked, "altstack": list(thread.altstack),
            "saved_mask": -1 if thread.saved_mask is None else thread.saved_mask,
            "clear_child_tid": thread.clear_child_tid, "robust": list(thread.robust_list), "regs": regs,
            "resume": resume, "call": call, "result": result, "start": start}


def capture(current: Kernel, threads: dict[int, list[dict]]) -> dict:
    """The VM's kernel state: the running process's, what the VM's processes share, and
    under ``machine`` every other process (live ones, and zombies by what wait4 tells of
    them) and the pipes. ``threads``: each live process's thread records
    (:func:`thread_record`), its running one first. Raises MinivmmError naming what
    cannot be carried."""
    machine, p = current.machine, current.p
    numbering = Numbering()
    state = _process(current, threads[p.tid], numbering)
    others = [_process(k, threads[k.p.tid], numbering) for k in machine.live() if k is not current]
    zombies = [[k.p.tid, k.p.ppid, k.p.group, k.p.session, k.p.status, k.p.exit_status]
               for _, k in sorted(machine.kernels.items()) if k.p.exit_status is not None]
    state.update({
        "format": FORMAT, "mounts": [[m.host, m.guest] for m in current.fs.mounts],
        "clock": {"calls": current.clock.calls, "code_ns": current.clock.counter[0],
                  "kernel_ns": current.clock.kernel_ns, "slept_ns": current.clock.slept_ns,
                  "epoch": current.clock.epoch, "realtime": current.clock.realtime},
        "stats": {"counts": dict(p.counts), "unknown": {str(n): c for n, c in p.unknown.items()},
                  "unknown_others": p.unknown_others, "sample": list(p.sample)},
        "stderr": b64(p.stderr), "stderr_left_out": p.stderr_left_out,
        "machine": {"first": machine.first, "next_pid": machine.next_pid, "processes": others, "zombies": zombies,
                    "pipes": numbering.finish()}})
    return state


def _process(kernel: Kernel, threads: list[dict], numbering: Numbering) -> dict:
    """One process's own state: its memory's layout, descriptors, signals, timers, threads."""
    p = kernel.p
    return {
        "brk_start": p.brk_start, "brk": p.brk, "mmap_top": p.mmap_top, "stack_bottom": p.stack_bottom,
        "exe": p.exe, "argv": list(p.argv), "tid": p.tid, "auxv": b64(p.auxv), "maps": p.memory.state(),
        "files": files_record(kernel.fds, numbering), "cloexec": sorted(kernel.fds.cloexec), "cwd": kernel.cwd,
        "umask": kernel.umask, "ppid": p.ppid, "pgid": p.group, "sid": p.session, "execs": p.execs,
        "signals": {"actions": {str(n): [a.handler, a.flags, a.restorer, a.mask]
                                for n, a in sorted(kernel.signals.actions.items())},
                    "blocked": kernel.signals.blocked, "altstack": list(kernel.signals.altstack),
                    "pending": [[q.signo, q.code, b64(q.fields), -1 if q.timer is None else q.timer]
                                for q in kernel.signals.pending]},
        "timers": {"itimers": [list(dataclasses.astuple(t)) for t in kernel.timers.itimers],
                   "posix": [list(dataclasses.astuple(t)) for t in kernel.timers.posix.values()],
                   "next_id": kernel.timers.next_id},
        "random": list(kernel.random.getstate()[1]), "threads": threads,
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


CHECKS = (_int, _path, _is_b64, _numbered)


def validate(state, memory: int) -> None:
    """Raise ValueError naming the first field that is not what this format holds."""
    def need(ok, what):
        if not ok:
            raise ValueError(what)
    need(isinstance(state, dict) and state.get("format") in READ_FORMATS,
         f"format is not one of {', '.join(map(str, READ_FORMATS))}")
    _validate_process(state, need, memory, state["format"], running=True)
    mounts = state.get("mounts")
    need(isinstance(mounts, list) and len(mounts) <= MAX_MOUNTS and all(
        isinstance(m, list) and len(m) == 2 and all(_path(x) and x.startswith("/") for x in m) for m in mounts),
        f"mounts is not a list of at most {MAX_MOUNTS} [host, guest]")
    clock = state.get("clock")
    need(isinstance(clock, dict) and all(_int(clock.get(k)) for k in ("calls", "code_ns", "kernel_ns", "slept_ns",
                                                                       "epoch"))
         and isinstance(clock.get("realtime"), bool), "clock is malformed")
    need(_is_b64(state.get("stderr"), STDERR_KEPT), f"stderr is not base64 of at most {STDERR_KEPT} bytes")
    stats = state.get("stats")
    need(isinstance(stats, dict) and isinstance(stats.get("counts"), dict)
         and all(k in NAMES and _int(v) for k, v in stats["counts"].items())
         and isinstance(stats.get("unknown"), dict) and len(stats["unknown"]) <= UNKNOWN_KEPT
         and _numbered(stats["unknown"], 0, (1 << 64) - 1) and all(_int(v) for v in stats["unknown"].values())
         and _int(stats.get("unknown_others")) and isinstance(stats.get("sample"), list)
         and len(stats["sample"]) <= SAMPLE and all(x in NAMES if isinstance(x, str) else _int(x)
                                                    for x in stats["sample"])
         and _int(state.get("stderr_left_out")), "stats are malformed")
    if state["format"] >= 5:
        _validate_machine(state, need, memory)


def _validate_process(state, need, memory: int, version: int, running: bool) -> None:
    """One process's own fields (``running``: the process the snapshot's registers are
    of; in another, every thread has its registers)."""
    for key in ("brk_start", "brk", "mmap_top", "stack_bottom"):
        need(_int(state.get(key), 0, memory), f"{key} is not an address in the guest's RAM")
    need(_int(state.get("tid"), 1, 1 << 22) and _int(state.get("umask"), 0, 0o777), "tid or umask is out of range")
    argv = state.get("argv")
    need(isinstance(argv, list) and all(isinstance(a, str) for a in argv)
         and sum(len(a) + 9 for a in argv) <= ARG_ROOM, f"argv is not a list of strings within {ARG_ROOM} bytes")
    for key in ("exe", "cwd"):
        need(_path(state.get(key)), f"{key} is not a path shorter than {PATH_MAX}")
    need(_is_b64(state.get("auxv"), MAX_AUXV), f"auxv is not base64 of at most {MAX_AUXV} bytes")
    maps = state.get("maps")
    need(isinstance(maps, list) and len(maps) <= MAX_MAPS and all(
        isinstance(m, list) and len(m) == 6 and _int(m[0], 0, memory) and _int(m[1], 0, memory) and m[0] < m[1]
        and _int(m[2], 0, 7) and _path(m[3]) and _int(m[4]) and isinstance(m[5], bool) for m in maps),
        f"maps is not a list of at most {MAX_MAPS} [start, end, prot, name, offset, shared]")
    _validate_threads(state, need, running or version >= 5, running)
    files = state.get("files")
    validate_files(files, need, CHECKS)
    cloexec = state.get("cloexec")
    need(isinstance(cloexec, list) and len(cloexec) <= MAX_FDS
         and all(_int(fd, 0, MAX_FDS - 1) and str(fd) in files for fd in cloexec),
         "cloexec is not a list of open descriptors")
    need(version < 5 or all(_int(state.get(k), 0, 1 << 22) for k in ("ppid", "pgid", "sid", "execs")),
         "ppid, pgid, sid or execs is out of range")
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


def _validate_threads(state, need, required: bool, running: bool) -> None:
    """The thread records (a format 3 state has none); in the ``running`` process the
    first is the running thread, whose registers are the snapshot's."""
    threads = state.get("threads", [])
    need(isinstance(threads, list) and 1 <= len(threads) <= MAX_THREADS if "threads" in state or required
         else True, f"threads is not a list of 1 to {MAX_THREADS} records")
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
             and _int(t["start"][1], -1) and (t.get("regs") is None) == (i == 0 and running)
             and (t["regs"] is None or isinstance(t["regs"], dict)), f"thread {i} is malformed")
        tids.add(t["tid"])


def _validate_machine(state, need, memory: int) -> None:
    """The other processes, the zombies and the pipes; what they share, consistent."""
    machine = state.get("machine")
    need(isinstance(machine, dict) and isinstance(machine.get("processes"), list)
         and len(machine["processes"]) < MAX_PROCESSES and isinstance(machine.get("zombies"), list)
         and len(machine["zombies"]) <= MAX_PROCESSES and isinstance(machine.get("pipes"), list)
         and len(machine["pipes"]) <= MAX_PIPES and _int(machine.get("next_pid"), 1, 1 << 22)
         and _int(machine.get("first"), 1, 1 << 22), "machine is malformed")
    for i, process in enumerate(machine["processes"]):
        def within(ok, what, i=i):
            need(ok, f"process {i + 1}: {what}")
        within(isinstance(process, dict) and not set(VM_WIDE + ("format", "machine")) & set(process),
               "is not a process's own state")
        _validate_process(process, within, memory, state["format"], running=False)
    need(all(isinstance(z, list) and len(z) == 6 and all(_int(x, 0, 1 << 22) for x in z[:4])
             and _int(z[4], 0, 0xFFFF) and _int(z[5], 0, 255) for z in machine["zombies"]), "zombies are malformed")
    need(all(pipe_is_valid(pipe, _int, _is_b64) for pipe in machine["pipes"]), "pipes are malformed")
    processes = [state] + machine["processes"]
    pids = [p["tid"] for p in processes] + [z[0] for z in machine["zombies"]]
    tids = [t["tid"] for p in processes for t in p["threads"]]
    need(len(set(pids)) == len(pids) and len(set(tids)) == len(tids) and machine["first"] in pids[:len(processes)],
         "process or thread ids repeat, or the first process is not live")
    described: dict[int, dict] = {}
    for p in processes:
        for fd, record in p["files"].items():
            if "id" in record:
                need(described.setdefault(record["id"], record) == record,
                     f"descriptor {fd} of process {p['tid']} differs from another of description {record['id']}")
            need(record.get("kind") != "PipeEnd" or record["pipe"] < len(machine["pipes"]),
                 f"descriptor {fd} of process {p['tid']} names a pipe that does not exist")
    need(all(i[1] in described for r in described.values() if r["kind"] == "Epoll" for i in r["interest"]),
         "an epoll watches a description that does not exist")
    need(all(_epoll_depth(n, described, ()) <= MAX_EPOLL_DEPTH for n, r in described.items() if r["kind"] == "Epoll"),
         f"epolls watch one another in a loop, or more than {MAX_EPOLL_DEPTH} deep")
    parents = {p["tid"]: p.get("ppid") for p in processes} | {z[0]: z[1] for z in machine["zombies"]}
    for p in processes:
        for t in p["threads"]:
            child = t["result"]   # (a child reaped since is no longer anywhere: the wait ends at once)
            need(t["resume"] != "vfork" or child != p["tid"] and parents.get(child, p["tid"]) == p["tid"],
                 f"thread {t['tid']} waits on vfork for a process that is not its child")


def _epoll_depth(number: int, described: dict, path: tuple) -> int:
    """How deep the epoll ``number`` nests others (itself included); a loop, or past
    MAX_EPOLL_DEPTH: more than MAX_EPOLL_DEPTH."""
    if number in path or len(path) > MAX_EPOLL_DEPTH:
        return MAX_EPOLL_DEPTH + 1
    inner = [i[1] for i in described[number]["interest"] if described.get(i[1], {}).get("kind") == "Epoll"]
    return 1 + max((_epoll_depth(n, described, path + (number,)) for n in inner), default=0)


def _timer(value) -> bool:
    """A timer's fields in order (timers.Timer): a signal's number, booleans where it has
    them, else whole numbers."""
    return isinstance(value, list) and len(value) == len(TIMER_FIELDS) and _int(value[0], 1, NSIG) and all(
        isinstance(v, bool) if isinstance(f.default, bool) else _int(v, -(1 << 63))
        for v, f in zip(value, TIMER_FIELDS))


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

# ---- restoring -----------------------------------------------------------------------------

def restore(state: dict, rams: list, host, view, console, options, origin: str) -> list[Kernel]:
    """The kernels of a snapshot's processes, the running one first, each over its RAM
    in ``rams`` (already holding its memory: the running process's, then the others' in
    the state's order), in one machine, on ``host`` with the VM's ``view``
    (/proc/cpuinfo), writing to ``console``; ``options`` give standard input and the
    terminal, and the mounts the resume granted (checked with :func:`check_grants`):
    the program sees those, whatever the snapshot says."""
    machine_record = state.get("machine", {"processes": [], "zombies": [], "pipes": []})
    records = [state] + machine_record["processes"]
    kernels = [_kernel(record, ram, state, host, view, console, options, origin) for record, ram in zip(records, rams)]
    first = kernels[0]
    machine = first.machine
    reopening = Reopening(machine_record["pipes"], machine.new_pipe)
    for kernel, record in zip(kernels, records):
        _reopen_files(kernel, record, reopening, origin)
    reopening.finish(origin)
    recount([kernel.fds for kernel in kernels])
    clock, p = first.clock, first.p
    clock.calls, clock.counter[0] = state["clock"]["calls"], state["clock"]["code_ns"]
    clock.kernel_ns, clock.slept_ns = state["clock"]["kernel_ns"], state["clock"]["slept_ns"]
    clock.counter[5] = (clock.kernel_ns + clock.slept_ns) & ((1 << 64) - 1)
    p.counts, p.unknown = Counter(state["stats"]["counts"]), Counter({int(k): v for k, v in
                                                                      state["stats"]["unknown"].items()})
    p.unknown_others, p.sample = state["stats"]["unknown_others"], list(state["stats"]["sample"])
    p.stderr, p.stderr_left_out = bytearray(base64.b64decode(state["stderr"])), state["stderr_left_out"]
    machine.kernels = {}
    for kernel in kernels:   # one clock, one set of statistics, one machine
        kernel.clock, kernel.timers.clock, kernel.machine = clock, clock, machine
        kernel.p.counts, kernel.p.unknown, kernel.p.sample, kernel.p.stderr = p.counts, p.unknown, p.sample, p.stderr
        machine.kernels[kernel.p.tid] = kernel
    for pid, ppid, pgid, sid, status, exit_status in machine_record["zombies"]:
        machine.kernels[pid] = Zombie(Process(None, 0, 0, 0, 0, "", tid=pid, ppid=ppid, pgid=pgid, sid=sid,
                                              status=status, exit_status=exit_status))
    if "first" in machine_record:
        machine.first, machine.next_pid = machine_record["first"], machine_record["next_pid"]
    machine.current = first.p.tid
    for kernel, record in zip(kernels, records):
        for thread_state in record.get("threads", []):
            if thread_state["resume"] == "vfork":
                child = thread_state["result"]
                kernel.threads.all[thread_state["tid"]].wait = vfork_wait(child, machine.kernels.get(child))
    for kernel in reversed(kernels):   # the clock stops the engine for one deadline: the running process's
        kernel.timers.arm()
    return kernels


def _kernel(record: dict, ram, state: dict, host, view, console, options, origin: str) -> Kernel:
    """One process's kernel, but for its descriptors (:func:`_reopen_files`)."""
    memory = AddressSpace(ram)
    try:
        memory.restore(record["maps"])
    except ValueError as e:
        raise MinivmmError(f"{origin}: process {record['tid']}: {e}") from None
    p = Process(memory, record["brk_start"], record["brk"], record["mmap_top"], record["stack_bottom"],
                record["exe"], tid=record["tid"], auxv=base64.b64decode(record["auxv"]), argv=list(record["argv"]),
                ppid=record.get("ppid", 1), pgid=record.get("pgid"), sid=record.get("sid"),
                execs=record.get("execs", 0))
    fs = FileSystem(list(options.mounts), {})
    p.stdout_sink = console
    kernel = Kernel(p, fs, 0, options.stdin, state["clock"]["realtime"], options.terminal, xsave_layout(view),
                    state["clock"]["epoch"])
    fs.own = own_trees(p, cpuinfo(host, view))
    kernel.view = view
    kernel.random.setstate((3, tuple(record["random"]), None))
    kernel.cwd, kernel.umask = record["cwd"], record["umask"]
    signals = record["signals"]
    kernel.signals.actions = {int(n): Action(*a) for n, a in signals["actions"].items()}
    kernel.signals.blocked, kernel.signals.altstack = signals["blocked"], tuple(signals["altstack"])
    kernel.signals.pending = [Queued(signo, code, base64.b64decode(fields), None if timer < 0 else timer)
                              for signo, code, fields, timer in signals["pending"]]
    timers = record["timers"]
    kernel.timers.itimers = [Timer(*t) for t in timers["itimers"]]
    kernel.timers.posix = {t[3]: Timer(*t) for t in timers["posix"]}
    kernel.timers.next_id = timers["next_id"]
    threads = record.get("threads")
    if threads:
        kernel.threads = Threads(p.tid, 0)
        kernel.threads.all = {r["tid"]: _thread(r) for r in threads}
        kernel.threads.current = threads[0]["tid"]
        kernel.threads.next_tid = max(kernel.threads.all) + 1
        kernel.signals.current = kernel.threads.current
    return kernel


def _reopen_files(kernel: Kernel, record: dict, reopening: Reopening, origin: str) -> None:
    files = record["files"]
    reopened = {int(fd): reopening.description(kernel, int(fd), files[fd], origin)
                for fd in sorted(files, key=int) if "same_as" not in files[fd]}
    kernel.fds.table = {int(fd): reopened[entry["same_as"]] if "same_as" in entry else reopened[int(fd)]
                        for fd, entry in files.items()}
    kernel.fds.cloexec = set(record["cloexec"])


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
