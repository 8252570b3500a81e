"""The virtual machine: guest RAM, a vCPU on an emulated host, and the run loop.

Power-on builds the machine state of docs/abi.md (long mode, GDT, CR0/CR4/XCR0,
stack at the top of RAM), freezes the guest CPUID view, and wires the exit
handlers of :mod:`minivmm.vmm.exits`. ``run`` executes until the guest powers off,
halts, crashes or exhausts a budget, and never lets a guest take the VMM down.
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import re
import select
import shlex
import signal
import struct
import threading
import time

import unicorn.x86_const as x86
from iced_x86 import Code, Decoder, Mnemonic
from unicorn import (UC_ARCH_X86, UC_HOOK_INTR, UC_HOOK_MEM_UNMAPPED, UC_MEM_FETCH_UNMAPPED,
                     UC_MEM_READ_UNMAPPED, UC_MEM_WRITE_UNMAPPED, UC_MODE_64, UC_PROT_ALL, UC_PROT_WRITE, Uc,
                     UcError)

from ..cpu import isa, xstate
from ..cpu.features import catalogue
from ..cpu.native import machine_features
from ..cpu.profiles import HostProfile, load_profile
from ..errors import MinivmmError, NotCarried
from ..files import check_output
from ..guests.loader import LOAD_ADDRESS, GuestImage, load_guest
from ..linux import compat, vdso
from ..linux.calls import CPU_FREE, RETURNED
from ..linux.clock import CODE_NS_SHIFT
from ..linux.start import Options as LinuxOptions
from ..linux.start import execve
from ..linux.binfmt import stack_layout
from ..linux.cpuinfo import cpuinfo
from ..linux.process import xfeatures
from ..linux.state import capture as capture_process
from ..linux.state import thread_record
from ..linux.state import check_grants
from ..linux.state import restore as restore_process
from ..masking.compat import compatibility
from ..masking.evc import evc_mode
from ..masking.formats import format_mask, self_contained
from ..masking.view import CR4_OSXSAVE, GuestCpuidView
from . import MAX_MASKS, MAX_MEMORY, MIN_MEMORY
from . import engine as engine_module
from .accelerated import ACCELERATORS, check_view, run_on_kvm
from . import from_native, remote, supervised, wire
from .audit import Audit
from .log import ExitLog
from .engine import counted_so_far as engine_counter
from .engine import read_xcr0 as xcr0_from_context
from .exits import CpuidExitHandler, FaultExits, InstructionExits, IoExits
from .exits.quick import QuickExits
from .exits.refusals import fast_paths, refusals_for
from .exits.traps import PORT_IO, TRAP
from .exits.emulate import bit_scan
from .exits.native import NativeExecutor
from .exits.xsave import XsaveUnit
from .exits.privileged import CHECKED_CODES, CHECKED_MNEMONICS, PrivilegedExits
from .exits import x87 as x87_exits
from .exits.x87 import X87Exceptions
from .migration import (MAX_COUNT, PAGE, POLICIES, MigrationRequest, PreCopy, Trigger, policy_refusal, precopy,
                        trigger_of, unreached)
from .ram import touched_pages
from .report import SIGNALS, RunResult, Stop
from .snapshot import Snapshot, read_registers
from .snapshot import save as save_snapshot
from .snapshot import write_registers

DEFAULT_MEMORY = 16 << 20
MAX_TIMEOUT = 7 * 24 * 3600.0               # seconds: a week is no budget
GDT_BASE = 0x1000
VMM_AREA = (0x1000, 0x2000)       # reserved for the VMM's tables (docs/abi.md)
BOOT_STUB = 0x1800                # inside the VMM area: sets XCR0 before the guest runs
GDT = struct.pack("<QQQ", 0, 0x00209A0000000000, 0x0000920000000000)  # null, 64-bit code, data
IRETQ, SYSCALL = bytes.fromhex("48cf"), bytes.fromhex("0f05")
CODE_SELECTOR, DATA_SELECTOR = 0x08, 0x10
CR0_BOOT = 0x33                   # PE | MP | ET | NE; not EM, not TS
CR4_BOOT = 0x600                  # OSFXSR | OSXMMEXCPT: without them every SSE op is #UD
MXCSR_RESET = 0x1F80              # SDM Vol. 1, 10.2.3: every exception masked (the engine starts at 0)
# x87 as firmware hands it over (UEFI's x64 hand-off: FNINIT's 0x37F, every exception
# masked, extended precision); the engine starts at 0, all unmasked in single precision.
FCW_HANDOFF = 0x37F
XCR0_BOOT = 0x3                   # x87 | SSE; the engine cannot execute AVX state
NEVER = 1 << 63                   # a non-canonical "until" address: run until stopped
MS_CHUNK = 2_000_000              # instructions between clock checks while an ms: point is pending
UNTIL_STOPPED = 1 << 62           # a count no run reaches: counting on, no limit
# Translated code kept at most (then it is all dropped and translated again as it runs):
# unicorn reserves 1 GiB, and code run once (a stack that ran over the program) fills it.
TRANSLATION_BUFFER = 64 << 20


def parse_size(text: str | int) -> int:
    """``64M``, ``1G``, ``512K``, ``16MiB`` or a byte count, in ASCII digits with the unit
    right after them ([0-9], not \\d, which reads '１６M' too)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"([0-9]{1,20})([kKmMgG]?)(i?[bB])?", str(text))
    if not m:
        raise MinivmmError(f"malformed size '{text}': use bytes or a number with K, M or G (e.g. 64M)")
    return int(m[1]) << {"": 0, "k": 10, "m": 20, "g": 30}[m[2].lower()]


def check_budgets(max_insns, timeout) -> None:
    """Budgets a run can honour: a NaN or infinite timeout would never fire."""
    if timeout is not None and not (isinstance(timeout, (int, float)) and 0 < timeout <= MAX_TIMEOUT):
        raise MinivmmError(f"timeout {timeout!r}: must be a number of seconds above 0 and at most {MAX_TIMEOUT:g}")
    if max_insns is not None and not (isinstance(max_insns, int) and 0 < max_insns <= MAX_COUNT):
        raise MinivmmError(f"instruction budget {max_insns!r}: must be a whole number from 1 to {MAX_COUNT}")


def boot_cr4(view: GuestCpuidView) -> int:
    """CR4 at power-on (docs/abi.md): OSFXSR and OSXMMEXCPT, and OSXSAVE where the
    guest's view has XSAVE."""
    return CR4_BOOT | (CR4_OSXSAVE if view.has(catalogue()["xsave"]) else 0)


class _Watchdog:
    """Stops the engine at the run's deadline, or when the user presses Ctrl-C.

    An asynchronous ``emu_stop`` is not instruction-precise in unicorn 2.1: a loop that
    is stopped from another thread and resumed computes a different result (the stop can
    land inside a block, after some of its stores). So the VMM never resumes after one:
    it only ends runs with it. Exact points (checkpoints, instruction counts, ms: points
    checked between counted chunks) stop the engine from its own thread."""

    def __init__(self, run):
        self._run = run
        self._deadline: float | None = None
        self._done = threading.Event()
        self.reason: str | None = None
        self._signals = None
        if threading.current_thread() is threading.main_thread():
            read, write = os.pipe()
            os.set_blocking(write, False)
            try:
                self._previous = signal.set_wakeup_fd(write)
                self._signals = (read, write)
                # Ctrl-C must not raise inside an engine callback: the wakeup fd tells
                # this thread, which stops the engine, and the run loop raises instead.
                self._previous_handler = signal.signal(signal.SIGINT, lambda *_: None)
            except ValueError:
                os.close(read)
                os.close(write)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def set_deadline(self, deadline: float | None) -> None:
        self._deadline = deadline

    def _loop(self):
        while not self._done.is_set():
            wait = 0.05
            if self._deadline is not None and not self.reason:
                wait = max(min(self._deadline - time.monotonic(), 0.05), 0)
            clock = self._run.kernel.clock if self._run.kernel else None
            timer = clock.realtime_wait() if clock is not None else None   # --realtime: the next timer
            if timer is not None:
                wait = max(min(wait, timer), 0)
            readable = []
            if self._signals:
                readable, _, _ = select.select([self._signals[0]], [], [], wait)
            else:
                self._done.wait(wait)
            if self._done.is_set():
                return
            if clock is not None:
                clock.wake()
            if readable:
                os.read(self._signals[0], 64)
                self.reason = self.reason or "interrupted"
            elif self._deadline is not None and time.monotonic() >= self._deadline:
                self.reason = self.reason or "deadline"
            if self.reason:
                # Again every 50 ms until the run loop closes the watchdog: a stop that
                # lands between two engine starts (pre-copy rounds, exits) stops nothing.
                self._run.uc.emu_stop()

    def close(self):
        self._done.set()
        if self._signals:
            os.write(self._signals[1], b"\0")  # wake the select now, not at its next timeout
        self._thread.join()
        if self._signals:
            signal.signal(signal.SIGINT, self._previous_handler)
            signal.set_wakeup_fd(self._previous)
            for fd in self._signals:
                os.close(fd)


class VM:
    """One guest on one host profile.

    >>> vm = VM("detect_cpuid", host="penryn")
    >>> result = vm.run(timeout=10)
    >>> result.detections["sse4_1"].cpuid
    True
    """

    def __init__(self, guest: GuestImage | str, host: HostProfile | str | None = None,
                 memory: int | str | None = None, evc: str | None = None, masks=(),
                 policy: str = "live", snapshot: Snapshot | None = None, linux: bool | None = None,
                 argv=(), env=None, seed: int = 0, mounts=(), stdin=None, realtime: bool = False,
                 terminal: bool = False, accel: str = "tcg"):
        """``linux`` runs an ELF as a Linux program (None: when the file says it is one),
        with ``argv`` after its name, ``env`` (default: a small fixed environment),
        ``seed`` for AT_RANDOM, getrandom and /dev/urandom, ``mounts`` (``HOST[:GUEST]``,
        read-only; nothing of the machine is visible otherwise), ``stdin`` (bytes, a file
        descriptor to pass through, or None: empty), ``realtime`` (the machine's clock,
        not the reproducible virtual one) and ``terminal`` (TCGETS on 0-2 answers as a
        terminal). ``memory`` defaults to what the guest declares (``; minivmm: memory 64M``),
        else 16 MiB. ``evc`` is a VMware EVC key; ``masks`` are :class:`Mask` objects or strings in
        any mask format, applied after the EVC mode's mask, in order. ``policy`` is the
        VM's migration policy (live, offline, disabled). ``snapshot`` resumes a saved VM
        (its CPUID view, frozen at its power-on, comes along). ``accel`` is ``tcg`` (the
        emulation engine), ``kvm`` (this machine's own CPU: ``host="native"``, a view
        that only hides features, an ABI guest) or ``native`` (a Linux program as a
        process of this machine under a ptrace supervisor, the same restrictions). The
        host defaults to nehalem, or native under ``accel="native"``."""
        if policy not in POLICIES:
            raise MinivmmError(f"unknown migration policy '{policy}' (live, offline, disabled)")
        if accel not in ACCELERATORS:
            raise MinivmmError(f"unknown accelerator '{accel}' (tcg, kvm, native)")
        if host is None:
            host = "native" if accel == "native" else "nehalem"
        self.memory_given = memory is not None
        if accel == "native":
            linux = True   # any ELF executable runs as the machine's own process
            for given, what in ((mounts, "--mount"), (seed, "--seed")):
                if given:
                    raise MinivmmError(f"--accel native: {what} does not apply to a process of this machine, "
                                       f"which sees the machine's files and random numbers")
        self.image = load_guest(guest, linux) if isinstance(guest, str) else guest
        if (argv or env is not None or mounts) and self.image.kind != "linux":
            raise MinivmmError(f"{self.image.name}: arguments, environment and mounts are for Linux programs (--linux)")
        self.linux = LinuxOptions.make(argv, env, seed, mounts, stdin, realtime, terminal)
        self.host = load_profile(host) if isinstance(host, str) else host
        # RAM: as asked, else what the guest declares, else 16 MiB.
        self.memory = parse_size(memory if memory is not None else self.image.memory or DEFAULT_MEMORY)
        self.evc = evc_mode(evc).key if evc is not None else None
        self.masks = tuple(masks)
        if len(self.masks) > MAX_MASKS:
            raise MinivmmError(f"{len(self.masks)} CPUID masks: at most {MAX_MASKS}")
        self.policy = policy
        self.snapshot = snapshot
        self.view = GuestCpuidView.for_host(self.host, self.evc, masks)
        self.accel = accel
        if accel == "native":
            if snapshot is not None:
                raise MinivmmError("--accel native runs a program from its start; snapshots resume on the emulator")
            supervised.check(self.host, self.view, self.image)
            return
        self._check_layout()
        if accel == "kvm":
            if self.image.kind == "linux" or snapshot is not None:
                raise MinivmmError("--accel kvm runs guests of the guest ABI from power-on; Linux programs and "
                                   "snapshots run on the emulator (--accel tcg)")
            check_view(self.host, self.view)

    @classmethod
    def resume(cls, snapshot: Snapshot, host: HostProfile | str | None = None, force: bool = False,
               **options) -> VM:
        """The VM saved in ``snapshot``, on ``host`` (default: the host it was saved on):
        refused, like a migration, if the host cannot run the view the VM was powered on
        with (unless forced), or if a Linux program had mounts or files of the machine
        that ``mounts=`` (``HOST[:GUEST]``, as for a run) does not grant."""
        meta = snapshot.meta
        kind = "linux" if snapshot.process is not None else "snapshot"

        def on(where):
            return cls(GuestImage(meta["guest"], kind, (), meta["entry"]), where, meta["memory"], evc=meta.get("evc"),
                       masks=meta.get("masks", ()), policy=meta.get("policy", "live"), snapshot=snapshot, **options)
        try:
            vm = on(meta["host"] if host is None else host)
        except MinivmmError:
            if not force or host is None:
                raise
            # forced onto a host that could not power on the VM's EVC mode: the view is the snapshot's anyway
            vm = on(meta["host"])
            vm.host = load_profile(host) if isinstance(host, str) else host
        if snapshot.process is not None:
            check_grants(snapshot.process, vm.linux.mounts, snapshot.origin)
        vm.view = GuestCpuidView.frozen(snapshot.view_table, vm.view.mask)
        missing, _ = compatibility(vm.view, vm.host, vm.host)
        if missing and not force:
            raise MinivmmError(f"cannot resume on {vm.host.name}: the VM's CPUID view has "
                               f"{', '.join(missing)}, which {vm.host.name} lacks (--force resumes anyway)")
        return vm

    def _check_layout(self):
        if self.memory % 4096 or not MIN_MEMORY <= self.memory <= MAX_MEMORY:
            raise MinivmmError(f"guest memory {self.memory} bytes: must be a multiple of 4 KiB, at least 2M "
                               f"and at most 4G")
        for addr, _, size in self.image.segments:
            end = addr + size
            if end > self.memory:
                raise MinivmmError(f"{self.image.name}: segment 0x{addr:x}-0x{end:x} lies beyond guest RAM "
                                   f"(0x{self.memory:x} bytes; raise --memory)")
            if addr < VMM_AREA[1] and end > VMM_AREA[0]:
                raise MinivmmError(f"{self.image.name}: segment 0x{addr:x}-0x{end:x} overlaps the VMM's "
                                   f"reserved area 0x1000-0x1fff")
        if not 0 <= self.image.entry < self.memory:
            raise MinivmmError(f"{self.image.name}: entry point 0x{self.image.entry:x} is outside guest RAM")

    # ---- running -------------------------------------------------------------------

    def run(self, max_insns: int | None = None, timeout: float | None = None, console=None,
            audit: bool = False, migrations=(), force: bool = False, snapshot_at: str | None = None,
            snapshot_file: str | None = None, precopy: PreCopy = PreCopy(), secret: bytes | None = None) -> RunResult:
        """Run to completion.

        ``console`` receives guest console bytes as they appear; ``audit`` reports
        instructions that need features the CPUID view hides; ``migrations`` are
        ``PROFILE@WHEN`` strings or :class:`MigrationRequest` objects, applied in order
        (``force`` overrides a failed compatibility check); ``snapshot_at`` (a WHEN)
        writes a snapshot to ``snapshot_file`` and carries on. A migration to
        ``tcp:ADDR:PORT`` goes to a ``minivmm receive`` there, proving ``secret``."""
        check_budgets(max_insns, timeout)
        if self.accel != "tcg":
            moving = () if self.accel == "native" else ((migrations, "--migrate"), (snapshot_at, "--snapshot-at"))
            for given, what in ((max_insns, "an exact --max-insns (the CPU counts no instructions for the VMM)"),
                                (audit, "--audit (the CPU executes hidden features without an exit)"), *moving):
                if given:
                    raise MinivmmError(f"--accel {self.accel}: {what} is not available on the machine's own CPU; "
                                       f"run on the emulator")
        if self.accel == "kvm":
            return run_on_kvm(self, timeout, console, (GDT, GDT_BASE, CR0_BOOT, boot_cr4(self.view), XCR0_BOOT,
                                                       MXCSR_RESET))
        events = self._events(migrations, snapshot_at, snapshot_file)
        if any(isinstance(e, MigrationRequest) and remote.is_remote(e.destination) for e in events):
            if self.accel != "tcg":
                raise MinivmmError(f"--accel {self.accel}: a migration over TCP moves an emulated VM; run on the "
                                   f"emulator")
            if secret is None:
                raise MinivmmError("a migration to tcp:ADDR:PORT needs the receiver's shared secret (--secret-file)")
        if self.accel == "native":
            return supervised.run_supervised(self, timeout, console, events, force)
        run = _Run(self, console, audit, events, force, precopy)
        run.secret = secret
        return run.run(max_insns, timeout)

    def _events(self, migrations, snapshot_at, snapshot_file) -> list:
        """The migrations and the snapshot point, checked before anything runs."""
        events = [MigrationRequest.parse(m) if isinstance(m, str) else m for m in migrations]
        if bool(snapshot_at) != bool(snapshot_file):
            raise MinivmmError("--snapshot-at and --snapshot-file go together: a snapshot needs a point and a file")
        if snapshot_at:
            check_output(snapshot_file, "snapshot", [self.image.path] if self.image.path else [])
            events.append((Trigger.parse(snapshot_at, "snapshot point"), snapshot_file))
        if any(trigger_of(e).kind == "syscall" for e in events) and self.image.kind != "linux":
            raise MinivmmError("syscall:N points are for Linux programs (--linux)")
        for event in events:
            if isinstance(event, MigrationRequest) and remote.is_remote(event.destination):
                wire.parse_address(event.destination[len(remote.PREFIX):], "--migrate")
            elif isinstance(event, MigrationRequest):
                load_profile(event.destination)  # unknown names fail before anything runs
        return events

    # ---- a native process moving into the emulator (supervised.py) ------------------

    def snapshot_of_native(self, process, console: bytes, stderr: bytes, calls, sample) -> Snapshot:
        """The emulator's snapshot of a native process of this VM's program: the run
        booted on the emulator with the same view, then given the process's memory,
        registers and kernel state (from_native.py)."""
        emulated = VM(self.image, self.host, memory=self.memory, evc=self.evc, masks=self.masks, policy=self.policy,
                      argv=self.linux.argv, env=self.linux.env, mounts=["/"], realtime=True)
        run = _Run(emulated, None, False, [], False, PreCopy())
        ram = run.engine.ram
        for mapping in run.kernel.p.memory.maps:   # the image the boot loaded gives way to the process's
            ram[mapping.start:mapping.end] = bytes(mapping.end - mapping.start)
        for start, data in process.contents.items():
            ram[start:start + len(data)] = data
        from_native.load_registers(run.engine, self.host, process.regs, process.xsave)
        snapshot = run._snapshot(copy=False)
        snapshot.console = console
        snapshot.process = from_native.process_state(snapshot.process, process, stack_layout(self.memory), stderr,
                                                     calls, sample, cpuinfo(self.host, self.view))
        snapshot.check("the native process's snapshot")
        return snapshot

    def continue_native(self, snapshot: Snapshot, destination: str, force: bool, events, console):
        """The moved program on ``destination``, ready to run (``run(None, timeout)``) to its
        end and its remaining events."""
        vm = VM.resume(snapshot, destination, force=force, mounts=["/"], stdin=self.linux.stdin, realtime=True,
                       terminal=self.linux.terminal)
        return _Run(vm, console, False, list(events), force, PreCopy())

    def classifier(self, host: HostProfile, view: GuestCpuidView, audit: bool, x87: X87Exceptions | None = None):
        """What an exit at each instruction does on this host (cached per opcode, until
        ``x87`` starts or stops checking waiting x87 instructions)."""
        physical = host.physical
        shown = catalogue().decode(view.table) if audit else frozenset()
        actions = {isa.Verdict.RUN: None, isa.Verdict.UD: "ud", isa.Verdict.UNSUPPORTED: "unsupported",
                   isa.Verdict.AS_BSR: "bsr", isa.Verdict.AS_BSF: "bsf"}
        cache: dict[int, tuple] = {}
        # HLT and OUT are the ABI's power-off and console; in a Linux program's ring 3
        # they are #GP (SDM Vol. 2: CPL > 0, CPL > IOPL), as the engine raises them.
        linux = self.image.kind == "linux"
        exit_mnemonics = {} if linux else EXIT_MNEMONICS

        x87 = x87 or X87Exceptions()
        seen = x87.generation

        def classify(instr):
            nonlocal seen
            if seen != x87.generation:
                cache.clear()
                seen = x87.generation
            result = cache.get(instr.code)
            if result is None:
                if instr.code == Code.INVALID:
                    result = (None, frozenset())
                else:
                    needs = isa.needed_features(instr)
                    action = exit_mnemonics.get(instr.mnemonic) or actions[isa.verdict(needs, instr.mnemonic, physical, instr.code)]
                    if linux and action != "ud" and (instr.mnemonic in PORT_IO or
                                                     action is not None and instr.is_privileged):
                        action = "gp"  # what the engine at CPL 3 does not refuse itself, or an exit would carry out
                    elif action is None and (instr.mnemonic in CHECKED_MNEMONICS or instr.code in CHECKED_CODES) \
                            and not (linux and instr.mnemonic == Mnemonic.SYSCALL):  # the engine's hook (_Engine)
                        action = "privileged"
                    elif action is None and instr.mnemonic in x87_exits.CONTROL_LOADS:
                        action = "x87 control"
                    elif action is None and (instr.mnemonic in x87_exits.CARRIED_OUT
                                             or x87.checking and x87_exits.waiting(instr)):
                        action = "x87"
                    result = (action, needs - shown - isa.hinted(instr.mnemonic) if audit else frozenset())
                cache[instr.code] = result
            return result

        classify.swept_only = swept_only_opcodes(linux, physical, audit, fast_paths())
        return classify


def swept_only_opcodes(linux: bool, physical: frozenset[str], audit: bool, fast: bool = True) -> bytes:
    """The opcode bytes after which every instruction exits only where a linear sweep
    finds it (traps.swept): WAIT; a Linux program's port I/O (#GP at CPL 3); with the
    fast paths, LOCK (lockable ALU forms need nothing; the rest is a misused LOCK), and
    x87's D8-DF where FISTTP's SSE3 is the host's and no audit asks about it (FCMOV's
    CMOV is every x86-64's). Checked against the classifier over every ModRM
    (tests/test_isa.py)."""
    opcodes = b"\x9b"
    if linux:
        opcodes += bytes((*range(0xE4, 0xE8), *range(0xEC, 0xF0), *range(0x6C, 0x70)))
    if fast:
        opcodes += b"\xf0"
        if "pni" in physical and not audit:
            opcodes += bytes(range(0xD8, 0xE0))
    return opcodes


EXIT_MNEMONICS = {Mnemonic.HLT: "hlt", Mnemonic.OUT: "out"}
# Port I/O is #GP at CPL 3 with IOPL 0, which Linux keeps (SDM Vol. 1, 18.2.1; Vol. 2, IN,
# OUT, INS, OUTS), and the engine checks no I/O permission at any CPL (the exits go where
# traps.swept says). CLI, STI and what needs CPL 0 the engine refuses at CPL 3 itself.


class _Engine:
    """A host's half of a run: the unicorn instance, the guest RAM it maps, and the
    exits whose answers depend on the host (ISA, faults, CPUID's host name)."""

    def __init__(self, run: _Run, host: HostProfile, view: GuestCpuidView):
        vm = run.vm
        self.host, self.view = host, view
        self._counted = False
        self.limit: int | None = None
        uc = self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.ctl_set_cpu_model(getattr(x86, f"UC_CPU_X86_{host.engine_model}"))
        uc.ctl_set_tcg_buffer_size(TRANSLATION_BUFFER)
        # Guest RAM is a host buffer the engine maps: the VMM reads it without the engine.
        try:
            self.ram = mmap.mmap(-1, vm.memory)
        except OSError as e:
            raise MinivmmError(f"cannot allocate {vm.memory >> 20} MiB of guest RAM on this machine: "
                               f"{e.strerror}") from None
        uc.mem_map_ptr(0, vm.memory, UC_PROT_ALL, ctypes.addressof(ctypes.c_char.from_buffer(self.ram)))
        self._fail = run._fail
        self.exits = InstructionExits(self.ram, vm.classifier(host, view, run.audit is not None, run.x87),
                                      run._on_exit, run._fail,
                                      refusals_for(host.engine_model) if fast_paths() else None)
        self.exits.install(uc)
        self.cpuid = CpuidExitHandler(view, host.name, run._fail, run.cpuid_log)
        self.cpuid.install(uc)
        run.io.install(uc)
        self.faults = FaultExits(host, vm.memory, run._end, run.exceptions)
        self.faults.ram, self.faults.on_write = self.ram, self.exits.note_write
        self.quick = None   # the machine-code exits (exits/quick.py), where the machine runs what is refused
        self.vvar = None    # a Linux program's [vvar] (linux/vdso.py): where the block counter stores the time
        self.block_counter = None   # a Linux program's clock (engine.add_block_counter)
        uc.hook_add(UC_HOOK_INTR, self.faults.on_interrupt)
        uc.hook_add(UC_HOOK_MEM_UNMAPPED, run._unmapped)
        self.privileged = PrivilegedExits(host, view, self.faults)
        if "xsave" in host.physical:  # the XSAVE family and VLDMXCSR are minivmm's (exits/xsave.py)
            self.faults.xsave = XsaveUnit(self.ram, xstate.layout(lambda leaf, sub: view.answer(leaf, sub, 0)),
                                          lambda: self.faults._control(uc)[1])
        machine = machine_features()
        self.opmasks = None   # the holder of K0-7 on an AVX-512 host: the wide native executor
        if host.physical - isa.engine_capable() & machine:  # the machine runs what the engine cannot
            native = self.faults.native = NativeExecutor(self.ram, machine, self.exits.exit_at,
                                                         wide="avx512f" in host.physical & machine)
            self.faults.counting = lambda: self._counted
            self.exits.on_code_change = native.forget
            native.on_write = self.exits.note_write
            if fast_paths():
                self.quick = QuickExits(uc, self._on_invalid, self.exits.raw_fire)
                native.on_forget = self.quick.forget
                self.exits.quick = (self.quick.code_hook, self.quick.user_data)
                self.exits.after_exit = self._learn
            if native.wide:
                self.opmasks = native
                if self.faults.xsave is not None:
                    self.faults.xsave.hold_avx512(native)
        if self.quick is None:
            self.invalid_hook = engine_module.add_invalid_hook(uc, self._on_invalid)
        if vm.image.kind == "linux":  # the program's system calls and signals are the personality's
            # SYSCALL is no planted exit but the engine's own hook: the engine walks every
            # planted exit each time one fires, and a system call must not cost that.
            self.syscall_hook = engine_module.add_insn_hook(uc, x86.UC_X86_INS_SYSCALL, run._on_syscall)
            self.faults.signals = True
            self.faults.on_signal = run._signal
            self.faults.on_compat_call = run._int80
            self.privileged.compat_entry = run._sysenter

    def _on_invalid(self, _handle, _ud) -> bool:
        """The engine refused an instruction: an exit left to that refusal, or the
        refusal itself (faults.on_invalid). A run the machine ran for a refusal is
        taken in machine code from then on where it can be (exits/quick.py)."""
        try:
            rip = engine_module.read_rip(self.uc)
            return self.exits.on_refused(self.uc, rip) or self.faults.on_invalid(self.uc, rip)
        except BaseException as e:  # never let an exception vanish inside ctypes
            self._fail(e)
            return True

    def _learn(self, address: int) -> None:
        """After an exit fired: a run the machine ran for it is taken in machine code
        from then on, where it can be (exits/quick.py)."""
        trap = self.exits.exit_at(address)
        if not self._counted and trap and trap[0] == "unsupported" and not trap[1]:
            thunk = self.faults.native.quick_run(address)
            if thunk is not None:
                self.quick.add(address, thunk, self.faults.native)

    def power_on(self, vm: VM) -> None:
        """The machine state of docs/abi.md."""
        uc = self.uc
        for addr, data, _ in vm.image.segments:
            self.ram[addr:addr + len(data)] = data
        self.ram[GDT_BASE:GDT_BASE + len(GDT)] = GDT
        uc.reg_write(x86.UC_X86_REG_GDTR, (0, GDT_BASE, len(GDT) - 1, 0))
        uc.reg_write(x86.UC_X86_REG_CR0, CR0_BOOT)
        uc.reg_write(x86.UC_X86_REG_CR4, CR4_BOOT)
        uc.reg_write(x86.UC_X86_REG_CS, CODE_SELECTOR)
        for reg in (x86.UC_X86_REG_DS, x86.UC_X86_REG_ES, x86.UC_X86_REG_SS):
            uc.reg_write(reg, DATA_SELECTOR)
        if boot_cr4(self.view) & CR4_OSXSAVE:
            uc.reg_write(x86.UC_X86_REG_CR4, boot_cr4(self.view))
            if uc.reg_read(x86.UC_X86_REG_CR4) & CR4_OSXSAVE:
                self.write_xcr0(XCR0_BOOT)
            else:
                uc.reg_write(x86.UC_X86_REG_CR4, CR4_BOOT)  # the engine model has no XSAVE
        uc.reg_write(x86.UC_X86_REG_RFLAGS, 0x2)
        uc.reg_write(x86.UC_X86_REG_MXCSR, MXCSR_RESET)
        uc.reg_write(x86.UC_X86_REG_FPCW, FCW_HANDOFF)
        uc.reg_write(x86.UC_X86_REG_FPTAG, 0xFFFF)   # every register empty, as FNINIT leaves them
        uc.reg_write(x86.UC_X86_REG_RSP, vm.memory & ~0xF)
        uc.reg_write(x86.UC_X86_REG_RIP, vm.image.entry)

    # XCR0 is reachable only through XGETBV/XSETBV, and CPL 3 only through IRETQ: run
    # them from the VMM's own area, leaving registers, memory and the page's decode as
    # they were.
    def _stub(self, code: bytes, setup: dict, what: str = "XCR0 access") -> dict:
        uc = self.uc
        # Not context_save/restore: the saved context holds XCR0 too, and would undo XSETBV.
        clobbered = (x86.UC_X86_REG_RAX, x86.UC_X86_REG_RCX, x86.UC_X86_REG_RDX, x86.UC_X86_REG_RIP,
                     x86.UC_X86_REG_RFLAGS)
        context = {reg: uc.reg_read(reg) for reg in clobbered}
        # The VMM's area is no page of a Linux program's: the stub runs past its protections.
        guard, self.exits.protection = self.exits.protection, None
        self.exits.evictions = False   # nothing may end the stub's one instruction early
        self.exits.flush_tlb()
        saved = bytes(self.ram[BOOT_STUB:BOOT_STUB + len(code)])
        self.ram[BOOT_STUB:BOOT_STUB + len(code)] = code
        self.exits.forget(BOOT_STUB)
        for reg, value in setup.items():
            uc.reg_write(reg, value)
        for _ in range(2):  # again once if the fetch only abandoned a translation (traps._tail_changed)
            try:
                uc.emu_start(BOOT_STUB, NEVER, count=1)  # the one instruction, nothing after it
                out = {r: uc.reg_read(r) for r in (x86.UC_X86_REG_RAX, x86.UC_X86_REG_RDX)}
                break
            except UcError:
                out = None
        self.ram[BOOT_STUB:BOOT_STUB + len(code)] = saved
        self.exits.forget(BOOT_STUB)
        uc.ctl_flush_tb()  # no block translated with the count may outlive it
        self.exits.protection = guard
        self.exits.evictions = True
        self.exits.flush_tlb()
        for reg, value in context.items():
            uc.reg_write(reg, value)
        if out is None:
            raise MinivmmError(f"the {self.host.engine_model} engine model refused {what}")
        return out

    def enter_user_mode(self) -> None:
        """CPL 3, as the kernel's return to user mode (IRETQ) gives a Linux program. The
        engine takes its CPL from the descriptor an SS load brings, and a register write
        loads the selector alone: the program would run at CPL 0, its HLT, CLI, OUT,
        LGDT, MOV CR ... carried out, its POPF changing IOPL (SDM Vol. 3A, 5.5; Vol. 2A,
        IRET). At CPL 3 the engine raises their #GP itself."""
        uc = self.uc
        frame = [uc.reg_read(reg) for reg in (x86.UC_X86_REG_RIP, x86.UC_X86_REG_CS, x86.UC_X86_REG_RFLAGS,
                                              x86.UC_X86_REG_RSP, x86.UC_X86_REG_SS)]
        self._stub(IRETQ.ljust(16, b"\x90") + struct.pack("<5Q", *frame), {x86.UC_X86_REG_RSP: BOOT_STUB + 16},
                   "IRETQ to CPL 3")

    def read_xcr0(self) -> int | None:
        if not self.uc.reg_read(x86.UC_X86_REG_CR4) & CR4_OSXSAVE:
            return None
        value = xcr0_from_context(self.uc)  # no stub (and no flush of translated code) where calibrated
        if value is not None:
            return value
        out = self._stub(bytes.fromhex("0f01d0"), {x86.UC_X86_REG_RCX: 0})  # xgetbv
        return out[x86.UC_X86_REG_RAX] & 0xFFFFFFFF | (out[x86.UC_X86_REG_RDX] & 0xFFFFFFFF) << 32

    def write_xcr0(self, value: int) -> None:
        self._stub(bytes.fromhex("0f01d1"), {x86.UC_X86_REG_RCX: 0, x86.UC_X86_REG_RAX: value & 0xFFFFFFFF,
                                            x86.UC_X86_REG_RDX: value >> 32})  # xsetbv

    def capture(self) -> dict:
        regs = read_registers(self.uc, wide=self.opmasks is not None)
        if self.opmasks is not None:
            regs.update(self.opmasks.opmasks())
        return {"regs": regs, "xcr0": self.read_xcr0()}

    def restore(self, state: dict) -> bool:
        """The captured state on this engine; False if XCR0 could not come along: on a
        host without XSAVE, CR4.OSXSAVE is reserved (SDM Vol. 3A, 2.5) and XCR0 absent,
        which only a forced move reaches."""
        xcr0 = state.get("xcr0")
        if xcr0 is not None and "xsave" in self.host.physical:
            # XSETBV needs CR4.OSXSAVE and CPL 0: before the guest's own CS (a Linux program's is ring 3).
            self.uc.reg_write(x86.UC_X86_REG_CR4, state["regs"]["CR4"])
            self.write_xcr0(xcr0)
        write_registers(self.uc, state["regs"])
        if self.opmasks is not None:
            self.opmasks.set_opmasks(state["regs"])
        if xcr0 is not None and "xsave" not in self.host.physical:
            self.uc.reg_write(x86.UC_X86_REG_CR4, self.uc.reg_read(x86.UC_X86_REG_CR4) & ~CR4_OSXSAVE)
            return False
        return True

    def rip(self) -> int:
        return self.uc.reg_read(x86.UC_X86_REG_RIP)

    def start(self, count: int | None = None) -> None:
        """Run from RIP, for ``count`` instructions exactly if given. The engine plants
        its counter in translated code: blocks translated without it ignore a count (and
        with it slow every instruction), so the cache is flushed when counting starts or stops."""
        counted = count is not None
        if counted != self._counted:
            self.exits.counting(counted)
            if self.quick is not None:
                self.quick.forget()  # a counted start counts each native instruction an exit
            self.uc.ctl_flush_tb()
            self._counted = counted
        self.limit = count
        self.store_time()
        self.uc.emu_start(self.rip(), NEVER, count=count or 0)

    def store_time(self) -> None:
        """The block counter, shared by the VM's processes, stores the time since boot in
        this engine's [vvar] (nowhere without one): set before each start."""
        if self.block_counter is not None:
            engine_module.set_time_store(self.block_counter[2], self.vvar)

    def past_limit(self) -> bool:
        """At an exit: the counted start's budget ended at this instruction, which the
        engine will not execute now (it runs first in the next start). An exit must not
        carry it out here, or it would happen twice."""
        return self.limit is not None and (engine_counter(self.uc) or 0) > self.limit


class _Run:
    """One run of a VM: the exits' shared state, the current engine, and the loop."""

    def __init__(self, vm: VM, console, audit: bool, events, force: bool, precopy: PreCopy):
        self.vm = vm
        self.events = list(events)
        self.force = force
        self.precopy = precopy
        self.stop: list[Stop] = []
        self.errors: list[BaseException] = []
        self.pending_fault = None
        self.fired = False
        self.audit = Audit() if audit else None
        self.observed = {"read": set(), "executed": set(), "audited": audit}   # before a snapshot, too
        self.cpuid_log = ExitLog(lambda entry: entry[0])               # by (leaf, subleaf)
        self.exceptions = ExitLog(lambda entry: entry["vector"])
        self.migrations: list[dict] = []
        self.snapshots: list[dict] = []
        self.hosts = [vm.host.name]
        self.executed, self.exact, self.counting, self.max_insns = 0, True, False, None
        self.quieten: set[int] = set()   # audit exits to remove at the next stop
        self.x87 = X87Exceptions()
        self.x87_wanted: bool | None = None   # checking x87 exceptions from the next start, or not
        self.resumable = False
        self.secret: bytes | None = None   # what a migration over TCP proves to its receiver
        self.switching = False   # the running thread blocked, yielded, exited, or its slice is over
        self.engines: dict[int, _Engine] = {}   # a Linux VM's processes' CPUs and memory, by pid
        self.execed = False   # the last start ended at an execve: the code is another program's
        self.clock_stopped = False   # the last start ended for the Linux program's clock (a timer)
        self.io = IoExits(console, self._power_off, self._checkpoint)
        self.engine = _Engine(self, vm.host, vm.view)
        self.kernel = None
        if vm.snapshot:
            self._restore_snapshot(vm.snapshot)
        else:
            self._boot(vm.host, vm.view)

    def _boot(self, host: HostProfile, view: GuestCpuidView) -> None:
        """Power-on: the ABI's boot state, or a Linux program's execve (a new process)."""
        vm = self.vm
        if vm.image.kind != "linux":
            self.engine.power_on(vm)
            return
        self.kernel = execve(self.uc, self.engine.ram, vm.image, host, view, vm.linux, self.engine.write_xcr0,
                             self.io.console_write)
        self._attach(self.kernel)
        self.engines = {self.kernel.p.tid: self.engine}

    def _attach(self, kernel) -> None:
        """Wire a Linux program's kernel to the current engine: its system calls, what it
        writes to memory (dirty for pre-copy, code decoded again), its page protections."""
        self.io.linux = True
        self._syscall_registers = (
            engine_module.RegisterBlock((x86.UC_X86_REG_RAX, x86.UC_X86_REG_RDI, x86.UC_X86_REG_RSI,
                                         x86.UC_X86_REG_RDX, x86.UC_X86_REG_R10, x86.UC_X86_REG_R8,
                                         x86.UC_X86_REG_R9, x86.UC_X86_REG_RFLAGS, x86.UC_X86_REG_RIP)),
            engine_module.RegisterBlock((x86.UC_X86_REG_RAX, x86.UC_X86_REG_RCX, x86.UC_X86_REG_R11,
                                         x86.UC_X86_REG_RIP)),
            engine_module.RegisterBlock((x86.UC_X86_REG_RIP,)),
            engine_module.RegisterBlock((x86.UC_X86_REG_RAX, x86.UC_X86_REG_RCX, x86.UC_X86_REG_R11)))
        self.engine.enter_user_mode()
        xcr0 = self.engine.read_xcr0()  # fixed from now on: XSETBV and MOV CR4 are #GP at CPL 3
        kernel.signals.read_xcr0 = lambda: xcr0
        kernel.signals.opmasks = self.engine.opmasks
        kernel.signals.xsaves = self.engine.view.has(catalogue()["xsaves"])
        kernel.on_exec = self._new_image
        kernel.on_clone = self._cloned
        kernel.p.xfeatures, permitted = xfeatures(self.engine.view)
        if kernel.p.xcomp_perm is None:   # a new process: what fpstate_reset permits
            kernel.p.xcomp_perm = kernel.p.xcomp_guest_perm = permitted
        memory = kernel.p.memory
        memory.ram = self.engine.ram
        memory.on_write = lambda address, size: self.engine.exits.note_write(address, size)
        memory.on_change = self._protections_changed
        self.engine.exits.protection = memory.pages
        for unit in (self.engine.faults.native, self.engine.faults.xsave):
            if unit is not None:
                unit.protection = memory.pages
        self.engine.exits.flush_tlb()
        # The program's clock counts its work; the VMM's own stubs are no work of its.
        self.engine.block_counter = engine_module.add_block_counter(self.uc, kernel.clock.counter, VMM_AREA[1],
                                                                     CODE_NS_SHIFT)
        engine = self.engine
        memory.on_vvar_gone = lambda: self._publish_vvar(engine, kernel)
        self._publish_vvar(engine, kernel)

    def _publish_vvar(self, engine: _Engine, kernel) -> None:
        """The program's [vvar] (linux/vdso.py) filled in, and the block counter storing
        the time since boot there; nowhere once it is gone (a Linux program may unmap it)."""
        memory = kernel.p.memory
        memory.vvar = memory.find_named("[vvar]")
        engine.vvar = None if memory.vvar is None else vdso.publish(
            engine.ram, memory.vvar, kernel.clock.realtime, kernel.clock.wall_offset())
        if engine is self.engine:   # (it may be running: a system call unmapped [vvar])
            engine.store_time()

    # -- exits ---------------------------------------------------------------------------

    @property
    def uc(self):
        return self.engine.uc

    def _end(self, stop: Stop) -> None:
        if not self.stop:
            self.stop.append(stop)
        self.uc.emu_stop()

    def _fail(self, error: BaseException) -> None:
        self.errors.append(error)
        self.uc.emu_stop()

    def _new_image(self) -> None:
        """An execve replaced the program (from the SYSCALL hook): stop after it, and
        before the next start forget every exit planted, every block translated and
        every native run of the old code (:meth:`_start`)."""
        self.execed = True
        self._publish_vvar(self.engine, self.kernel)
        self.kernel.threads.only_running()   # execve ended every other thread (de_thread)
        self.kernel.signals.current = self.kernel.threads.leader
        self.kernel.clock.preempt_after(None)
        self.uc.emu_stop()

    def _protections_changed(self, start: int, end: int) -> None:
        self.engine.exits.flush_tlb()
        if self.engine.faults.native is not None:  # a run over pages that lost PROT_EXEC must not run
            self.engine.faults.native.forget(start, end)

    def _signal(self, uc, signo: int, code: int, address: int, vector: int, error: int) -> bool:
        # The engine remembers its last exception and would raise the next as #DF (SDM
        # Vol. 3A, Table 6-5): the kernel's trap handler has returned, as a delivery does.
        engine_module.forget_exception(uc)
        delivered = self.kernel.signals.deliver(uc, signo, code, address, vector, error)
        if not delivered and self.kernel.signals.fatal:
            self._killed()  # force_sigsegv: the process dies of SIGSEGV, not of the fault's signal
        return delivered

    def _killed(self) -> None:
        """The process dies of the signal its kernel chose (one it sent itself, or
        SIGSEGV forced by a frame Linux could not write or refused)."""
        signo, why = self.kernel.signals.fatal
        if self._process_ended(signo):
            return
        name = SIGNALS.get(signo, f"signal {signo}")
        self._end(Stop("signaled", 128 + signo, signal=name, rip=self.engine.rip(),
                       message=f"{name}: {why}" if why else f"{name} raised by the program itself"))

    def _on_syscall(self, _handle, _user_data) -> int:
        try:
            self._syscall(self.engine.uc)
        except BaseException as e:  # an exception inside a hook must not vanish
            self._fail(e)
        return 0

    def _syscall(self, uc) -> None:
        """SYSCALL, as the kernel's entry sees it: the number and arguments in, the
        result in RAX, RCX and R11 clobbered (the next RIP, RFLAGS), in batch register
        transfers (a system call's cost is mostly register access). The engine's
        SYSCALL hook runs with RIP at the instruction and adds its length after it (so
        its block ends there, and a batch write of RIP takes effect)."""
        inputs, outputs, rip_block, results = self._syscall_registers
        values = inputs.read(uc)
        rip = values[8]
        size = 2 if self.engine.ram[rip:rip + 2] == SYSCALL else \
            Decoder(64, bytes(self.engine.ram[rip:rip + 15]), ip=rip).decode().len  # prefixed
        moved = values[0] not in CPU_FREE
        if moved:   # a handler that sees the CPU sees RIP past the call
            rip_block.write(uc, (rip + size,))
        self.kernel.calling = (values[0], rip)
        result = self.kernel.dispatch(uc, values[0], values[1:7])
        kernel = self.kernel
        signals, threads = kernel.signals, kernel.threads
        running = threads.all.get(threads.current)
        waiting = running is not None and running.wait is not None   # no return to user mode yet
        if result is not RETURNED and (waiting or not signals.pending and signals.saved_mask is None):
            if moved:
                outputs.write(uc, (result, rip + size, values[7], rip))
            else:   # RIP as it was: no write of it, which would end the engine's block
                results.write(uc, (result, rip + size, values[7]))
        else:  # the return to user mode delivers what is pending, from where the call returns
            if result is not RETURNED:
                outputs.write(uc, (result, rip + size, values[7], rip + size))
            signals.deliver_pending(uc, (values[0], rip, result) if result is not RETURNED else None)
            rip_block.write(uc, (uc.reg_read(x86.UC_X86_REG_RIP) - size,))  # less what the engine adds
        if signals.fatal or kernel.p.exit_status is not None or self.events or threads.switch_wanted \
                or kernel.machine.forked:   # what _returned acts on (most calls: none; a call costs 0.15 us)
            self._returned(uc)

    def _int80(self, uc) -> None:
        compat.int80(self.kernel, uc)
        self._returned(uc)

    def _sysenter(self, uc) -> None:
        compat.sysenter(self.kernel, uc)
        self._returned(uc)

    def _returned(self, uc) -> None:
        """After a system call: the process killed, exited, or at a syscall:N point."""
        if self.kernel.signals.fatal:
            self._killed()
            if self.stop:
                return
        kernel = self.kernel
        status = kernel.p.exit_status
        if status is not None and not self._process_ended(status << 8):
            self._end(Stop("exited", status, message=f"program exited with status {status}"))
            return
        when = self._next_point()
        if when and when.kind == "syscall" and when.count == kernel.calls:
            self.fired = True  # stop right after it returned; RIP is already past it
            uc.emu_stop()
        if kernel.threads.switch_wanted or kernel.machine.forked:
            self.switching = True
            uc.emu_stop()

    def _power_off(self, status: int) -> None:
        self._end(Stop("exited", status, message=f"guest powered off with status {status}"))

    def _checkpoint(self, n: int) -> bool:
        when = self._next_point()
        if when and when.kind == "checkpoint" and when.count == n:
            self.fired = True
            return True
        return False

    def _on_exit(self, uc, address, size, action, audited, instr):
        try:
            if self.engine.past_limit():
                return
            if audited and self.audit and self.audit.count(address, instr, audited) and not action:
                # Counted enough: stop here (before it executes), remove the exit, resume.
                self.quieten.add(address)
                uc.emu_stop()
            if action == "hlt":
                self._end(Stop("halted", rip=address, instruction="hlt", message="guest executed hlt"))
            elif action == "out":
                self.io.on_out_exit(uc, address, size, instr)
            elif action == "ud":
                self.engine.faults.undefined(uc, address, instr, isa.needed_features(instr) - self.engine.host.physical)
            elif action == "unsupported":
                self.engine.faults.unsupported(uc, address, instr)
            elif action == "privileged":
                self.engine.privileged.check(uc, address, size, instr)
            elif action == "gp" and address != BOOT_STUB:  # (the VMM's own XSETBV runs there)
                self.engine.faults.deliver(uc, 13, address, 0, instr=instr, detail="privileged at CPL 3")
            elif action == "x87 control":
                fcw = self.x87.loaded_control_word(uc, instr)
                if fcw is not None and x87_exits.unmasked(fcw) != self.x87.checking:
                    self.x87_wanted = x87_exits.unmasked(fcw)
                    uc.emu_stop()  # before it executes: from the next start, checked or not
            elif action == "x87":
                pending = self.x87.pending(uc)
                if pending:
                    self.engine.faults.deliver(uc, 16, address, instr=instr, si_code=self.x87.signal_code(pending),
                                               detail=f"unmasked x87 exception pending (FSW flags {pending:#x})")
                else:
                    self.x87.carry_out(uc, address, size, instr, self._store)
            elif action in ("bsr", "bsf"):
                bit_scan(uc, address, size, instr, reverse=action == "bsr")
        except BaseException as e:  # an exception inside a hook must not vanish
            self._fail(e)

    def _store(self, address: int, data: bytes) -> bool:
        """Write guest memory for an instruction the VMM carries out, where the guest's
        own store would not fault (beyond RAM, a page its protections make read-only);
        written pages are dirty and their code decoded again."""
        end, protection = address + len(data), self.engine.exits.protection
        if end > self.vm.memory or protection is not None and any(
                not protection[page] & UC_PROT_WRITE for page in range(address // PAGE, (end - 1) // PAGE + 1)):
            return False
        self.engine.ram[address:end] = data
        self.engine.exits.note_write(address, len(data))
        return True

    def _unmapped(self, uc, access, address, size, value, _ud):
        kind = {UC_MEM_FETCH_UNMAPPED: "fetch from", UC_MEM_READ_UNMAPPED: "read of",
                UC_MEM_WRITE_UNMAPPED: "write to"}.get(access, "access to")
        if TRAP <= address < TRAP + self.vm.memory and self.engine.exits.retrying((address - TRAP) & ~(PAGE - 1)):
            self.pending_fault = lambda: None   # a translation abandoned (traps._tail_changed): resume at RIP
            return False
        if TRAP <= address < TRAP + self.vm.memory:  # a page a Linux program's protections refuse (InstructionExits maps it there)
            address -= TRAP
            allowed = self.kernel.p.memory.pages[address // PAGE]
            self.pending_fault = lambda: self.engine.faults.on_denied(self.uc, access, address, allowed)
            return False
        rip = uc.reg_read(x86.UC_X86_REG_RIP)
        self.pending_fault = lambda: self.engine.faults.on_unmapped(self.uc, access, address, rip, kind)
        return False  # the engine stops; the run loop delivers #PF

    # -- the loop ------------------------------------------------------------------------

    def run(self, max_insns, timeout) -> RunResult:
        started = time.monotonic()
        deadline = started + timeout if timeout else None
        # Counting is all or nothing: once a budget or an insn: point needs it, every
        # start is counted, so the total stays exact across migrations.
        self.counting = bool(max_insns) or any(trigger_of(e).kind == "insn" for e in self.events)
        self.max_insns = max_insns
        watchdog = self.watchdog = _Watchdog(self)
        watchdog.set_deadline(deadline)
        if self.kernel:
            self.kernel.should_stop = lambda: watchdog.reason is not None
        try:
            while not self.stop and not self.errors:
                if self.fired:  # a point reached while an earlier migration was in pre-copy
                    self._fire()
                    continue
                when = self._next_point()
                count = UNTIL_STOPPED if self.counting else None
                if when and when.kind == "insn":
                    count = when.count - self.executed
                if when and when.kind == "ms":
                    if time.monotonic() >= started + when.count / 1e3:
                        self._fire()
                        continue
                    count = min(count, MS_CHUNK) if count is not None else MS_CHUNK
                if max_insns:
                    count = min(count, max_insns - self.executed)
                if count is not None and count <= 0:
                    if when and when.kind == "insn" and when.count <= self.executed:
                        self._fire()
                        continue
                    self._end(Stop("limit", rip=self.engine.rip(), message=f"instruction budget of {max_insns} exhausted"))
                    break
                if not watchdog.reason:
                    self._start(count)
                if self.stop or self.errors:
                    break
                if watchdog.reason == "interrupted":
                    raise KeyboardInterrupt
                if watchdog.reason == "deadline":
                    self._end(Stop("limit", rip=self.engine.rip(), message=f"time budget of {timeout:g} s exhausted"))
                elif self.pending_fault:
                    self._deliver_pending_fault()
                elif self.fired:
                    self._fire()
                    if self.switching and not self.stop:
                        self._switch()
                elif self.switching:
                    self._switch()
                elif self.resumable:
                    continue
                elif self.clock_stopped:
                    self._timers_expired()
                elif count is None:
                    self._end(Stop("crashed", rip=self.engine.rip(),
                                   message="the engine stopped the guest for no known reason"))
        finally:
            watchdog.close()
        if self.errors:
            raise self.errors[0]
        return self._result()

    def _timers_expired(self) -> None:
        """The engine stopped for the clock, before a block: the timers whose time has
        come send their signals, which are delivered there, as an interrupt's return to
        user mode delivers them."""
        for kernel in self.kernel.machine.live():   # every process's timers run on the one clock
            kernel.timers.expire()
        self.kernel.signals.deliver_pending(self.uc)
        if self.kernel.signals.fatal:
            self._killed()
        elif self.kernel.clock.slice_over() or self.kernel.clock.waits_over():
            self._switch()

    # -- threads (the scheduler is linux/threads.py; here, the engine's side) -----------

    def _cloned(self, thread) -> None:
        """A new thread (from the clone hook, RIP past the call): it starts from the
        caller's context; time slices begin."""
        thread.context = self.uc.context_save()
        if self.engine.opmasks is not None:
            thread.opmasks = self.engine.opmasks.opmasks()
        if self.kernel.clock.slice_end is None:
            self.kernel.clock.preempt_after(self.kernel.threads.slice())

    def _switch(self) -> None:
        """Save the running thread (unless it exited), run the one the scheduler picks:
        its context, its signal state, the result of the wait it was in; then what is
        pending for it is delivered, as its return to user mode would."""
        self.switching = False
        self._spawn()
        kernel, uc = self.kernel, self.uc
        threads, machine = kernel.threads, kernel.machine
        if not threads.switch_wanted and kernel.p.exit_status is None and not kernel.clock.slice_over() and \
                not kernel.clock.waits_over():
            return   # a fork: the parent goes on
        threads.switch_wanted = False
        leaving = threads.all.get(threads.current) if kernel.p.exit_status is None else None
        if leaving is not None:
            leaving.context = uc.context_save()
            if self.engine.opmasks is not None:
                leaving.opmasks = self.engine.opmasks.opmasks()
            kernel.signals.save_to(leaving)
        picked = machine.schedule()
        if picked is None:
            self._end(Stop("limit", rip=self.engine.rip(), message="every thread waits and nothing can wake them"))
            return
        kernel, chosen = picked
        if kernel is not self.kernel:   # another process: its CPU and memory
            self.kernel, self.engine = kernel, self.engines[kernel.p.tid]
            machine.current = kernel.p.tid
            uc, threads = self.uc, kernel.threads
            for pid in [pid for pid in self.engines if machine.kernels.get(pid) is None
                        or machine.kernels[pid].p.exit_status is not None]:
                del self.engines[pid]   # an ended process's CPU and memory
        threads.current = chosen.tid
        kernel.signals.load_from(chosen)
        if chosen is not leaving:
            uc.context_restore(chosen.context)
            if self.engine.opmasks is not None:
                self.engine.opmasks.set_opmasks(chosen.opmasks or {})
        if chosen.start is not None:   # a new thread: clone returns 0 on its own stack and TLS
            stack, tls = chosen.start
            chosen.start = None
            if stack:
                uc.reg_write(x86.UC_X86_REG_RSP, stack)
            if tls is not None:
                uc.reg_write(x86.UC_X86_REG_FS_BASE, tls)
            uc.reg_write(x86.UC_X86_REG_RCX, uc.reg_read(x86.UC_X86_REG_RIP))
            uc.reg_write(x86.UC_X86_REG_R11, uc.reg_read(x86.UC_X86_REG_RFLAGS))
        syscall = None
        if chosen.again is not None:   # what it waited for is ready: the call is made again
            number, at = chosen.again
            chosen.again = None
            uc.reg_write(x86.UC_X86_REG_RAX, number)
            uc.reg_write(x86.UC_X86_REG_RIP, at)
        elif chosen.result is not None:
            uc.reg_write(x86.UC_X86_REG_RAX, chosen.result & (1 << 64) - 1)
            if chosen.interrupted is not None:
                syscall = (*chosen.interrupted, chosen.result & (1 << 64) - 1)
            chosen.result = chosen.interrupted = None
        everyone = [t for k in machine.live() for t in k.threads.all.values()]
        kernel.clock.preempt_after(threads.slice() if len(everyone) > 1 else None)
        ends = [t.wait.until for t in everyone if t.wait is not None and t.wait.until is not None]
        kernel.clock.wake_threads_at(min(ends, default=None))
        kernel.signals.deliver_pending(uc, syscall)
        if kernel.signals.fatal:
            self._killed()
            if self.switching:   # that process ended at once: another runs
                self._switch()

    def _spawn(self) -> None:
        """Each process a fork made gets its CPU and memory: a new engine on the same host
        and view, the parent's pages and registers (the parent is at the fork's return);
        it starts there with RAX 0 when it first runs."""
        machine = self.kernel.machine
        while machine.forked:
            parent, child = machine.forked.pop(0)
            source = self.engines[parent.p.tid]
            engine = _Engine(self, source.host, source.view)
            for page in touched_pages(source.ram):
                engine.ram[page:page + PAGE] = source.ram[page:page + PAGE]
            engine.restore(source.capture())
            self._attach_other(child, engine)
            thread = child.threads.running
            thread.context = engine.uc.context_save()
            if engine.opmasks is not None:
                thread.opmasks = engine.opmasks.opmasks()
            if thread.settid:
                child.p.write(thread.settid, struct.pack("<i", child.p.tid))
            self.engines[child.p.tid] = engine

    def _attach_other(self, kernel, engine: _Engine) -> None:
        """Wire a process that is not running to its engine (:meth:`_attach`)."""
        current = self.engine, self.kernel
        self.engine, self.kernel = engine, kernel
        try:
            self._attach(kernel)
        finally:
            self.engine, self.kernel = current

    def _process_ended(self, word: int) -> bool:
        """A process other than the first ended (``word``: its status as wait4 reports it):
        it becomes a zombie for its parent (SIGCHLD), its descriptors close, its children
        go to the first process, its CPU and memory go. False for the first process,
        whose end is the run's."""
        kernel = self.kernel
        machine = kernel.machine
        if kernel.p.tid == machine.first:
            return False
        if kernel.p.status is not None:
            return True   # ended already
        kernel.p.status = word
        if kernel.p.exit_status is None:
            kernel.p.exit_status = 128 + (word & 0x7F)
        kernel.signals.fatal = None
        kernel.fds.close_all()
        for child in machine.children(kernel.p.tid):
            child.p.ppid = machine.first
        parent = machine.kernels.get(kernel.p.ppid)
        if parent is not None and parent.p.exit_status is None:
            code, value = (1, word >> 8) if not word & 0x7F else (2, word & 0x7F)   # CLD_EXITED, CLD_KILLED
            parent.signals.send(17, code, struct.pack("<iIi", kernel.p.tid, 1000, value))
        kernel.threads.switch_wanted = True
        self.switching = True
        self.uc.emu_stop()
        return True

    def _next_point(self) -> Trigger | None:
        return trigger_of(self.events[0]) if self.events else None

    def _deliver_pending_fault(self) -> None:
        """An access the engine stopped on (beyond RAM, or refused by a Linux program's
        page protections): the guest's #PF or #GP, now."""
        deliver, self.pending_fault = self.pending_fault, None
        deliver()
        if self.kernel:  # a refused page's TLB entry leads nowhere: the next access asks again
            self.engine.exits.flush_tlb()

    def _start(self, count) -> None:
        """One engine start, for exactly ``count`` instructions if given."""
        try:
            self.engine.start(count)
        except UcError as e:
            if not self.pending_fault and not self.stop:
                self._end(Stop("crashed", rip=self.engine.rip(),
                               message=f"the engine stopped the guest at {self.engine.rip():#x}: {e}"))
        self.clock_stopped = self.kernel is not None and self.kernel.clock.stopped_engine()
        if count is not None:
            self._count_started()
        # The engine stopped before a parked exit (exits/traps.py) unless something else
        # stopped it; if so, the next start stops there again at once.
        parked = count is None and not (self.stop or self.errors or self.pending_fault or self.fired or self.switching
                                        or self.clock_stopped or self.watchdog.reason or self.engine.exits.evicted) \
            and self.engine.exits.fire_parked(self.uc, self.engine.rip())
        for address in self.quieten:
            self.engine.exits.quieten(address)
        # the control word, however it was loaded (FLDCW, a signal frame, a snapshot),
        # decides whether waiting x87 instructions exit
        wanted = x87_exits.unmasked(self.uc.reg_read(x86.UC_X86_REG_FPCW)) if self.x87_wanted is None \
            else self.x87_wanted
        switched, self.x87_wanted = wanted != self.x87.checking, None
        if switched:
            self.x87.switch(wanted)
        if switched or self.execed:   # what is an exit changed, or the code is a new image's
            self.engine.exits.forget_all()
        if self.execed and self.engine.faults.native is not None:
            self.engine.faults.native.forget()
        evicted = self.engine.exits.evicted
        if evicted:
            self.engine.exits.after_eviction()
        self.resumable = bool(self.quieten or switched or self.execed or parked or evicted) and not (
            self.stop or self.errors or self.pending_fault or self.fired)
        self.execed = False
        self.quieten.clear()

    def _count_started(self) -> None:
        """Add what the last counted start executed. The engine's counter includes the
        instruction it stopped at; that one executed when it was an OUT or HLT that
        ended the start (power-off, checkpoint, halt), not when the budget ran out or
        a fault stopped it."""
        begun = engine_counter(self.uc)
        if begun is None:
            self.exact = False
            return
        # (The clock stops the engine before a block's first instruction, which the
        # counter has not counted yet.)
        ended_by_exit = self.fired or self.clock_stopped or bool(self.stop and self.stop[0].reason in ("exited",
                                                                                                     "halted"))
        self.executed += begun - (0 if ended_by_exit or self.execed else 1)   # (an execve: a SYSCALL)

    def _fire(self) -> None:
        self.fired = False
        if self.kernel:   # every process of the VM has its CPU and memory, and the running one is live
            self._spawn()
            if self.kernel.p.exit_status is not None:
                self._switch()
                if self.stop:
                    return
        event = self.events.pop(0)
        if isinstance(event, MigrationRequest):
            self._migrate(event)
        else:
            when, path = event
            record = {"when": str(when), "file": path, "host": self.engine.host.name}
            try:
                snapshot = self._snapshot()
            except NotCarried as e:
                record["refused"] = str(e)
            else:
                save_snapshot(snapshot, path)
            self.snapshots.append(record)

    # -- migration -----------------------------------------------------------------------

    def _migrate(self, request: MigrationRequest) -> None:
        source = self.engine
        remote_move = remote.is_remote(request.destination)
        destination = None if remote_move else load_profile(request.destination)
        record = {"from": source.host.name, "to": request.destination if remote_move else destination.name,
                  "when": str(request.when), "ok": False, "forced": False, "cold": request.cold, "missing": [],
                  "rounds": 0, "pages_sent": 0, "pages_per_round": [], "downtime_ms": 0.0, "total_ms": 0.0,
                  "mode": None}
        self.migrations.append(record)
        record["refused"] = True  # until it moves, or the guest ends first
        refusal = policy_refusal(self.vm.policy, request)
        if not refusal and remote_move and request.cold:
            refusal = "a cold migration over TCP is not made: the receiver takes running VMs"
        if refusal:
            record["reason"] = refusal
            return
        if remote_move:
            return self._migrate_remote(request, record)
        if request.cold:
            return self._cold_migrate(destination, record)
        missing, marks = compatibility(source.view, source.host, destination)
        record["missing"], record["marks"] = missing, marks
        if (missing or marks) and not self.force:
            record["reason"] = f"{destination.name} lacks {', '.join(missing + marks)}: the VM stays on {source.host.name}"
            return
        record["forced"] = bool(missing or marks)
        target = _Engine(self, destination, source.view)
        run_guest = self._tracked_run(source)

        def copy_pages(pages):
            for page in pages:
                target.ram[page:page + PAGE] = source.ram[page:page + PAGE]

        # A later point reached meanwhile (checkpoint, insn:) cuts pre-copy short: switch
        # over now, then carry that point out at once.
        result = precopy(self.precopy, touched_pages(source.ram), run_guest, copy_pages, hurry=lambda: self.fired)
        source.exits.track(None)
        record.update(rounds=result["rounds"], pages_per_round=result["pages_per_round"], mode=result["mode"])
        if result.get("stopped"):
            record["reason"] = "the guest stopped on the source before the switchover: nothing to move"
            record["refused"] = False
            return
        remaining = result["remaining"]
        # The guest is stopped from here to its resumption: no collector pause in between.
        collecting = gc.isenabled()
        gc.disable()
        try:
            switch = time.perf_counter()
            if remaining is None:  # stop-and-copy: every page written so far
                remaining = touched_pages(source.ram)
            copy_pages(sorted(remaining))
            whole = self._switch_over(source, target)
            if not all(whole.values()):
                record["lost"] = [f"XCR0 and CR4.OSXSAVE: {destination.name} has no XSAVE"]
            switch_ms = (time.perf_counter() - switch) * 1e3
        finally:
            if collecting:
                gc.enable()
        remaining = len(remaining) + sum(len(touched_pages(e.ram)) for e in whole if e is not target)
        sent = sum(result["pages_per_round"]) + remaining
        record.update(ok=True, refused=False, pages_sent=sent, switchover_ms=round(switch_ms, 3), processes=len(whole),
                      downtime_ms=round(self.precopy.send_ms(remaining) + switch_ms, 3),
                      total_ms=round(self.precopy.send_ms(sent) + switch_ms, 3))
        self.hosts.append(destination.name)

    def _tracked_run(self, source: _Engine):
        """Pre-copy's ``run_guest``: the guest runs on, the pages it writes in ``source``'s
        memory tracked (None once it stopped)."""
        tracked: set[int] = set()

        def run_guest(insns):
            source.exits.track(tracked)
            self._run_on_source(insns)
            dirty = set(tracked)
            tracked.clear()
            return None if self.stop or self.errors else dirty
        return run_guest

    def _migrate_remote(self, request: MigrationRequest, record: dict) -> None:
        """Live migration to a ``minivmm receive`` (remote.py, wire.py): the destination
        decides; pre-copy sends the running process's pages while the VM runs here; then
        the VM stops, the rest of its memory and its state cross, and once the
        destination holds a VM it can run, GO hands it over. Anything failing before GO
        leaves the VM here, as if nothing had happened."""
        source, committed = self.engine, False
        try:
            channel = remote.connect(request.destination, self.secret)
        except wire.ProtocolError as e:
            record["reason"] = f"{e}: the VM stays on {source.host.name}"
            return
        with channel.sock:
            try:
                offer = self._snapshot(copy=False)
                channel.send(wire.OFFER, wire.pack_json({"meta": offer.meta, "cpuid": offer.cpuid}))
                channel.receive(wire.ACCEPT)
                space = self.kernel.p.tid if self.kernel else 0
                result = precopy(self.precopy, touched_pages(source.ram), self._tracked_run(source),
                                 lambda pages: remote.send_pages(channel, space, pages, source.ram),
                                 hurry=lambda: self.fired)
                source.exits.track(None)
                record.update(rounds=result["rounds"], pages_per_round=result["pages_per_round"],
                              mode=result["mode"])
                if result.get("stopped"):
                    record.update(reason="the guest stopped on the source before the switchover: nothing to move",
                                  refused=False)
                    return
                stopped = time.perf_counter()
                remaining = result["remaining"] if result["remaining"] is not None else touched_pages(source.ram)
                if self.kernel:
                    self._spawn()
                sent = remote.send_pages(channel, space, remaining, source.ram)
                for kernel in self.kernel.machine.live() if self.kernel else []:
                    engine = self.engines[kernel.p.tid]
                    if engine is not source:   # the others' memory, whole, while the VM is stopped
                        sent += remote.send_pages(channel, kernel.p.tid, touched_pages(engine.ram), engine.ram)
                state = self._snapshot(copy=False)
                channel.send(wire.STATE, wire.pack_state({"meta": state.meta, "regs": state.regs,
                                                          "cpuid": state.cpuid, "process": state.process},
                                                         state.console))
                channel.receive(wire.READY)
                channel.send(wire.GO)
                committed = True
                channel.receive(wire.STARTED)
            except wire.ProtocolError as e:
                source.exits.track(None)
                if not committed:
                    record["reason"] = f"{e}: the VM stays on {source.host.name}"
                    return
                record["unconfirmed"] = f"the VM was handed over, but {e}"
        downtime = (time.perf_counter() - stopped) * 1e3
        total = sum(result["pages_per_round"]) + sent
        record.update(ok=True, refused=False, pages_sent=total, downtime_ms=round(downtime, 3),
                      switchover_ms=round(downtime, 3), total_ms=round(self.precopy.send_ms(total) + downtime, 3))
        self.hosts.append(request.destination)
        where = request.destination[len(remote.PREFIX):]
        self._end(Stop("migrated", 0, rip=self.engine.rip(), message=(
            f"the VM moved to {where}, where it runs on" if "unconfirmed" not in record else
            f"the VM moved to {where}, which did not confirm it runs it: {record['unconfirmed']}")))

    def _carry_threads(self, source: _Engine, target: _Engine, threads, running: dict | None) -> None:
        """The contexts of a process's threads not running, saved by the source's engine,
        made the destination's (an engine's saved context belongs to its model): each
        loaded on the source, read as a snapshot's registers and written on the
        destination, whose XCR0 and control registers a restore has set. ``running``:
        the registers of the thread in the engine (None: a process not running, whose
        every thread has its context saved)."""
        wide = source.opmasks is not None
        for thread in threads.all.values():
            if running is not None and thread.tid == threads.current or thread.context is None:
                continue
            source.uc.context_restore(thread.context)
            regs = {**read_registers(source.uc, wide=wide), **(thread.opmasks or {})}
            write_registers(target.uc, regs)
            thread.context = target.uc.context_save()
        if running is not None:
            write_registers(target.uc, running)
            if target.opmasks is not None:
                target.opmasks.set_opmasks(running)

    def _switch_over(self, source: _Engine, target: _Engine) -> dict:
        """The VM moves whole, stopped: the process pre-copied (``source``, whose memory
        ``target`` holds now) and every other one, its memory copied whole to a new
        engine of the destination, each with its CPU's state and its threads' contexts.
        The destination's engines, each True if XCR0 came along."""
        if not self.kernel:
            self.engine = target
            return {target: target.restore(source.capture())}
        self._spawn()   # a fork made while pages were in flight
        whole = {}
        for kernel in self.kernel.machine.live():
            old = self.engines[kernel.p.tid]
            new = target if old is source else _Engine(self, target.host, old.view)
            if new is not target:
                for page in touched_pages(old.ram):
                    new.ram[page:page + PAGE] = old.ram[page:page + PAGE]
            state = old.capture()
            whole[new] = new.restore(state)
            self._carry_threads(old, new, kernel.threads, state["regs"] if kernel is self.kernel else None)
            self._attach_other(kernel, new)
            self.engines[kernel.p.tid] = new
        self.engine = self.engines[self.kernel.p.tid]
        return whole

    def _run_on_source(self, insns: int) -> None:
        """Let the guest run ``insns`` instructions while its pages are in flight (a
        thread that blocked at the point waits: another runs)."""
        if self.switching:
            self._switch()
            if self.stop:
                return
        point = self._next_point()
        if point and point.kind == "insn":  # the next point, exactly
            insns = min(insns, point.count - self.executed)
        if self.max_insns:
            insns = min(insns, self.max_insns - self.executed)
            if insns <= 0:
                self._end(Stop("limit", rip=self.engine.rip(),
                               message=f"instruction budget of {self.max_insns} exhausted"))
                return
        if insns <= 0:
            self.fired = self.fired or bool(point and point.kind == "insn")
            return
        self._start(insns)
        if self.pending_fault:
            self._deliver_pending_fault()
        elif self.clock_stopped:
            self._timers_expired()
        elif self.switching:
            self._switch()

    def _cold_migrate(self, destination, record) -> None:
        """Power off, boot again on the destination: the guest re-detects its CPU."""
        vm = self.vm
        try:
            view = GuestCpuidView.for_host(destination, vm.evc, vm.masks)
        except MinivmmError as e:
            record["reason"] = str(e)
            return
        self.engine = _Engine(self, destination, view)
        self._boot(destination, view)
        record.update(ok=True, refused=False, mode="cold")
        self.hosts.append(destination.name)

    # -- snapshots -----------------------------------------------------------------------

    def _snapshot(self, copy: bool = True) -> Snapshot:
        """The VM now; ``copy=False`` keeps this run's RAM itself as the memory (the run
        must not go on while the snapshot is used)."""
        vm, engine = self.vm, self.engine
        state = engine.capture()
        meta = {"guest": vm.image.name, "entry": vm.image.entry, "host": engine.host.name, "evc": vm.evc,
                "masks": [self_contained(m) if isinstance(m, str) else format_mask(m, "vmware") for m in vm.masks],
                "policy": vm.policy, "memory": vm.memory, "checkpoints": self.io.checkpoints,
                "xcr0": state["xcr0"], "hosts": self.hosts, "minivmm_format": 1, "observed": self._observed()}
        leaves = [[leaf, sub, *regs] for (leaf, sub), regs in engine.view.table.items()]
        process, others = None, []
        if self.kernel:
            process = capture_process(self.kernel, {k.p.tid: self._thread_records(k) for k in self.kernel.machine.live()})
            others = [self.engines[k.p.tid].ram for k in self.kernel.machine.live() if k is not self.kernel]
        return Snapshot(meta, state["regs"], {"leaves": leaves}, bytes(self.io.console),
                        bytes(engine.ram) if copy else engine.ram, process=process,
                        others=[bytes(ram) for ram in others] if copy else others)

    def _thread_records(self, kernel) -> list[dict]:
        """Every thread of a process, its current one first: in the running process the
        running thread, whose registers are the snapshot's; the others' registers read
        from their saved contexts."""
        threads, engine = kernel.threads, self.engines[kernel.p.tid]
        running = kernel is self.kernel
        records = []
        if running:
            kernel.signals.save_to(threads.running)
            records.append(thread_record(threads.running, None))
        saved = [t for tid, t in sorted(threads.all.items(), key=lambda item: item[0] != threads.current)
                 if not running or tid != threads.current]
        if saved:
            uc, wide = engine.uc, engine.opmasks is not None
            context = uc.context_save()
            for thread in saved:
                uc.context_restore(thread.context)
                records.append(thread_record(thread, {**read_registers(uc, wide=wide), **(thread.opmasks or {})}))
            uc.context_restore(context)
        return records

    def _restore_snapshot(self, snapshot: Snapshot) -> None:
        snapshot.load_memory(self.engine.ram)
        self.engine.restore({"regs": snapshot.regs, "xcr0": snapshot.meta.get("xcr0")})
        self.io.console += snapshot.console  # printed before the snapshot: not again
        self.io.checkpoints = snapshot.meta.get("checkpoints", 0)
        before = snapshot.meta.get("observed", {"read": [], "executed": [], "audited": False})
        self.observed = {"read": set(before["read"]), "executed": set(before["executed"]),
                         "audited": before["audited"] and self.observed["audited"]}
        self.hosts = list(snapshot.meta.get("hosts", [])) + [self.engine.host.name]
        if snapshot.process is not None:
            engines = [self.engine] + [_Engine(self, self.engine.host, self.engine.view)
                                       for _ in snapshot.process.get("machine", {}).get("processes", [])]
            snapshot.load_others([engine.ram for engine in engines[1:]])
            kernels = restore_process(snapshot.process, [engine.ram for engine in engines], self.engine.host,
                                      self.engine.view, self.io.console_write, self.vm.linux, snapshot.origin)
            self.kernel = kernels[0]
            self._attach(self.kernel)
            self.engines = {kernel.p.tid: engine for kernel, engine in zip(kernels, engines)}
            self._restore_threads(snapshot.regs)
            control = {"regs": snapshot.regs, "xcr0": snapshot.meta.get("xcr0")}
            for kernel, engine in zip(kernels[1:], engines[1:]):
                engine.restore(control)   # the control state the VM's processes share; each thread its own registers
                self._attach_other(kernel, engine)
                self._contexts_from_registers(engine, kernel.threads)
            if len(kernels) > 1 or self.kernel.threads.many:
                self.kernel.clock.preempt_after(self.kernel.threads.slice())

    def _restore_threads(self, regs: dict) -> None:
        """The running process's threads: the running one, if it waited in a system call,
        makes that call again; each other's registers made its context."""
        uc, running = self.uc, self.kernel.threads.running
        if running.again is not None:
            number, at = running.again
            running.again = None
            uc.reg_write(x86.UC_X86_REG_RAX, number)
            uc.reg_write(x86.UC_X86_REG_RIP, at)
        self._contexts_from_registers(self.engine, self.kernel.threads)
        if self.engine.opmasks is not None:
            self.engine.opmasks.set_opmasks(regs)

    @staticmethod
    def _contexts_from_registers(engine: _Engine, threads) -> None:
        """Each thread's snapshot registers made its context on ``engine`` (whose own
        registers are left as they were)."""
        uc = engine.uc
        pending = [t for t in threads.all.values() if t.regs is not None]
        if not pending:
            return
        context = uc.context_save()
        for thread in pending:
            write_registers(uc, thread.regs)
            if engine.opmasks is not None:
                engine.opmasks.set_opmasks(thread.regs)
                thread.opmasks = engine.opmasks.opmasks()
            thread.context, thread.regs = uc.context_save(), None
        uc.context_restore(context)

    def _observed(self) -> dict:
        """What the guest did so far, on every host: the features in the CPUID answers
        it read (each leaf it asked, as its view answers it), and, audited since power-on,
        the gated features it executed that its view hides."""
        view, cr4 = self.engine.view, self.uc.reg_read(x86.UC_X86_REG_CR4)
        read = catalogue().decode({key: view.answer(*key, cr4) for key in self.cpuid_log.counts})
        executed = {feature for entry in (self.audit.report() if self.audit else []) for feature in entry["features"]}
        return {"read": sorted(self.observed["read"] | read), "executed": sorted(self.observed["executed"] | executed),
                "audited": bool(self.observed["audited"])}

    def _syscall_report(self) -> dict | None:
        if not self.kernel:
            return None
        p = self.kernel.p
        return {"total": sum(p.counts.values()) + sum(p.unknown.values()) + p.unknown_others,
                "counts": dict(sorted(p.counts.items())), "unknown_others": p.unknown_others,
                "unknown": [{"number": n, "count": c} for n, c in sorted(p.unknown.items())],
                "sample": list(p.sample)}

    def _result(self) -> RunResult:
        stop, vm = self.stop[0], self.vm
        counted = self.exact and self.counting
        return RunResult(
            guest=vm.image.name, stop=stop, console=self.io.console.decode("latin-1"), host=self.engine.host.name,
            hosts=self.hosts, evc=vm.evc, instructions=self.executed if counted else None,
            cpuid_log=self.cpuid_log.entries, exceptions=self.exceptions.entries, migrations=self.migrations,
            cpuid_totals=dict(self.cpuid_log.counts), exception_totals=dict(self.exceptions.counts),
            left_out={"cpuid_exits": self.cpuid_log.left_out, "cpuid_exit_counts": self.cpuid_log.other_keys,
                      "exceptions": self.exceptions.left_out,
                      "console": self.io.console_left_out,
                      "stderr": self.kernel.p.stderr_left_out if self.kernel else 0},
            snapshots=self.snapshots, syscalls=self._syscall_report(),
            stderr=self.kernel.p.stderr.decode("latin-1") if self.kernel else "",
            unreached=unreached(self.events),
            audit=self.audit.report() if self.audit else [], checkpoints=self.io.checkpoints,
            unknown_port_writes=dict(self.io.unknown_writes), engine_model=self.engine.host.engine_model,
            observed=self._observed(),
            memory=vm.memory, ram=self.engine.ram,
            view_features=catalogue().decode(self.engine.view.table))


def run(guest: GuestImage | str, host: HostProfile | str = "nehalem", **options) -> RunResult:
    """Build a VM and run it: ``run("hello", host="penryn", timeout=5)``."""
    run_options = {k: options.pop(k) for k in ("max_insns", "timeout", "console", "audit", "migrations", "force",
                                                "snapshot_at", "snapshot_file", "precopy") if k in options}
    return VM(guest, host, **options).run(**run_options)


def run_command(guest: str, host: str, evc: str | None = None, masks=(), migrations=(), force: bool = False,
                cold: bool = False, audit: bool = False, mounts=(), argv=(), stop_and_copy: bool = False) -> str:
    """The ``minivmm run`` command line that does what ``VM(...).run(...)`` with these
    arguments does: printed by demos and matrix cells so that anyone can replay them."""
    args = ["minivmm", "run", guest, "--host", host]
    if evc:
        args += ["--evc", evc]
    args += [f"--cpuid-mask={mask}" for mask in masks]
    for migration in migrations:
        args += ["--migrate", str(migration)]
    args += [flag for flag, on in (("--force", force), ("--cold", cold), ("--audit", audit),
                                   ("--stop-and-copy", stop_and_copy)) if on]
    for mount in mounts:
        args += ["--mount", str(mount)]
    return shlex.join(args + (["--", *argv] if argv else []))


__all__ = ["VM", "run", "run_command", "parse_size", "LOAD_ADDRESS"]
