"""--accel native into the emulator: a program started on the machine's own CPU, moved
at syscall:N to an emulated host (or saved as the emulator's snapshot there), carries on
as that host would run it. The seed's story across the boundary: the SIGILL prober
found POPCNT on the real CPU under the Penryn baseline and dies of it on the emulated
Penryn; its CPUID-guided twin finishes with the checksum it has natively.
"""

import json
import struct
import subprocess
from pathlib import Path

import pytest
from helpers import minivmm_cli
from test_accel_native import needs_faulting, needs_gcc, shipped

from minivmm.accel.placement import AT_IGNORE, AT_SYSINFO_EHDR, Area, free_below, moved_stack, parse_maps
from minivmm.errors import MinivmmError
from minivmm.vmm.vm import VM


@pytest.fixture(scope="module")
def prober():
    return shipped("probe_popcnt.c")


@pytest.fixture(scope="module")
def after_detection(prober):
    """The point right after the detection line: the first write's number, counted natively."""
    counted = VM(prober, evc="intel-penryn", accel="native").run(migrations=["penryn@syscall:1000000"], timeout=30)
    assert counted.unreached and counted.syscalls["total"] == len(counted.syscalls["sample"])
    return counted.syscalls["sample"].index("write") + 1


@needs_faulting
@needs_gcc
def test_the_prober_moved_from_the_real_cpu_dies_of_sigill_on_the_emulated_penryn(prober, after_detection):
    point = f"penryn@syscall:{after_detection}"
    moved = VM(prober, evc="intel-penryn", accel="native").run(migrations=[point], timeout=60)
    assert moved.console.startswith("popcnt: cpuid=0 probe=1 uses=popcnt")   # found on the real CPU
    assert (moved.stop.signal, moved.exit_code, moved.host) == ("SIGILL", 132, "penryn")
    assert moved.stop.missing_features == ["popcnt"] and moved.hosts == ["native", "penryn"]
    record = moved.migrations[0]
    assert record["ok"] and record["from"] == "native" and record["mode"] == "stop-and-copy"
    # the twin asks CPUID, takes the generic path, and finishes with the native checksum
    natively = VM(prober, evc="intel-penryn", accel="native", argv=["--cpuid"]).run(timeout=30)
    twin = VM(prober, evc="intel-penryn", accel="native", argv=["--cpuid"]).run(migrations=[point], timeout=60)
    assert twin.exit_code == 0 and twin.hosts == ["native", "penryn"] and twin.console == natively.console
    assert "path: generic" in twin.console
    # its CPUID exits were answered on the real CPU, before the move, as in the run that stayed
    assert {e["host"] for e in twin.cpuid_exits} == {"native"} and twin.cpuid_totals == natively.cpuid_totals


@needs_faulting
@needs_gcc
def test_a_snapshot_taken_natively_resumes_in_another_process_with_the_native_output(prober, after_detection, tmp_path):
    snapshot = tmp_path / "native.snap"
    natively = VM(prober, evc="intel-penryn", accel="native", argv=["--cpuid"]).run(timeout=30)
    taken = VM(prober, evc="intel-penryn", accel="native", argv=["--cpuid"]).run(
        snapshot_at=f"syscall:{after_detection}", snapshot_file=str(snapshot), timeout=30)
    assert taken.snapshots == [{"when": f"syscall:{after_detection}", "file": str(snapshot), "host": "native"}]
    assert taken.console == natively.console and taken.exit_code == 0   # it carried on natively
    refused = minivmm_cli("resume", str(snapshot), "--host", "westmere")
    assert refused.returncode == 2 and "needs --mount /" in refused.stderr   # the machine's files are granted
    resumed = minivmm_cli("resume", str(snapshot), "--host", "westmere", "--mount", "/", "--json")
    report = json.loads(resumed.stdout)
    assert resumed.returncode == 0, resumed.stderr
    assert report["console"] == natively.console and report["hosts"] == ["native", "westmere"]


@needs_faulting
def test_a_program_that_cannot_move_stays_native_and_says_why():
    """A PIE program lives above any VM's RAM: the migration is refused, the program
    runs on natively to the end it has without one (a refused vMotion leaves the VM)."""
    alone = VM("/bin/sh", argv=["-c", "echo a; echo b"], accel="native").run(timeout=30)
    tried = VM("/bin/sh", argv=["-c", "echo a; echo b"], accel="native").run(
        migrations=["penryn@syscall:3"], timeout=30)
    assert tried.console == alone.console == "a\nb\n" and tried.exit_code == 0 and tried.hosts == ["native"]
    assert not tried.migrations[0]["ok"] and "static, not PIE" in tried.migrations[0]["reason"]


@needs_faulting
@needs_gcc
def test_a_destination_that_cannot_run_the_view_is_refused_and_the_program_stays(prober, after_detection):
    natively = VM(prober, evc="intel-sandybridge", accel="native").run(timeout=30)
    tried = VM(prober, evc="intel-sandybridge", accel="native").run(
        migrations=[f"penryn@syscall:{after_detection}"], timeout=60)
    record = tried.migrations[0]
    assert not record["ok"] and "avx" in record["missing"] and "stays native" in record["reason"]
    assert tried.console == natively.console and tried.exit_code == 0 and tried.hosts == ["native"]
    forced = VM(prober, evc="intel-sandybridge", accel="native").run(
        migrations=[f"penryn@syscall:{after_detection}"], force=True, timeout=60)
    assert forced.migrations[0]["forced"] and forced.hosts == ["native", "penryn"]


@needs_faulting
@needs_gcc
def test_threads_are_not_carried(tmp_path):
    source = tmp_path / "threads.c"
    source.write_text(r"""
        #include <pthread.h>
        #include <stdio.h>
        #include <unistd.h>
        static void *idle(void *arg) { pause(); return arg; }
        int main(void) {
            pthread_t t;
            pthread_create(&t, 0, idle, 0);
            for (int i = 0; i < 50; i++) getppid();
            puts("done");
            return 0;
        }""")
    binary = tmp_path / "threads"
    built = subprocess.run(["gcc", "-static", "-O1", "-pthread", "-o", str(binary), str(source)], capture_output=True)
    if built.returncode:
        pytest.skip(f"gcc -static -pthread failed: {built.stderr.decode()[:200]}")
    tried = VM(str(binary), accel="native").run(migrations=["native@syscall:40"], timeout=30)
    assert tried.console == "done\n" and tried.hosts == ["native"]
    assert "1 more threads" in tried.migrations[0]["reason"]


def test_only_syscall_points_and_memory_with_a_point_are_taken_natively():
    for kwargs, what in (({"migrations": ["penryn@insn:5"]}, "syscall:N"),
                         ({"snapshot_at": "ms:3", "snapshot_file": "/tmp/x"}, "syscall:N")):
        with pytest.raises(MinivmmError, match=what):
            VM("/bin/true", accel="native").run(timeout=5, **kwargs)
    with pytest.raises(MinivmmError, match="--memory is the RAM of the VM the program moves into"):
        VM("/bin/true", accel="native", memory="64M").run(timeout=5)


# -- the layout rules, on their own ----------------------------------------------------------

def test_free_below_searches_top_down_as_the_emulator_does():
    areas = [Area(0x400000, 0x500000, "r-xp", 0, 1, "/p"), Area(0x900000, 0xA00000, "rw-p", 0, 0, "")]
    assert free_below(areas, 0x1000, 0xA00000, 0x10000) == 0x8FF000      # just below the highest mapping
    assert free_below(areas, 0x400000, 0xA00000, 0x10000) == 0x500000    # the gap that fits
    assert free_below(areas, 0x500000, 0xA00000, 0x10000) is None or \
        free_below(areas, 0x500000, 0xA00000, 0x10000) < 0x400000
    assert free_below(areas, 0x1, 0x400000, 0x3FF000) == 0x3FF000         # lengths round up to a page


def test_a_moved_stack_keeps_its_pointers_and_withholds_the_vdso():
    start, size = 0x7FFF0000, 0x1000
    rsp = start + 0x100
    strings = start + 0x800
    words = [1, strings, 0, strings + 8, 0, AT_SYSINFO_EHDR, 0x7FFFF000, 25, strings + 16, 6, 4096, 0, 0]
    data = bytearray(size)
    struct.pack_into(f"<{len(words)}Q", data, rsp - start, *words)
    moved, auxv = moved_stack(bytes(data), start, rsp, -0x7F000000)
    out = struct.unpack_from(f"<{len(words)}Q", moved, rsp - start)
    assert out[1] == strings - 0x7F000000 and out[3] == strings + 8 - 0x7F000000   # argv, envp
    assert out[5:7] == (AT_IGNORE, 0) and out[8] == strings + 16 - 0x7F000000    # vDSO gone, AT_RANDOM moved
    assert out[9:11] == (6, 4096)                                                 # AT_PAGESZ untouched
    assert auxv == struct.pack("<8Q", AT_IGNORE, 0, 25, strings + 16 - 0x7F000000, 6, 4096, 0, 0)


def test_maps_lines_parse_with_their_names():
    text = ("00400000-00401000 r-xp 00000000 fe:00 338944                     /usr/bin/a b\n"
            "7fff0c2eb000-7fff0c30c000 rw-p 00000000 00:00 0                          [stack]\n"
            "00600000-00601000 rw-s 00001000 00:05 7\n")
    areas = parse_maps(text)
    assert [(a.name, a.prot, a.shared, a.offset) for a in areas] == [
        ("/usr/bin/a b", 5, False, 0), ("[stack]", 3, False, 0), ("", 3, True, 0x1000)]


@pytest.fixture(scope="module")
def carried(tmp_path_factory):
    out = tmp_path_factory.mktemp("carried") / "carried"
    built = subprocess.run(["gcc", "-static", "-O1", "-o", str(out), str(Path(__file__).parent / "data" / "linux" /
                                                                       "carried.c")], capture_output=True, text=True)
    if built.returncode:
        pytest.skip(f"gcc -static failed: {built.stderr[:200]}")
    return str(out)


@needs_faulting
@needs_gcc
@pytest.mark.parametrize("mode", ["cpuinfo", "dup", "close"])
def test_what_a_process_holds_moves_with_it(carried, mode):
    """/proc/cpuinfo read across the point (the view's text), stdout under another
    number, stdout closed: the moved program says what it says natively."""
    alone = VM(carried, argv=[mode], accel="native").run(migrations=["native@syscall:100000"], timeout=30)
    at = alone.syscalls["sample"].index("getppid") + 10
    moved = VM(carried, argv=[mode], accel="native").run(migrations=[f"native@syscall:{at}"], timeout=60)
    assert moved.migrations[0]["ok"], moved.migrations[0].get("reason")
    assert (moved.console, moved.stderr, moved.exit_code) == (alone.console, alone.stderr, 0)
    assert moved.hosts == ["native", "native"] and "done" in moved.stderr


@needs_faulting
@needs_gcc
def test_a_file_open_for_writing_keeps_the_program_native(carried, tmp_path):
    target = tmp_path / "written"
    tried = VM(carried, argv=["write", str(target)], accel="native").run(migrations=["penryn@syscall:30"], timeout=30)
    assert not tried.migrations[0]["ok"] and "open for reading" in tried.migrations[0]["reason"]
    assert "wrote: 1" in tried.console and target.read_text() == "x"   # natively, to the end


@needs_faulting
@needs_gcc
def test_the_migration_policy_holds_natively(carried):
    tried = VM(carried, accel="native", policy="disabled").run(migrations=["penryn@syscall:30"], timeout=30)
    assert not tried.migrations[0]["ok"] and "policy is disabled" in tried.migrations[0]["reason"]
    assert tried.hosts == ["native"] and tried.exit_code == 0
