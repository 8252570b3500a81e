"""Trust at every edge: whatever a user feeds minivmm, it ends in bounded time and memory
with one clear line, loses nothing, and never does silently less than asked."""

import json
import os
import resource
import struct
import subprocess
import sys
import time

import pytest
import zstandard
from helpers import measured_cli, minivmm_cli, one_line_error, pack_snapshot

from minivmm.errors import MinivmmError
from minivmm.guests import assembler
from minivmm.vmm import snapshot as snapshot_mod
from minivmm.vmm.vm import VM

# ---- assembly: keystone must never hang the VMM --------------------------------------------


@pytest.mark.parametrize("line", ["*", ":"])
def test_a_line_that_hangs_keystone_is_an_error_naming_it(asm_guest, monkeypatch, line):
    monkeypatch.setattr(assembler, "DEADLINE", 1.0)
    path = asm_guest(f"nop\n{line}\nhlt\n")
    started = time.monotonic()
    with pytest.raises(MinivmmError, match=rf":2: assembler error: .*did not finish.*: \{line}$"):
        VM(path)
    assert time.monotonic() - started < assembler.DEADLINE + 5  # the deadline, plus a fork on a busy machine


def test_a_hanging_line_pulled_in_by_include_is_named_in_its_file(tmp_path, monkeypatch):
    monkeypatch.setattr(assembler, "DEADLINE", 1.0)
    (tmp_path / "bad.inc").write_text("nop\nnop\n*\n")
    (tmp_path / "main.asm").write_text('.include "bad.inc"\nhlt\n')
    with pytest.raises(MinivmmError, match=r"bad\.inc:3: assembler error"):
        VM(str(tmp_path / "main.asm"))


def test_cli_assembler_hang_is_one_line_within_seconds(asm_guest):
    done, rss, seconds = measured_cli("run", asm_guest("*\n"))
    assert one_line_error(done) and seconds < assembler.DEADLINE + 10 and ":1: assembler error" in done.stderr


def test_a_nul_byte_in_source_names_its_line(asm_guest):
    with pytest.raises(MinivmmError, match=r":3: a NUL byte in assembly source \(column 5\)"):
        VM(asm_guest("nop\nnop\nmov \0eax, 1\nhlt\n"))


def test_assembly_still_reports_ordinary_errors_by_line(asm_guest):
    with pytest.raises(MinivmmError, match=r":2: assembler error: .*: frobnicate rax"):
        VM(asm_guest("nop\nfrobnicate rax\nhlt\n"))


# ---- numbers out of range are refused when parsed --------------------------------------------

@pytest.mark.parametrize("args", [
    ["run", "hello", "--timeout", "nan"], ["run", "hello", "--timeout", "inf"], ["run", "hello", "--timeout", "-1"],
    ["run", "hello", "--timeout", "0"], ["run", "hello", "--timeout", "1e400"],
    ["compare", "hello", "--hosts", "core2", "--timeout", "nan"],
    ["matrix", "hello", "--hosts", "core2", "--timeout", "inf"],
    ["run", "hello", "--max-insns", "99999999999999999999999"], ["run", "hello", "--max-insns", "0"],
    ["run", "hello", "--memory", "64G"], ["run", "hello", "--memory", "99999999999G"], ["run", "hello", "--memory", "1"],
    ["matrix", "hello", "--hosts", "core2", "--jobs", "100000"],
    ["run", "hello", "--migrate", "penryn@checkpoint:0"],
    ["run", "hello", "--migrate", "penryn@insn:99999999999999999999"],
    ["run", "hello", "--snapshot-at", "insn:10"],
    ["run", "hello", "--snapshot-file", "x.snap"],
])
def test_out_of_range_options_are_one_line_errors(args):
    assert one_line_error(minivmm_cli(*args))


def test_a_nan_timeout_is_refused_by_the_api_too():
    with pytest.raises(MinivmmError, match="timeout nan"):
        VM("hello").run(timeout=float("nan"))


def test_a_guest_name_longer_than_the_os_allows():
    assert one_line_error(minivmm_cli("run", "g" * 5000))
    assert one_line_error(minivmm_cli("run", "d/" * 3000 + "g"))


# ---- every reader refuses what is not a regular file, fast and small --------------------------

def _hostile(kind, tmp_path):
    if kind == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
        return str(path)
    if kind == "directory":
        return str(tmp_path)
    if kind == "symlink to /dev/zero":
        path = tmp_path / "zero.json"
        path.symlink_to("/dev/zero")
        return str(path)
    return kind


READERS = {
    "guest": lambda p, tmp: ["run", p],
    "include": lambda p, tmp: ["run", _including(tmp, p)],
    "file: host": lambda p, tmp: ["run", "hello", "--host", f"file:{p}"],
    "mask template": lambda p, tmp: ["run", "hello", f"--cpuid-mask={p}"],
    "snapshot": lambda p, tmp: ["resume", p],
    "snapshot inspect": lambda p, tmp: ["snapshot", "inspect", p],
}


def _including(tmp_path, target) -> str:
    path = tmp_path / "includes.asm"
    path.write_text(f'.include "{target}"\nhlt\n')
    return str(path)


@pytest.mark.parametrize("kind", ["fifo", "directory", "/dev/zero", "/dev/urandom", "symlink to /dev/zero"])
@pytest.mark.parametrize("reader", sorted(READERS))
def test_every_reader_refuses_what_is_not_a_regular_file(tmp_path, reader, kind):
    done, rss, seconds = measured_cli(*READERS[reader](_hostile(kind, tmp_path), tmp_path), timeout=30)
    assert one_line_error(done), done.stderr
    assert seconds < 10 and rss < 200, (seconds, rss)  # start-up included (0.3 s idle); the refusal is instant


def test_an_oversized_guest_is_refused_before_reading(tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(300 << 20)  # sparse: costs no disk
    done, rss, _ = measured_cli("run", str(big))
    assert one_line_error(done) and "more than the limit" in done.stderr and rss < 200


# ---- snapshots: bounded, validated before anything runs -------------------------------------

@pytest.fixture(scope="module")
def snap_sections(tmp_path_factory):
    path = tmp_path_factory.mktemp("snap") / "vm.snap"
    VM("dispatch_cpuid", "penryn").run(snapshot_at="checkpoint:1", snapshot_file=str(path), timeout=60)
    data, offset, sections = path.read_bytes(), snapshot_mod.HEADER.size, []
    for _ in range(snapshot_mod.HEADER.unpack_from(data, 0)[2]):
        name, compression, stored, length, _crc = snapshot_mod.SECTION.unpack_from(data, offset)
        offset += snapshot_mod.SECTION.size
        sections.append([name.rstrip(b"\0").decode(), compression, data[offset:offset + stored], length])
        offset += stored
    return sections


def _with(sections, name, stored, length=None, compression=None):
    out = []
    for s in sections:
        if s[0] == name:
            s = [name, s[1] if compression is None else compression, stored, len(stored) if length is None else length]
        out.append(s)
    return out


def _meta(sections) -> dict:
    return json.loads(next(s[2] for s in sections if s[0] == "meta"))


def test_a_small_file_declaring_a_big_ram_is_cheap_to_inspect_and_resume(snap_sections, tmp_path):
    gib = 1 << 30
    meta = {**_meta(snap_sections), "memory": gib}
    memory = zstandard.ZstdCompressor(level=19).compress(bytes(gib))  # about 34 KiB of zstd for 1 GiB
    crafted = _with(_with(snap_sections, "meta", json.dumps(meta).encode()), "memory", memory, gib, 1)
    path = tmp_path / "big.snap"
    path.write_bytes(pack_snapshot(crafted))
    assert path.stat().st_size < 100 << 10
    done, rss, _ = measured_cli("snapshot", "inspect", str(path), "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["memory"] == gib and rss < 200, (rss, done.stderr)
    done, rss, _ = measured_cli("resume", str(path), "--json", "--timeout", "20")
    assert done.returncode in (0, 125) and rss < 400, rss  # the RAM is mapped, its zero pages never touched


def test_a_frame_without_content_size_or_longer_than_declared_is_refused(snap_sections, tmp_path):
    memory_len = next(s[3] for s in snap_sections if s[0] == "memory")
    plain = zstandard.ZstdCompressor(write_content_size=False).compress(b"\1" * (memory_len + 4096))
    path = tmp_path / "long.snap"
    path.write_bytes(pack_snapshot(_with(snap_sections, "memory", plain, memory_len, 1)))
    done = minivmm_cli("resume", str(path))
    assert one_line_error(done) and "memory holds more bytes" in done.stderr


@pytest.mark.parametrize("change, says", [
    ({"entry": None}, "meta.entry"), ({"masks": 5}, "meta.masks"), ({"masks": [5]}, "meta.masks"),
    ({"hosts": "penryn"}, "meta.hosts"), ({"policy": "sometimes"}, "meta.policy"),
    ({"entry": 1 << 40}, "outside the guest's RAM"), ({"memory": 12345}, "meta.memory"),
    ({"checkpoints": -1}, "out of range"), ({"xcr0": "7"}, "meta.xcr0"),
])
def test_every_metadata_field_is_validated(snap_sections, tmp_path, change, says):
    path = tmp_path / "m.snap"
    path.write_bytes(pack_snapshot(_with(snap_sections, "meta", json.dumps({**_meta(snap_sections), **change}).encode())))
    done = minivmm_cli("resume", str(path))
    assert one_line_error(done) and says in done.stderr, done.stderr


@pytest.mark.parametrize("register, value", [("GDTR", 5), ("RAX", [1, 2]), ("FP0", [1]), ("XMM0", 1 << 130),
                                             ("RIP", True), ("CR0", "0x33")])
def test_wrong_shaped_registers_are_refused(snap_sections, tmp_path, register, value):
    regs = json.loads(next(s[2] for s in snap_sections if s[0] == "regs"))
    path = tmp_path / "r.snap"
    path.write_bytes(pack_snapshot(_with(snap_sections, "regs", json.dumps({**regs, register: value}).encode())))
    done = minivmm_cli("resume", str(path))
    assert one_line_error(done) and f"register {register}" in done.stderr, done.stderr


def test_deeply_nested_json_is_refused(snap_sections, tmp_path):
    path = tmp_path / "n.snap"
    path.write_bytes(pack_snapshot(_with(snap_sections, "meta", b"[" * 100000 + b"]" * 100000)))
    assert one_line_error(minivmm_cli("snapshot", "inspect", str(path)))


def test_snapshot_inspect_reads_like_a_person_wrote_it(snap_sections, tmp_path):
    path = tmp_path / "ok.snap"
    path.write_bytes(pack_snapshot(snap_sections))
    out = minivmm_cli("snapshot", "inspect", str(path)).stdout
    assert "entry: 0x100000" in out and "memory: 16 MiB" in out and "hosts: penryn" in out
    assert "[" not in out and "None" not in out


# ---- ELF and memory sizes --------------------------------------------------------------------

def _elf(memsz: int) -> bytes:
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x100000, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    return header + struct.pack("<IIQQQQQQ", 1, 5, 0, 0x100000, 0x100000, 120, memsz, 0x1000)


@pytest.mark.parametrize("memsz", [2 << 30, (1 << 64) - 1])
def test_elf_segment_sizes_are_checked_before_anything_is_allocated(tmp_path, memsz):
    path = tmp_path / "huge.elf"
    path.write_bytes(_elf(memsz))
    done, rss, _ = measured_cli("run", str(path))
    assert one_line_error(done) and rss < 200 and ("beyond" in done.stderr), done.stderr


def test_memory_that_the_machine_cannot_allocate_is_one_line():
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, hard))

    done = subprocess.run([sys.executable, "-m", "minivmm", "run", "hello", "--memory", "2G"], capture_output=True,
                          text=True, preexec_fn=limit, timeout=60)
    assert one_line_error(done) and "cannot allocate" in done.stderr


# ---- bounded logs ----------------------------------------------------------------------------

def test_a_cpuid_storm_keeps_exact_totals_and_a_bounded_sample(asm_guest):
    done, rss, _ = measured_cli("run", asm_guest("l: xor eax, eax\ncpuid\nmov eax, 1\ncpuid\njmp l\n"),
                                "--json", "--timeout", "3")
    report = json.loads(done.stdout)
    totals = {(c["leaf"], c["subleaf"]): c["count"] for c in report["cpuid_exit_counts"]}
    assert len(report["cpuid_exits"]) == 10_000 and report["truncated"]["cpuid_exits"] > 10_000
    assert sum(totals.values()) == len(report["cpuid_exits"]) + report["truncated"]["cpuid_exits"]
    assert abs(totals[(0, 0)] - totals[(1, 0)]) <= 1  # the loop alternates: totals are exact
    assert len(done.stdout) < 10 << 20 and rss < 500


def test_exceptions_are_bounded_with_totals_per_vector(run_asm):
    # ud2 forever, each #UD delivered to a handler that returns to it
    result = run_asm("""
        lea rax, [rip + again]
        mov ecx, 6
        call install_gate
    again:
        ud2
    .include "lib/idt.inc"
    """, timeout=3)
    assert len(result.exceptions) == 10_000 and result.left_out["exceptions"] > 0
    assert result.exception_totals[6] == len(result.exceptions) + result.left_out["exceptions"]


# ---- nothing lost --------------------------------------------------------------------------

def test_a_failing_compare_leaves_an_existing_report_alone(tmp_path):
    page = tmp_path / "report.html"
    page.write_text("yesterday's report")
    assert one_line_error(minivmm_cli("compare", "detect_both", "--hosts", "nosuchhost", "--html", str(page)))
    assert page.read_text() == "yesterday's report"


def test_an_output_that_is_an_input_is_refused_before_anything_is_written(asm_guest, tmp_path):
    guest = asm_guest("out 0xf5, al\nhlt\n")
    before = open(guest).read()
    for args in (["run", guest, "--snapshot-at", "checkpoint:1", "--snapshot-file", guest],
                 ["compare", guest, "--hosts", "core2", "--html", guest],
                 ["matrix", guest, "--hosts", "core2", "--junit", guest]):
        done = minivmm_cli(*args)
        assert one_line_error(done) and "also an input" in done.stderr, done.stderr
    assert open(guest).read() == before


def test_a_snapshot_write_that_fails_keeps_the_previous_snapshot(tmp_path):
    path = tmp_path / "vm.snap"
    VM("dispatch_cpuid", "penryn").run(snapshot_at="checkpoint:1", snapshot_file=str(path), timeout=60)
    before = path.read_bytes()

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    done = subprocess.run([sys.executable, "-m", "minivmm", "run", "dispatch_cpuid", "--host", "nehalem",
                           "--snapshot-at", "checkpoint:1", "--snapshot-file", str(path)],
                          capture_output=True, text=True, preexec_fn=small_files, timeout=60)
    assert done.returncode == 2 and "cannot write snapshot" in done.stderr and "Traceback" not in done.stderr
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["vm.snap"]


def test_a_snapshot_carries_its_mask_template_by_content(tmp_path):
    template = tmp_path / "hide.json"
    template.write_text(json.dumps({"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0, "modifiers": [
        {"register": "ecx", "bitmap": "0b" + "x" * 12 + "0" + "x" * 19}]}]}))
    snap = tmp_path / "vm.snap"
    VM("dispatch_cpuid", "penryn", masks=[str(template)]).run(snapshot_at="checkpoint:1", snapshot_file=str(snap),
                                                               timeout=60)
    template.unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, "-m", "minivmm", "resume", str(snap), "--json"], capture_output=True,
                          text=True, cwd=elsewhere, timeout=60)
    report = json.loads(done.stdout)
    assert done.returncode == 0 and "sse4_1" not in report["view_features"] and "path: sse2" in report["console"]


def test_unreached_points_are_said(asm_guest):
    guest = asm_guest("out 0xf5, al\nmov al, 0\nout 0xf4, al\n")
    done = minivmm_cli("run", guest, "--host", "core2", "--migrate", "penryn@checkpoint:1",
                       "--migrate", "nehalem@checkpoint:2", "--snapshot-at", "checkpoint:5", "--snapshot-file",
                       str(os.path.dirname(guest) + "/never.snap"))
    assert "never reached: migration to nehalem at checkpoint:2" in done.stderr
    from minivmm.vmm.migration import PreCopy
    result = VM(guest, "core2").run(migrations=["penryn@checkpoint:1", "nehalem@checkpoint:2"], timeout=10,
                                    precopy=PreCopy(enabled=False))
    assert result.unreached == [{"event": "migration", "to": "nehalem", "when": "checkpoint:2"}]
    assert result.hosts == ["core2", "penryn"]


CLOSE_CHECKPOINTS = """
    out 0xf5, al                 ; checkpoint 1
    mov ecx, 1000
a:  dec ecx
    jnz a
    out 0xf5, al                 ; checkpoint 2: reached while the first move is in pre-copy
    mov rcx, 30000000
b:  dec rcx
    jnz b
    mov al, 0
    out 0xf4, al
"""


def test_a_point_reached_during_pre_copy_is_carried_out_not_dropped(asm_guest):
    result = VM(asm_guest(CLOSE_CHECKPOINTS), "core2").run(
        migrations=["penryn@checkpoint:1", "nehalem@checkpoint:2"], timeout=60)
    assert result.hosts == ["core2", "penryn", "nehalem"], result.migrations
    assert [m["ok"] for m in result.migrations] == [True, True] and result.unreached == []


def test_a_guest_that_ends_during_pre_copy_was_not_refused(asm_guest):
    guest = asm_guest("out 0xf5, al\nmov al, 0\nout 0xf4, al\n")
    done = minivmm_cli("run", guest, "--host", "core2", "--migrate", "penryn@checkpoint:1")
    assert "refused" not in done.stderr and "did not migrate core2 -> penryn" in done.stderr


COUNTED = "mov ecx, 1000\nl: dec ecx\njnz l\nmov al, 0\nout 0xf4, al\n"   # 1 + 2 x 1000 + 2 = 2003


@pytest.mark.parametrize("options", [
    {"max_insns": 1_000_000}, {"max_insns": 2003},
    {"migrations": ["penryn@insn:500"]}, {"migrations": ["penryn@insn:500"], "precopy_enabled": False},
    {"migrations": ["penryn@insn:500", "nehalem@insn:1500"], "precopy_enabled": False},
])
def test_instructions_is_the_exact_total_whenever_counting_is_on(asm_guest, options):
    from minivmm.vmm.migration import PreCopy
    options = dict(options)
    precopy = PreCopy(enabled=options.pop("precopy_enabled", True))
    result = VM(asm_guest(COUNTED), "core2").run(timeout=10, precopy=precopy, **options)
    assert result.stop.reason == "exited" and result.instructions == 2003


def test_instruction_budget_one_short_is_a_limit(asm_guest):
    result = VM(asm_guest(COUNTED), "core2").run(max_insns=2002, timeout=10)
    assert result.stop.reason == "limit" and result.instructions == 2002


def test_a_forced_move_to_a_host_without_xsave_shows_the_guests_fault_not_the_vmms(tmp_path):
    result = VM("dispatch_cpuid", "sandybridge").run(migrations=["core2@checkpoint:1"], force=True, timeout=60)
    assert all(e["rip"] >= 0x100000 for e in result.exceptions), result.exceptions
    assert "core2 has no XSAVE" in result.migrations[0]["lost"][0]


def test_console_and_unknown_system_calls_are_bounded_in_the_report():
    """Output is streamed whole, but the report keeps 16 MiB of it and counts the rest;
    a program calling random system-call numbers counts the first 1000 one by one."""
    from minivmm.linux.kernel import Kernel
    from minivmm.linux.memory import AddressSpace
    from minivmm.linux.process import Process
    from minivmm.linux.vfs import FileSystem
    from minivmm.vmm.exits.io import CONSOLE_KEPT, IoExits
    streamed = []
    io = IoExits(lambda data: streamed.append(len(data)), None, None)
    for _ in range(17):
        io.console_write(bytes(1 << 20))
    assert len(io.console) == CONSOLE_KEPT and io.console_left_out == 1 << 20 and sum(streamed) == 17 << 20
    kernel = Kernel(Process(AddressSpace(bytearray(1 << 20)), 0, 0, 0, 0, "/p"), FileSystem([], {}), 0)
    for number in range(1000, 3000):
        assert kernel.dispatch(None, number, (0,) * 6) == (1 << 64) - 38  # -ENOSYS
    assert len(kernel.p.unknown) == 1000 and kernel.p.unknown_others == 1000 and len(kernel.p.sample) == 2000


def test_every_reader_refuses_a_non_regular_file_in_under_a_second(tmp_path):
    """The refusal itself, in process (start-up excluded): no reader blocks on a FIFO or
    reads /dev/zero."""
    from minivmm.cpu.profiles import load_profile
    from minivmm.guests.loader import load_guest
    from minivmm.masking.formats import parse_firecracker_template
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    readers = (load_guest, lambda p: load_profile(f"file:{p}"), parse_firecracker_template, snapshot_mod.load,
               lambda p: VM(_including(tmp_path, p)))
    for target in (str(fifo), str(tmp_path), "/dev/zero"):
        for reader in readers:
            started = time.monotonic()
            with pytest.raises(MinivmmError):
                reader(target)
            assert time.monotonic() - started < 1, (reader, target)


def test_shipped_guests_run_with_their_defaults():
    """dirty_loop declares the 64 MiB its working set needs: no --memory required."""
    result = VM("dirty_loop", "nehalem").run(timeout=1)
    assert result.memory == 64 << 20 and result.stop.reason == "limit" and not result.exceptions


def test_compare_defaults_to_every_host_as_matrix_does():
    from minivmm.cpu.profiles import builtin_names
    report = json.loads(minivmm_cli("compare", "hello", "--json", timeout=120).stdout)
    assert report["hosts"] == builtin_names()
