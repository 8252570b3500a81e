"""Fuzzing every reader: whatever the bytes, a reader returns what it read or refuses with
a MinivmmError, in bounded time; never another exception, never a hang.

Fast by default (part of the suite); a long run anyone can make:

    python -m pytest tests/test_fuzz.py -p no:xdist --hypothesis-profile=fuzz

prints, per reader, the inputs tried and their outcomes (accepted, refused, traceback,
hang) and the peak RSS; README's table comes from such a run.
"""

import contextlib
import copy
import json
import shutil
import signal
import struct

import pytest
import zstandard
from helpers import pack_snapshot, snapshot_sections
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from minivmm.cpu.profiles import load_profile
from minivmm.cpu.table import MAX_ENTRIES, CpuidTable
from minivmm.errors import MinivmmError
from minivmm.guests import assembler
from minivmm.guests.loader import load_elf, load_guest
from minivmm.masking.formats import parse_mask
from minivmm.masking.view import GuestCpuidView
from minivmm.testing import strategies as mst
from minivmm.vmm import snapshot as snapshot_mod
from minivmm.vmm import wire
from minivmm.vmm.remote import Destination
from minivmm.vmm.exits.io import CONSOLE_KEPT
from minivmm.vmm.vm import VM

from conftest import FUZZ_MESSAGES
from conftest import FUZZ_OUTCOMES as OUTCOMES

PER_INPUT_SECONDS = 20  # far above any reader's real cost: past it, the input hung


class Hang(Exception):
    pass


@contextlib.contextmanager
def bounded(reader: str):
    """Count the outcome of one input; a MinivmmError is a refusal, anything else fails."""
    def on_alarm(*_):
        raise Hang()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(PER_INPUT_SECONDS)
    try:
        yield
        OUTCOMES[reader]["accepted"] += 1
    except MinivmmError:
        OUTCOMES[reader]["refused"] += 1
    except Hang:
        OUTCOMES[reader]["hang"] += 1
        raise AssertionError(f"{reader}: an input ran for more than {PER_INPUT_SECONDS} s")
    except Exception:
        OUTCOMES[reader]["traceback"] += 1
        raise
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


FUZZ = settings(suppress_health_check=list(HealthCheck), deadline=None)

# ---- assembly --------------------------------------------------------------------------

LINES = ["nop", "hlt", "mov eax, 1", "l: jmp l", "out 0xf4, al", ".byte 0x90", '.asciz "x;y"', "cpuid",
         "*", ":", "; comment", "# comment", "mov rax, [rip + l]", ".fill 3, 1, 0", "vaddps ymm0, ymm1, ymm2",
         "lea rsi, [rip + missing]", ".include \"lib/console.inc\"", ".include \"nosuch.inc\"", "\0", "x:", "x:"]


@FUZZ
@given(lines=st.lists(st.one_of(st.sampled_from(LINES), st.text(max_size=20)), max_size=12))
@example(lines=["nop", "*", "hlt"])
def test_fuzz_assembly(lines, tmp_path_factory):
    previous, assembler.DEADLINE = assembler.DEADLINE, 1.0  # a hang costs one second, not five
    try:
        path = tmp_path_factory.mktemp("asm") / "g.asm"
        path.write_bytes("\n".join(lines).encode("utf-8", "replace"))
        with bounded("assembly"):
            load_guest(str(path))
    finally:
        assembler.DEADLINE = previous


# ---- ELF ---------------------------------------------------------------------------------

def _elf(entry, segments, e_type=2, machine=62, phentsize=56, phoff=64):
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", e_type, machine, 1, entry, phoff, 0, 0, 64, phentsize, len(segments), 0,
                          0, 0)
    body_at = 64 + 56 * len(segments)
    phdrs = b"".join(struct.pack("<IIQQQQQQ", kind, 5, offset if offset is not None else body_at, vaddr, vaddr, filesz,
                                 memsz, 0x1000) for kind, offset, vaddr, filesz, memsz in segments)
    return header + phdrs + b"\xb0\x00\xe6\xf4" * 8


U64 = st.one_of(st.integers(0, 1 << 64 - 1), st.sampled_from([0, 0x100000, 0x1000, 1 << 31, (1 << 64) - 1, 1 << 63]))


SANE_SEGMENT = st.tuples(st.just(1), st.none(), st.sampled_from([0x100000, 0x200000]), st.integers(0, 32),
                         st.integers(32, 0x3000))
HOSTILE_SEGMENT = st.tuples(st.sampled_from([1, 1, 0, 6]), st.one_of(st.none(), U64), U64, U64, U64)


@FUZZ
@given(entry=st.just(0x100000) | U64, segments=st.lists(SANE_SEGMENT | HOSTILE_SEGMENT, max_size=3),
       e_type=st.sampled_from([2, 2, 3, 1]), phentsize=st.sampled_from([56, 56, 0, 64, 0xFFFF]),
       flips=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), max_size=4))
def test_fuzz_elf(entry, segments, e_type, phentsize, flips):
    data = bytearray(_elf(entry, segments, e_type, phentsize=phentsize))
    for at, value in flips:
        if at < len(data):
            data[at] = value
    with bounded("elf"):
        VM(load_elf(bytes(data), "fuzz.elf"), "nehalem")


# ---- flat images, run ---------------------------------------------------------------------

@FUZZ
@given(code=st.binary(min_size=1, max_size=64), host=mst.profile_names())
def test_fuzz_flat_images_run_and_end(code, host, tmp_path_factory):
    """Random code on random hosts: any stop reason, the VMM intact."""
    path = tmp_path_factory.mktemp("flat") / "g.bin"
    path.write_bytes(code)
    with bounded("flat image"):
        result = VM(str(path), host).run(max_insns=2000, timeout=5)
        assert result.stop.reason in ("exited", "halted", "crashed", "unsupported", "limit")


# ---- snapshots: valid checksums, hostile contents ------------------------------------------

@pytest.fixture(scope="module")
def snapshot_parts(tmp_path_factory):
    path = tmp_path_factory.mktemp("snap") / "vm.snap"
    VM("dispatch_cpuid", "penryn").run(snapshot_at="checkpoint:1", snapshot_file=str(path), timeout=60)
    snap = snapshot_mod.load(str(path))
    return snap.meta, snap.regs, snap.cpuid


JSON = st.recursive(st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=8)
# One past a bound of the format: refused before anything big is built.
PAST_BOUNDS = st.sampled_from([["penryn"] * (snapshot_mod.MAX_HOSTS + 1), "g" * (snapshot_mod.MAX_NAME + 1),
                               [[0] * 6] * (MAX_ENTRIES + 1), [[]] * 100_000, list(range(200_000))])


@FUZZ
@given(data=st.data())
def test_fuzz_snapshots(snapshot_parts, data):
    meta, regs, cpuid = (dict(part) for part in snapshot_parts)
    ram = meta["memory"]  # before meta is mutated: section lengths must stay numbers
    for part in (meta, regs, cpuid):
        for _ in range(data.draw(st.sampled_from([0, 0, 1, 3]))):
            key = data.draw(st.sampled_from(sorted(part)) | st.text(max_size=6))
            part[key] = data.draw(JSON | PAST_BOUNDS)
    memory_size = data.draw(st.sampled_from([ram, ram, 4096, 1 << 30, 0]))
    memory = data.draw(st.sampled_from([None, None, b"", b"\1" * 4096]))  # None: zeros of the declared size
    memory = bytes(min(memory_size, 64 << 20)) if memory is None else memory
    compression = data.draw(st.sampled_from([0, 1, 1, 2]))
    stored = zstandard.ZstdCompressor(write_content_size=data.draw(st.booleans())).compress(memory) \
        if compression == 1 else memory
    console = data.draw(st.sampled_from([b"", b"", bytes(CONSOLE_KEPT + 1)]))
    sections = [("meta", 0, json.dumps(meta).encode(), None), ("regs", 0, json.dumps(regs).encode(), None),
                ("cpuid", 0, json.dumps(cpuid).encode(), None), ("console", 0, console, None),
                ("memory", compression, stored, memory_size)]
    if data.draw(st.booleans()):  # a Linux program's state, of any shape
        sections.append(("process", 0, json.dumps(data.draw(JSON | PAST_BOUNDS)).encode(), None))
    sections = [(n, c, s, len(s) if length is None else length) for n, c, s, length in sections]
    if data.draw(st.booleans()):
        sections = data.draw(st.permutations(sections))[:data.draw(st.integers(3, 5))]
    with bounded("snapshot"):
        snap = snapshot_mod.Snapshot.from_bytes(pack_snapshot(sections), "fuzz.snap")
        VM.resume(snap, force=True).run(max_insns=5000, timeout=5)


@pytest.fixture(scope="module")
def processes_snapshot(tmp_path_factory):
    """A shell, a subshell and cat mid-run (a pipe holding bytes between them): a
    snapshot of several processes, its sections as stored."""
    shell = shutil.which("sh")
    if shell is None:
        pytest.skip("no sh on this machine")
    path = tmp_path_factory.mktemp("snap") / "tree.snap"
    argv = ["-c", "echo x | (sleep 1; cat); echo done"]
    alone = VM(shell, "penryn", argv=argv, mounts=["/"], memory="64M").run(timeout=60)
    point = alone.syscalls["sample"].index("clock_nanosleep") + 1
    VM(shell, "penryn", argv=argv, mounts=["/"], memory="64M").run(snapshot_at=f"syscall:{point}",
                                                                  snapshot_file=str(path), timeout=60)
    return snapshot_sections(path.read_bytes())


def _paths(value, path=()):
    """Every place in a JSON value: the keys down to it."""
    yield path
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from _paths(child, path + (key,))


@FUZZ
@given(data=st.data())
def test_fuzz_the_state_of_several_processes(processes_snapshot, data):
    """Any field of a real state of three processes, any value: refused in one line, or
    resumed and run within bounds."""
    sections = []
    for name, compression, stored, length in processes_snapshot:
        if name == "process":
            state = json.loads(stored)
            places = [path for path in _paths(state) if path]
            for _ in range(data.draw(st.integers(1, 3))):
                *down, last = data.draw(st.sampled_from(places))
                target = state
                for key in down:   # (an earlier change may have removed the way there)
                    try:
                        target = target[key]
                    except (KeyError, IndexError, TypeError):
                        target = None
                        break
                if isinstance(target, dict) or isinstance(target, list) and isinstance(last, int) \
                        and last < len(target):
                    target[last] = copy.deepcopy(data.draw(JSON | PAST_BOUNDS | st.integers(-2, 2000)))
            stored = json.dumps(state).encode()
            length = len(stored)
        sections.append((name, compression, stored, length))
    with bounded("processes"):
        snap = snapshot_mod.Snapshot.from_bytes(pack_snapshot(sections), "fuzz.snap")
        VM.resume(snap, mounts=["/"]).run(max_insns=200_000, timeout=5)


# ---- the migration receiver: a hostile peer on the network ---------------------------------

RECEIVER_SECRET = b"a secret the fuzzer knows, 36 bytes!"
RECEIVER_NONCE = bytes(range(32))     # the receiver's nonce, fixed so that inputs can authenticate
SOURCE_NONCE = bytes(32)


class _Peer:
    """A socket whose other end sends ``data`` and then closes; what the receiver sends
    is dropped (counted, bounded)."""

    def __init__(self, data: bytes):
        self.data, self.at = memoryview(data), 0

    def recv_into(self, view) -> int:
        n = min(len(view), len(self.data) - self.at)
        view[:n] = self.data[self.at:self.at + n]
        self.at += n
        return n

    def sendall(self, data) -> None:
        pass

    def settimeout(self, seconds) -> None:
        pass


class _CountingChannel(wire.Channel):
    def receive(self, *expected):
        message = super().receive(*expected)
        FUZZ_MESSAGES["receiver"] += 1
        return message


@pytest.fixture(scope="module")
def arriving_vm(tmp_path_factory):
    """A real VM's offer, pages and state, as a source sends them."""
    path = tmp_path_factory.mktemp("arrive") / "vm.snap"
    VM("dispatch_cpuid", "nehalem", evc="intel-penryn").run(snapshot_at="checkpoint:1", snapshot_file=str(path),
                                                           timeout=60)
    snap = snapshot_mod.load(str(path))
    ram = bytearray(snap.meta["memory"])
    snap.load_memory(ram)
    pages = [p for p in range(len(ram) // 4096) if any(ram[p * 4096:(p + 1) * 4096])]
    return (wire.pack_json({"meta": snap.meta, "cpuid": snap.cpuid}),
            [wire.pack_pages(0, pages[i:i + 8], lambda p: bytes(ram[p * 4096:(p + 1) * 4096]))
             for i in range(0, len(pages), 8)],
            wire.pack_state({"meta": snap.meta, "regs": snap.regs, "cpuid": snap.cpuid, "process": None},
                            snap.console))


def _stream(data, offer, pages, state) -> bytes:
    """What a peer sends: an AUTH (right or not), then messages of the protocol, each
    maybe mutated, reordered, truncated, oversized or with a wrong tag."""
    key = wire._mac(RECEIVER_SECRET, b"session", RECEIVER_NONCE, SOURCE_NONCE)
    right = data.draw(st.sampled_from([True, True, True, False]))
    proof = wire._mac(RECEIVER_SECRET if right else b"another secret entirely", b"source", RECEIVER_NONCE,
                      SOURCE_NONCE)
    out = [wire.HEADER.pack(wire.AUTH, 64) + SOURCE_NONCE + proof]
    rounds = 100 - data.draw(st.integers(0, 99))   # pre-copy sends pages round after round (mostly many)
    script = [(wire.OFFER, offer)] + [(wire.PAGES, p) for p in pages] * rounds + [(wire.STATE, state), (wire.GO, b"")]
    script = data.draw(st.permutations(script)) if data.draw(st.integers(0, 4)) == 0 else script
    for seq, (kind, payload) in enumerate(script[:len(script) - data.draw(st.integers(0, len(script)))]):
        spoiled = data.draw(st.integers(0, 99)) == 50   # about one message in a hundred
        how = data.draw(st.sampled_from(["bytes", "kind", "tag", "cut", "length", "junk"])) if spoiled else "as is"
        if how == "bytes" and payload:
            at = data.draw(st.integers(0, len(payload) - 1))
            payload = payload[:at] + bytes([payload[at] ^ data.draw(st.integers(1, 255))]) + payload[at + 1:]
        elif how == "kind":
            kind = data.draw(st.integers(0, 255))
        elif how == "junk":
            payload = data.draw(st.binary(max_size=300))
        tag = wire._mac(key, struct.pack("<QB", seq, True), bytes([kind]), payload)
        if how == "tag":
            tag = bytes(32)
        length = len(payload) if how != "length" else data.draw(st.sampled_from([0, 1 << 31, (1 << 32) - 1]))
        frame = wire.HEADER.pack(kind, length) + payload + tag
        out.append(frame[:data.draw(st.integers(0, len(frame)))] if how == "cut" else frame)
        if how == "cut":
            break
    return b"".join(out)


@FUZZ
@given(data=st.data())
def test_fuzz_the_migration_receiver(arriving_vm, data):
    """Whatever a peer sends, the receiver takes a VM, or refuses in one line; never a
    traceback, a hang or memory beyond the VM it would hold."""
    stream = _stream(data, *arriving_vm)
    destination = Destination(load_profile("penryn"), None, RECEIVER_SECRET,
                              lambda snapshot: VM.resume(snapshot, "penryn"), nonce=RECEIVER_NONCE)
    with bounded("receiver"):
        destination.receive(_CountingChannel(_Peer(stream), "fuzz", is_source=False))


# ---- host profile files -------------------------------------------------------------------

RAW = st.builds(lambda leaf, sub, regs: f"   0x{leaf:08x} 0x{sub:02x}: " + " ".join(
    f"{r}=0x{v:08x}" for r, v in zip(("eax", "ebx", "ecx", "edx"), regs)),
    st.sampled_from([0, 1, 7, 0xD, 0x80000000, 0x80000001, 0x40000000]) | st.integers(0, 1 << 32 - 1),
    st.integers(0, 3), st.tuples(*[st.integers(0, (1 << 32) - 1)] * 4))
XML = st.builds(lambda leaf, regs: f'<cpuid eax_in="0x{leaf:08x}" ecx_in="0x00" eax="0x{regs[0]:08x}" '
                                   f'ebx="0x{regs[1]:08x}" ecx="0x{regs[2]:08x}" edx="0x{regs[3]:08x}"/>',
                st.integers(0, 0x80000008), st.tuples(*[st.integers(0, (1 << 32) - 1)] * 4))


@FUZZ
@given(kind=st.sampled_from(["raw", "xml"]), lines=st.lists(RAW | st.text(max_size=30), max_size=8),
       xml=st.lists(XML | st.text(max_size=20), max_size=6), header=st.sampled_from(["CPU:", "CPU 0:", "", "CPU 9"]))
def test_fuzz_profile_files(kind, lines, xml, header):
    text = "\n".join([header, *lines]) if kind == "raw" else "<cpudata arch='x86'>" + "".join(xml) + "</cpudata>"
    with bounded("profile file"):
        table = CpuidTable.from_text(text, "fuzz.txt")
        GuestCpuidView(table).answer(1, 0, 0)


# ---- every mask format --------------------------------------------------------------------

MASK_TEXT = st.one_of(
    st.builds(lambda leaf, reg, bits: f"{leaf}:{reg}=0b{bits}", st.sampled_from(["0x1", "1", "-1", "0x7,0", "0xffffffffff"]),
              st.sampled_from(["eax", "ecx", "edx", "zzz"]), st.text("01x_", max_size=40)),
    st.builds(lambda leaf, reg, bits: f"cpuid.{leaf}.{reg}={bits}", st.sampled_from(["1", "7.0", "80000001", "g"]),
              st.sampled_from(["ecx", "ebx", "r9"]), st.text("01-xTFRH:", max_size=42)),
    st.builds(lambda leaf, bits: f"{leaf}:ecx={bits}", st.sampled_from(["1", "0x7,0", "x"]), st.text("01xks", max_size=34)),
    st.builds(lambda items: ",".join(items), st.lists(st.builds(lambda s, n: s + n, st.sampled_from("+-"),
                                                                mst.feature_names() | st.text(max_size=8)), max_size=4)),
    st.builds(lambda mode: f"evc:{mode}", mst.evc_mode_keys() | st.text(max_size=10)),
    st.builds(json.dumps, st.fixed_dictionaries({"cpuid_modifiers": st.lists(st.fixed_dictionaries({
        "leaf": JSON | st.sampled_from(["0x1", "-1", "0x7"]), "subleaf": JSON | st.just("0x0"),
        "modifiers": st.lists(st.fixed_dictionaries({"register": st.sampled_from(["ecx", "eax", 5]),
                                                     "bitmap": st.text("01x", max_size=34).map("0b".__add__) | JSON}),
                              max_size=2)}), max_size=2)})),
    st.text(max_size=40),
)


@FUZZ
@given(text=MASK_TEXT)
def test_fuzz_masks(text):
    with bounded("mask"):
        parse_mask(text)


# ---- the Linux personality's system calls ------------------------------------------------

@pytest.fixture(scope="module")
def linux_kernel(tmp_path_factory):
    """A static Linux program's kernel and engine, booted, never run: its system-call
    table is driven directly."""
    import shutil
    import subprocess

    from minivmm.vmm.migration import PreCopy
    from minivmm.vmm.vm import _Run
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed: cannot build a Linux program")
    source = tmp_path_factory.mktemp("calls") / "hello.c"
    source.write_text("int main(void) { return 0; }\n")
    built = subprocess.run(["gcc", "-static", "-O1", "-o", str(source.with_suffix("")), str(source)],
                           capture_output=True)
    if built.returncode:
        pytest.skip("gcc -static failed (no static glibc?)")
    run = _Run(VM(str(source.with_suffix("")), "penryn"), None, False, [], False, PreCopy())
    run.kernel.should_stop = lambda: True   # a wait ends at once (EINTR): nothing here would wake it
    return run


ADDRESSES = st.one_of(st.sampled_from([0, 1, 0x1000, 0xFFFFFFFFFFFFFFFF, 1 << 47, 0x7FFFFFF000]),
                      st.integers(0, 1 << 64 - 1))
ARGUMENTS = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 8, 9, 10, 128, 256, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 1 << 31]),
                      st.integers(0, (1 << 64) - 1), ADDRESSES)
# the calls of threads, processes, pipes and readiness, and the rest of the table
NEW_CALLS = [7, 22, 23, 24, 56, 57, 58, 60, 61, 62, 109, 110, 111, 112, 117, 119, 121, 124, 186, 202, 213, 218, 232,
             233, 247, 270, 271, 273, 274, 281, 284, 290, 291, 293, 435, 441]


@FUZZ
@given(calls=st.lists(st.tuples(st.one_of(st.sampled_from(NEW_CALLS), st.integers(0, 460)),
                                st.tuples(*[ARGUMENTS] * 6)), min_size=1, max_size=20))
def test_fuzz_system_calls(linux_kernel, calls):
    """Any number with any arguments returns a value (a result, -errno) or blocks the
    thread; never another exception. execve and the calls that end the process are left
    out: they end what this drives."""
    kernel = linux_kernel.kernel
    with bounded("system calls"):
        for number, args in calls:
            if number in (59, 60, 231, 322, 15):   # execve, exit, exit_group, execveat, rt_sigreturn
                continue
            kernel.calling = (number, 0x401000)
            result = kernel.dispatch(linux_kernel.uc, number, args)
            assert result is not None
            kernel.threads.switch_wanted = False
            for thread in kernel.threads.all.values():
                thread.wait = None   # what blocked is let go: the next call runs
            kernel.signals.pending.clear()
            kernel.signals.fatal = None
