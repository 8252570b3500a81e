"""Virtual time that moves with the program's work (the engine counts the bytes of code
it executes, 4 ns each), the same run after run, and the timers that deliver
signals in it: alarm, setitimer, POSIX timers, interrupting blocking calls as Linux does.
The oracle is the machine's kernel: timers.c prints the same natively and under minivmm."""

import ctypes
import os
import pty
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from test_linux import needs_gcc

from minivmm.linux import clock as clock_module
from minivmm.vmm import engine
from minivmm.vmm import snapshot as snapshot_mod
from minivmm.vmm.vm import VM

SOURCE = Path(__file__).parent / "data" / "linux" / "timers.c"
ZSTD = shutil.which("zstd")
DD = shutil.which("dd")


@pytest.fixture(scope="module")
def timers(tmp_path_factory):
    program = tmp_path_factory.mktemp("clock") / "timers"
    done = subprocess.run(["gcc", "-static", "-O1", "-o", str(program), str(SOURCE)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"gcc -static failed (no static glibc?): {done.stderr.strip()[:200]}")
    return str(program)


def native(program: str, *args: str, stdin=None) -> tuple[str, int]:
    """stdout and the exit status as a shell reports it (128 + a signal that killed it)."""
    done = subprocess.run([program, *args], capture_output=True, text=True, timeout=60, stdin=stdin)
    return done.stdout, done.returncode if done.returncode >= 0 else 128 - done.returncode


def under_minivmm(program: str, *args: str, timeout: float = 60, **options):
    return VM(program, "nehalem", argv=list(args), **options).run(timeout=timeout)


@needs_gcc
@pytest.mark.parametrize("mode", ["elapsed", "alarm", "itimer", "posix", "blocking", "blocked", "default"])
def test_timers_deliver_their_signals_as_linux_does(timers, mode):
    """alarm(1) and periodic timers signal a program that spins (no system call to wait
    in), siginfo as the kernel fills it; nanosleep, pause and sigsuspend return EINTR
    (whatever SA_RESTART says), a blocked signal waits, an ignored one is dropped, one
    without a handler kills (SIGALRM: 142)."""
    result = under_minivmm(timers, mode)
    assert (result.console, result.exit_code) == native(timers, mode), result.stop.message


@needs_gcc
def test_a_timer_interrupts_a_read_of_a_terminal(timers):
    """A read waiting for a terminal lets time pass: SIGALRM ends it with EINTR, or,
    under SA_RESTART, the read starts again and returns what is typed (half a second
    after the first read ended, long after the second one's 50 ms timer); a 32-bit read
    (INT $0x80) ends with EINTR as the 64-bit one."""
    def on_terminal(run):
        master, slave = pty.openpty()
        typist = threading.Timer(0.5, os.write, (master, b"typed\n"))

        def first_line():
            if not typist.is_alive() and not typist.finished.is_set():
                typist.start()
        try:
            return run(slave, first_line)
        finally:
            if typist.ident:
                typist.join()
            os.close(master)
            os.close(slave)

    def native_run(fd, first_line):
        with subprocess.Popen([timers, "read"], stdin=fd, stdout=subprocess.PIPE, text=True) as child:
            lines = [child.stdout.readline()]
            first_line()
            return "".join(lines + child.stdout.readlines()), child.wait(timeout=60)

    def our_run(fd, first_line):
        result = VM(timers, "nehalem", argv=["read"], stdin=fd).run(
            timeout=60, console=lambda data: b"\n" in data and first_line())
        return result.console, result.exit_code
    assert on_terminal(our_run) == on_terminal(native_run)


@needs_gcc
def test_time_moves_with_the_work_and_every_run_reads_the_same(timers):
    """A loop between two clock_gettime calls took milliseconds of virtual time (not the
    microsecond of a system call); an alarm came after the same number of spins, and
    the wall clock read the same nanosecond, in both runs."""
    one, two = (under_minivmm(timers, "work").console for _ in range(2))
    assert one == two
    elapsed, spins, seconds = (int(n) for n in re.fullmatch(
        r"elapsed (\d+) ns\nspins until a 100 ms alarm: (\d+)\nwall (\d+)\.\d{9}\n", one).groups())
    assert 1_000_000 < elapsed < 10**9 and spins > 1000 and seconds >= 1_700_000_000


@needs_gcc
def test_time_that_moves_only_at_system_calls_sees_no_work_negative_control(timers, monkeypatch):
    """Without the engine counting the program's code, the loop took the one system
    call's microsecond, and a spinning program's alarm never comes."""
    monkeypatch.setattr(engine, "add_block_counter", lambda *_: (None, None, (ctypes.c_uint64 * 7)(), None))
    assert under_minivmm(timers, "elapsed").console == "elapsed plausible: 0\n"
    assert under_minivmm(timers, "alarm", timeout=1).stop.reason == "limit"


@needs_gcc
def test_a_snapshot_keeps_the_clock_and_its_timers(timers, tmp_path):
    """Saved right after setitimer armed a timer, resumed in a new engine: the alarm
    comes after the same spins, at the same wall time, as in a run never stopped."""
    probe = under_minivmm(timers, "work")
    point = probe.syscalls["sample"].index("setitimer") + 1
    snap = tmp_path / "armed.snap"
    alone = VM(timers, "nehalem", argv=["work"], memory="32M").run(   # (it carries on to the end)
        snapshot_at=f"syscall:{point}", snapshot_file=str(snap), timeout=60)
    saved = snapshot_mod.load(str(snap))
    assert saved.process["timers"]["itimers"][0][8] is True   # ITIMER_REAL running
    resumed = VM.resume(saved).run(timeout=60)
    assert (resumed.console, resumed.exit_code) == (alone.console, 0)
    memory = bytearray(saved.meta["memory"])
    saved.load_memory(memory)
    for field, value in (("timers", {"itimers": [], "posix": [], "next_id": 0}),
                         ("signals", dict(saved.process["signals"], pending=[[14, 0, "", 7]]))):
        hostile = snapshot_mod.Snapshot(saved.meta, saved.regs, saved.cpuid, saved.console, bytes(memory),
                                        process=dict(saved.process, **{field: value}))
        (tmp_path / "bad.snap").write_bytes(hostile.to_bytes())
        with pytest.raises(Exception, match="process:"):
            VM.resume(snapshot_mod.load(str(tmp_path / "bad.snap")))


@pytest.mark.skipif(not DD, reason="no dd on this machine")
def test_dd_reports_a_speed_its_copies_took_time_for():
    """The kernel's copies to and from the program take time by their size: dd of 64 MiB
    in 1 MiB blocks reports hundreds of MB/s (it reported 189 GB/s when a system call
    took 1 us whatever it moved)."""
    result = VM(DD, "nehalem", mounts=["/"], argv=["if=/dev/zero", "of=/dev/null", "bs=1M", "count=64"]).run(
        timeout=60)
    assert result.exit_code == 0, result.stop.message
    speed, unit = re.search(r"copied, [\d.]+ s, ([\d.]+) ([kMG]?B)/s", result.stderr).groups()
    assert unit == "MB" and 100 < float(speed) < 1000, result.stderr


@pytest.mark.skipif(not ZSTD, reason="zstd is not installed (apt install zstd)")
def test_zstd_s_benchmark_finishes_and_reports_speeds(tmp_path):
    """zstd -b1 -i1 measures each speed for at least a second of its clock, running
    more rounds until it has: with time that moves only at system calls it never
    finished. (Haswell under intel-westmere: no AVX paths, whose instructions each exit
    to the machine's CPU, and LZCNT/TZCNT run by the engine, so the run is quick.)"""
    sample = tmp_path / "sample.txt"
    sample.write_bytes(SOURCE.read_bytes() * 3)
    result = VM(ZSTD, "haswell", evc="intel-westmere", mounts=["/"], argv=["-b1", "-i1", str(sample)]).run(timeout=120)
    assert (result.stop.reason, result.exit_code) == ("exited", 0), result.stop.message
    compress, decompress = (float(s) for s in re.findall(r"([\d.]+) MB/s", result.console)[-2:])
    assert 0.1 < compress < decompress < 10_000, result.console


@needs_gcc
def test_cpu_time_clocks_and_resolutions_as_linux_answers(tmp_path):
    """clock_getcpuclockid and pthread_getcpuclockid name clocks a program reads (pid 0
    and its own tid; no such pid, or a fourth kind of time, is EINVAL); the coarse
    clocks and the profiling CPU clock tick at HZ. The machine's kernel is the oracle
    where its HZ is minivmm's (Debian's and Ubuntu's 250)."""
    program = tmp_path / "cpuclocks"
    source = Path(__file__).parent / "data" / "linux" / "cpuclocks.c"
    subprocess.run(["gcc", "-static", "-O1", "-o", str(program), str(source), "-lpthread"], check=True)
    tick = str(10**9 // clock_module.HZ)
    expected = [f"res 5 {tick}", f"res 6 {tick}", "res 1 1", "res 2 1", "getcpuclockid 0 id -6 gettime 0 res 0 1",
                "pthread 0 gettime 0", "no such pid -1 22", "which 3 -1 22", f"prof res 0 {tick}"]
    assert under_minivmm(str(program)).console.splitlines() == expected
    here = native(str(program))[0].splitlines()
    if here[0] == f"res 5 {tick}":
        assert here == expected
