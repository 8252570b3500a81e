#!/usr/bin/env python3
"""minivmm benchmarks: each row against bare unicorn, measured in the same run.

    python3 bench/bench.py            # prints a Markdown table
    python3 bench/bench.py --quick    # fewer repetitions

Timings on the emulator are noisy (unicorn's speed on a tight loop is bimodal
from run to run), so each measurement is repeated, interleaved with its
baseline, and the median is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_64, Uc
from unicorn.x86_const import UC_CPU_X86_NEHALEM, UC_X86_INS_CPUID, UC_X86_REG_RSP

from minivmm.guests import LOAD_ADDRESS
from minivmm.guests.assembler import assemble
from minivmm.linux.clock import CODE_NS_SHIFT, Clock
from minivmm.vmm.engine import add_block_counter
from minivmm.vmm.vm import VM

REPO = Path(__file__).resolve().parent.parent

LOOP_ITERATIONS = 100_000_000
COMPUTE_LOOP = f"""
    mov rcx, {LOOP_ITERATIONS}
top:
    add rax, rcx
    xor rbx, rax
    rol rbx, 7
    dec rcx
    jnz top
    out 0xf4, al
"""
CPUIDS = 100_000
CPUID_LOOP = f"""
    mov esi, {CPUIDS}
top:
    mov eax, 1
    xor ecx, ecx
    cpuid
    dec esi
    jnz top
    out 0xf4, al
"""


VECTOR_ITERATIONS = 100_000
VECTOR_LOOP = f"""
    xor ecx, ecx
    xgetbv
    or eax, 7
    xsetbv
    mov ecx, {VECTOR_ITERATIONS}
top:
{{body}}
    dec ecx
    jnz top
    out 0xf4, al
"""
AVX2_BODY = """
    vpaddd ymm0, ymm0, ymm1
    vpxor ymm2, ymm2, ymm0
    vpshufd ymm3, ymm2, 0x1b
    vpsubd ymm1, ymm1, ymm3
    vpaddq ymm4, ymm4, ymm2
    vpand ymm5, ymm4, ymm1
    vpor ymm6, ymm6, ymm5
    vpsrld ymm7, ymm6, 3
"""
SSE2_BODY = """
    paddd xmm0, xmm1
    pxor xmm2, xmm0
    pshufd xmm3, xmm2, 0x1b
    psubd xmm1, xmm3
    paddq xmm4, xmm2
    pand xmm5, xmm1
    por xmm6, xmm5
    psrld xmm7, 3
"""
ISOLATED_AVX2 = "    vpaddd ymm0, ymm0, ymm1\n    push rax\n    pop rax"
ISOLATED_SSE2 = "    paddd xmm0, xmm1\n    push rax\n    pop rax"

UDS = 20_000
UD_LOOP = """
    lea rax, [rip + on_ud]
    mov ecx, 6
    call install_gate
    mov esi, {count}
top:
    {body}
    dec esi
    jnz top
    out 0xf4, al
on_ud:
    add qword ptr [rsp], 2
    iretq
.include "lib/idt.inc"
"""
# A hot loop on a page that also holds instructions the host must trap (never reached).
GATED_LOOP = COMPUTE_LOOP.replace("out 0xf4, al", "out 0xf4, al\n    popcnt rax, rbx\n    aesenc xmm0, xmm1")
AUDITED_ITERATIONS = 200_000
AUDITED_LOOP = f"""
    mov rcx, {AUDITED_ITERATIONS}
top:
    popcnt rax, rcx
    add rbx, rax
    dec rcx
    jnz top
    out 0xf4, al
"""


# Fills RAM (below the stack) with LCG words, then spins: a snapshot worth compressing.
FILL_THEN_IDLE = """
    mov rcx, rsp
    sub rcx, 0x200000
    shr rcx, 3
    mov rdi, 0x200000
    mov rax, 12345
    mov rbx, 6364136223846793005
    mov rdx, 1442695040888963407
fill:
    imul rax, rbx
    add rax, rdx
    stosq
    dec rcx
    jnz fill
    out 0xf5, al
idle:
    pause
    jmp idle
"""
FILL_THEN_OFF = FILL_THEN_IDLE.replace("idle:\n    pause\n    jmp idle", "out 0xf4, al")


def bare_unicorn(source: str, hook=None, block_counter: bool = False) -> float:
    """Seconds to run the code on a bare engine: no GDT, no exits, nothing of ours (but
    the block counter of a Linux program's clock, if asked)."""
    code = assemble(source)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.ctl_set_cpu_model(UC_CPU_X86_NEHALEM)
    uc.mem_map(0, 16 << 20)
    uc.mem_write(LOAD_ADDRESS, code)
    uc.reg_write(UC_X86_REG_RSP, 16 << 20)
    if hook:
        uc.hook_add(UC_HOOK_INSN, hook, None, 1, 0, UC_X86_INS_CPUID)
    if block_counter:
        counter = Clock().counter
        kept = add_block_counter(uc, counter, 0, CODE_NS_SHIFT)  # noqa: F841 (alive while the engine runs)
    start = time.perf_counter()
    uc.emu_start(LOAD_ADDRESS, LOAD_ADDRESS + code.index(b"\xe6\xf4"))  # stop at "out 0xf4, al"
    return time.perf_counter() - start


def minivmm_run(path: str, host: str = "nehalem", evc=None, audit=False) -> float:
    vm = VM(path, host, evc=evc)
    start = time.perf_counter()
    result = vm.run(audit=audit)
    elapsed = time.perf_counter() - start
    assert result.stop.reason == "exited", result.stop
    return elapsed


HEADER_PRINTED = []


def emit(row) -> None:
    if not HEADER_PRINTED:
        print("| benchmark | bare unicorn / baseline | minivmm | ratio | target |")
        print("| --- | --- | --- | --- | --- |")
        HEADER_PRINTED.append(True)
    print("| " + " | ".join(row) + " |", flush=True)


def interleaved(repeats: int, *runs):
    samples = [[] for _ in runs]
    for _ in range(repeats):
        for i, run in enumerate(runs):
            samples[i].append(run())
    return [statistics.median(s) for s in samples]


def migration_rows(tmp: str, repeats: int) -> None:
    from minivmm.vmm import snapshot
    from minivmm.vmm.migration import PreCopy
    from minivmm.vmm.vm import _Run
    fill, dirtying = os.path.join(tmp, "fill.asm"), "dirty_loop"   # the shipped guest: 16 MiB, forever
    fill_off = os.path.join(tmp, "fill_off.asm")
    Path(fill).write_text(FILL_THEN_IDLE)
    Path(fill_off).write_text(FILL_THEN_OFF)
    for mib in (16, 64, 256):
        path = os.path.join(tmp, f"{mib}.snap")
        VM(fill_off, "nehalem", memory=f"{mib}M").run(snapshot_at="checkpoint:1", snapshot_file=path)
        loaded = snapshot.load(path)
        ram = bytearray(loaded.meta["memory"])
        loaded.load_memory(ram)
        loaded.memory = bytes(ram)  # as a running VM's capture has it: saving compresses all of it
        save = statistics.median(_timed(lambda: snapshot.save(loaded, path)) for _ in range(3))
        restore = statistics.median(_timed(lambda: VM.resume(snapshot.load(path), "nehalem")) for _ in range(3))
        emit((f"snapshot of a {mib} MiB guest (file {os.path.getsize(path) >> 20} MiB)",
                     f"save {mib / save:.0f} MB/s ({save * 1e3:.0f} ms)", f"restore {mib / restore:.0f} MB/s "
                     f"({restore * 1e3:.0f} ms)", "", "(measured)"))
    for name, guest, when in (("idle", fill, "checkpoint:1"),
                              # once the working set exists (two passes over it): only written pages are sent
                              ("dirtying 16 MiB", dirtying, "insn:40000")):
        records = {}
        # The guest runs counted while pages are in flight (the engine's slow path): a
        # nominal 200 M instructions/s keeps the benchmark short without changing the rounds.
        for label, params in (("pre-copy", PreCopy(guest_insns_per_s=2e8)), ("stop-and-copy", PreCopy(enabled=False))):
            # The guest keeps running after the move: the time budget ends the run.
            result = VM(guest, "nehalem", memory="64M").run(migrations=[f"westmere@{when}"], precopy=params,
                                                             timeout=3.0)
            records[label] = result.migrations[0]
        pre, stop = records["pre-copy"], records["stop-and-copy"]
        emit((f"migration of a 64 MiB guest, {name}: downtime / total (10 GbE simulated)",
                     f"stop-and-copy: {stop['downtime_ms']:.1f} / {stop['total_ms']:.1f} ms",
                     f"pre-copy: {pre['downtime_ms']:.1f} / {pre['total_ms']:.1f} ms, {pre['rounds']} round{'' if pre['rounds'] == 1 else 's'}",
                     f"{pre['downtime_ms'] / stop['downtime_ms']:.3f}x", "idle downtime <= 5 ms"))
    # A pre-copy round lets the guest run while the round's pages are sent: the first round
    # of a 64 MiB migration at 10 GbE is 54 ms, 54 M instructions at the nominal 1 G/s.
    # Both sides run counted, as pre-copy runs the guest.
    first_round = PreCopy().guest_insns(PreCopy().send_ms(64 * 2**20 // 4096), throttled=False)
    for insns, label, count in ((first_round, "a pre-copy round (the first of a 64 MiB migration)", 3),
                                (5_000_000, "a short round (5 M instructions, the worst case)", repeats)):
        untracked, tracked = [], []
        for _ in range(count):
            for pages, bucket in ((None, untracked), (set(), tracked)):
                run = _Run(VM(dirtying, "nehalem", memory="64M"), None, False, [], False, PreCopy())
                for _ in range(10):  # steady state: let the engine grow its TLB to the working set
                    run.engine.start(200_000)
                    run.engine.exits.flush_tlb()
                run.engine.exits.track(pages)
                bucket.append(_timed(lambda: run.engine.start(insns)))
        off, on = statistics.median(untracked), statistics.median(tracked)
        emit((f"dirty tracking: {label}, guest writing a 16 MiB working set",
              f"{off * 1e3:.0f} ms", f"{on * 1e3:.0f} ms", f"{on / off:.3f}x", "<= 1.1x"))


def matrix_rows(repeats: int) -> None:
    """Cells per second of the matrix with one worker process and with two: the cells
    alone (run_cells), and the whole `minivmm matrix` command with its start-up."""
    from minivmm.cpu.profiles import builtin_names
    from minivmm.testing.matrix import cells, run_cells
    guests = ("dispatch_cpuid", "detect_both", "avx_proper")
    cell_list = cells(guests, hosts="all")
    n = len(cell_list)
    one, two = interleaved(max(repeats // 2, 1), lambda: _timed(lambda: run_cells(cell_list, jobs=1)),
                           lambda: _timed(lambda: run_cells(cell_list, jobs=2)))
    command = [sys.executable, "-m", "minivmm", "matrix", *guests, "--hosts", "all", "--json", "--jobs"]
    whole_one, whole_two = interleaved(max(repeats // 2, 1),
                                       lambda: _timed(lambda: subprocess.run([*command, "1"], capture_output=True)),
                                       lambda: _timed(lambda: subprocess.run([*command, "2"], capture_output=True)))
    emit((f"matrix throughput: {n} cells (3 guests x {len(builtin_names())} hosts)",
          f"--jobs 1: {n / one:.1f} cells/s", f"--jobs 2: {n / two:.1f} cells/s", f"{one / two:.2f}x",
          f">= 1.7x (whole command with start-up: {whole_one:.1f} s vs {whole_two:.1f} s, "
          f"{whole_one / whole_two:.2f}x)"))


def _dask_cluster(workers: int):
    """A `dask scheduler` and ``workers`` single-threaded `dask worker`s on loopback:
    (address, processes)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address, dask = f"tcp://127.0.0.1:{port}", [sys.executable, "-m", "dask"]
    processes = [subprocess.Popen([*dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                                  stderr=subprocess.DEVNULL)]
    processes += [subprocess.Popen([*dask, "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard"],
                                   stderr=subprocess.DEVNULL) for _ in range(workers)]
    import distributed
    with distributed.Client(address, timeout="60s") as client:
        client.wait_for_workers(workers, timeout=120)
    return address, processes


def dask_rows(repeats: int) -> None:
    """Cells per second of the same matrix with --jobs 1 and 2, a LocalCluster of two
    workers (its start-up included, as `--scheduler local:2` pays it), and a running
    two-worker cluster; the Dask path's cost per cell from a one-worker cluster against
    --jobs 1. This machine has two cores: two workers can at most double."""
    try:
        from minivmm.testing.distributed import run_cells_on_dask
    except ImportError:
        emit(("matrix on Dask", "needs pip install 'minivmm[distributed]'", "skipped", "", ""))
        return
    from minivmm.cpu.profiles import builtin_names
    from minivmm.testing.matrix import cells, run_cells
    cell_list = cells(("dispatch_cpuid", "detect_both", "avx_proper"), hosts="all")
    n = len(cell_list)
    clusters = [_dask_cluster(2), _dask_cluster(1)]
    try:
        one, two, local, cluster, single = interleaved(
            max(repeats // 2, 1), lambda: _timed(lambda: run_cells(cell_list, jobs=1)),
            lambda: _timed(lambda: run_cells(cell_list, jobs=2)),
            lambda: _timed(lambda: run_cells_on_dask(cell_list, "local:2")),
            lambda: _timed(lambda: run_cells_on_dask(cell_list, clusters[0][0])),
            lambda: _timed(lambda: run_cells_on_dask(cell_list, clusters[1][0])))
    finally:
        for _, processes in clusters:
            for process in processes:
                process.kill()
                process.wait()
    title = f"matrix on Dask: {n} cells (3 guests x {len(builtin_names())} hosts)"
    emit((title, f"--jobs 1: {n / one:.1f} cells/s", f"--jobs 2: {n / two:.1f} cells/s", f"{one / two:.2f}x", ""))
    emit((title, f"--jobs 1: {n / one:.1f} cells/s", f"local:2: {n / local:.1f} cells/s", f"{one / local:.2f}x",
          "(a LocalCluster started and stopped in each run)"))
    emit((title, f"--jobs 1: {n / one:.1f} cells/s", f"two-worker cluster: {n / cluster:.1f} cells/s",
          f"{one / cluster:.2f}x", "(`dask scheduler`, 2 `dask worker`s running)"))
    emit(("Dask's cost per cell (one-worker cluster vs --jobs 1)", f"{one / n * 1e3:.1f} ms a cell",
          f"{single / n * 1e3:.1f} ms a cell", f"{(single - one) / n * 1e3:+.1f} ms", "(measured)"))


STORM = "top:\n    xor eax, eax\n    cpuid\n    mov eax, 1\n    cpuid\n    jmp top\n"
def storm_row(tmp: str) -> None:
    """A guest executing CPUID forever for 10 s, its report printed as JSON: the VMM's
    peak RSS and the report's size stay bounded (exact totals, a sample of exits)."""
    import json
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import measured_cli  # the tests' own measurement: the child's peak RSS
    path = os.path.join(tmp, "storm.asm")
    Path(path).write_text(STORM)
    done, rss, _ = measured_cli("run", path, "--json", "--timeout", "10", timeout=120)
    report = json.loads(done.stdout)
    exits = sum(c["count"] for c in report["cpuid_exit_counts"])
    emit(("CPUID storm: 10 s of CPUID with --json", f"{exits / 1e6:.1f} M exits, {len(report['cpuid_exits'])} kept",
          f"peak RSS {rss:.0f} MiB, JSON {len(done.stdout) / 2**20:.1f} MiB", "", "< 500 MiB, < 10 MiB"))


def _timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def cli_startup(repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "minivmm", "run", str(REPO / "guests" / "hello.asm")],
                       check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def python_startup(repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


LINUX_LOOP = r"""
#include <stdio.h>
int main(void) {
    unsigned long x = 1, sum = 0;
    for (long i = 0; i < 100000000; i++) { x = x * 6364136223846793005ul + 1; sum += x >> 60; }
    printf("%lu\n", sum);
    return 0;
}
"""
LINUX_SYSCALLS = r"""
#include <unistd.h>
#include <sys/syscall.h>
int main(void) { for (int i = 0; i < 200000; i++) syscall(SYS_getpid); return 0; }
"""
LINUX_HELLO = "#include <stdio.h>\nint main(void) { puts(\"hello\"); return 0; }\n"
MAPS = 100_000
LINUX_MAPS = r"""
#include <stdio.h>
#include <sys/mman.h>
int main(void) {
    unsigned long sum = 0;
    for (int i = 0; i < %d; i++) {              /* each below the last, each touched */
        char *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (page == MAP_FAILED) return 1;
        page[i %% 4096] = 1;
        sum += (unsigned long)page >> 12;
    }
    printf("%%lu\n", sum);
    return 0;
}
""" % MAPS
SIGNALS = 300_000
LINUX_SIGNALS = r"""
#include <signal.h>
#include <stdio.h>
static volatile long handled;
static void on_usr1(int signo) { handled++; }
int main(void) {
    signal(SIGUSR1, on_usr1);
    for (int i = 0; i < %d; i++) raise(SIGUSR1);
    printf("%%ld\n", handled);
    return handled != %d;
}
""" % (SIGNALS, SIGNALS)


def _timed_command(command: list[str], repeats: int, env=None) -> float:
    # As installed programs run: Python may keep its compiled modules (some CI images forbid it).
    env = {k: v for k, v in (env or os.environ).items() if k != "PYTHONDONTWRITEBYTECODE"}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def linux_rows(tmp: str, repeats: int) -> None:
    """Static glibc programs: minivmm's CLI vs qemu-user vs the machine itself."""
    import shutil
    if not (shutil.which("gcc") and shutil.which("qemu-x86_64")):
        emit(("Linux programs", "needs gcc and qemu-user", "skipped", "", ""))
        return
    programs = {}
    for name, source in (("loop", LINUX_LOOP), ("syscalls", LINUX_SYSCALLS), ("hello", LINUX_HELLO)):
        Path(tmp, f"{name}.c").write_text(source)
        programs[name] = os.path.join(tmp, name)
        subprocess.run(["gcc", "-static", "-O1", "-o", programs[name], f"{programs[name]}.c"], check=True)
    ours = lambda name: [sys.executable, "-m", "minivmm", "run", programs[name], "--host", "nehalem"]  # noqa: E731
    qemu = lambda name: ["qemu-x86_64", "-cpu", "Nehalem", programs[name]]  # noqa: E731
    native, theirs, mine = (_timed_command(c, min(repeats, 3)) for c in
                            ([programs["loop"]], qemu("loop"), ours("loop")))
    emit(("Linux: static C loop, 100 M iterations (whole command)", f"qemu-x86_64 {theirs * 1e3:.0f} ms; "
          f"native {native * 1e3:.0f} ms", f"{mine * 1e3:.0f} ms", f"{mine / theirs:.2f}x qemu-user", "<= 3x qemu-user"))
    base_q, base_m = _timed_command(qemu("hello"), repeats), _timed_command(ours("hello"), repeats)
    calls_q, calls_m = _timed_command(qemu("syscalls"), repeats), _timed_command(ours("syscalls"), repeats)
    per = lambda total, base: (total - base) / 200000 * 1e6  # noqa: E731
    emit(("Linux: a system call (getpid, 200k, over a hello's run)", f"qemu-x86_64 {per(calls_q, base_q):.2f} us",
          f"{per(calls_m, base_m):.2f} us", f"{per(calls_m, base_m) / max(per(calls_q, base_q), 1e-9):.0f}x qemu-user",
          "(measured)"))
    emit(("Linux: start-up of a static glibc hello (whole command)", f"qemu-x86_64 {base_q * 1e3:.0f} ms",
          f"{base_m * 1e3:.0f} ms", "", "<= 500 ms"))


def _text_file(path: str, size: int) -> str:
    """A reproducible text of about ``size`` bytes: lines of words in a seeded order."""
    import random
    rng = random.Random(7)
    words = [f"{w}{i}" for i, w in enumerate(("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu "
                                               "nu xi omicron pi rho sigma tau upsilon phi chi psi omega").split())]
    with open(path, "w") as f:
        written = 0
        while written < size:
            line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + f" {rng.randrange(10 ** 6)}\n"
            written += f.write(line)
    return path


QEMU_MODELS = {"penryn": "Penryn", "sandybridge": "SandyBridge", "haswell": "Haswell", "skylake-server": "Skylake-Server"}


def _program_row(label: str, host: str, argv: list[str], target: str, repeats: int, slow: bool = True) -> None:
    """One real program of this machine (--mount /) under qemu-user with the matching
    -cpu and under minivmm, and once with minivmm's fast paths off (MINIVMM_FAST_PATHS=0)."""
    ours = [sys.executable, "-m", "minivmm", "run", argv[0], "--mount", "/", "--host", host, "--", *argv[1:]]
    theirs = _timed_command(["qemu-x86_64", "-cpu", QEMU_MODELS[host], *argv], repeats)
    mine = _timed_command(ours, repeats)
    before = f"; fast paths off {_timed_command(ours, 1, {**os.environ, 'MINIVMM_FAST_PATHS': '0'}):.2f} s" \
        if slow else ""
    emit((f"{label} on {host}", f"qemu-x86_64 -cpu {QEMU_MODELS[host]} {theirs:.2f} s", f"{mine:.2f} s{before}",
          f"{mine / theirs:.1f}x qemu-user", target))


def program_rows(tmp: str, repeats: int) -> None:
    """Real programs against qemu-user (the fast-path-off runs once: they take minutes)."""
    import shutil
    if not shutil.which("qemu-x86_64"):
        emit(("real programs", "needs qemu-user", "skipped", "", ""))
        return
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else os.path.realpath(shutil.which("python3"))
    for host in ("penryn", "haswell", "skylake-server"):
        _program_row("python3 -c pass", host, [python, "-c", "pass"], "<= 3x qemu-user", repeats)
    text = _text_file(os.path.join(tmp, "words.txt"), 5 << 20)
    _program_row("sort -S 64M of a 5 MB file", "haswell", [shutil.which("sort"), "-S", "64M", text],
                 "<= 5x qemu-user", min(repeats, 3), slow=False)
    _program_row("grep -E -c over the same file", "haswell",
                 [shutil.which("grep"), "-E", "-c", "(gamma|omega)[0-9]+ [0-9]{3}$", text], "<= 5x qemu-user",
                 min(repeats, 3), slow=False)
    openssl_rows(tmp, 1)


def openssl_rows(tmp: str, repeats: int) -> None:
    """openssl's SHA-256 of 2 MB (its time grows with the size: 20 MB takes ten times as long)."""
    import shutil
    if not shutil.which("openssl"):
        emit(("openssl dgst", "needs openssl", "skipped", "", ""))
        return
    blob = os.path.join(tmp, "blob")
    Path(blob).write_bytes(bytes(range(256)) * (2 << 12))
    for host in ("sandybridge", "haswell"):
        _program_row("openssl dgst -sha256 of 2 MB", host, [shutil.which("openssl"), "dgst", "-sha256", blob],
                     "<= 5x qemu-user", repeats, slow=False)


THREADS_PINGPONG = r"""
#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
static volatile int turn;
static int rounds;
static void wait_for(int value) {
    while (turn != value) syscall(SYS_futex, &turn, FUTEX_WAIT_PRIVATE, !value, 0, 0, 0);
}
static void *other(void *arg) {
    for (int i = 0; i < rounds; i++) { wait_for(1); turn = 0; syscall(SYS_futex, &turn, FUTEX_WAKE_PRIVATE, 1, 0, 0, 0); }
    return arg;
}
static void *yielder(void *arg) { for (int i = 0; i < rounds; i++) sched_yield(); return arg; }
int main(int argc, char **argv) {
    rounds = atoi(argv[2]);
    pthread_t t;
    if (argv[1][0] == 'y') {   /* two threads yielding to each other: a switch per call */
        pthread_create(&t, 0, yielder, 0);
        yielder(0);
    } else {                   /* a futex wake and a wait back, each way */
        pthread_create(&t, 0, other, 0);
        for (int i = 0; i < rounds; i++) { turn = 1; syscall(SYS_futex, &turn, FUTEX_WAKE_PRIVATE, 1, 0, 0, 0); wait_for(0); }
    }
    pthread_join(t, 0);
    return 0;
}
"""

THREADS_COMPUTE = r"""
#include <cpuid.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#define WORDS 4096
static int rounds;
struct job { int id; uint64_t sum; uint64_t data[WORDS]; };
static void *work(void *arg) {   /* threads_checksum's work, for a number of rounds */
    struct job *job = arg;
    unsigned a, b, c, d;
    __get_cpuid(1, &a, &b, &c, &d);
    int step = (c >> 19) & 1 ? 4 : 2;
    uint64_t x = 0x9E3779B97F4A7C15ull * (job->id + 1), sum = 0;
    for (int round = 0; round < rounds; round++) {
        for (int i = 0; i < WORDS; i++) job->data[i] = x = x * 6364136223846793005ull + 1442695040888963407ull;
        uint64_t lanes[4] = {0, 0, 0, 0};
        for (int i = 0; i < WORDS; i += step)
            for (int k = 0; k < step; k++) lanes[k] += job->data[i + k];
        sum = sum * 31 + lanes[0] + lanes[1] + lanes[2] + lanes[3];
        struct timespec pause = {0, 1000};
        nanosleep(&pause, NULL);
    }
    job->sum = sum;
    return NULL;
}
int main(int argc, char **argv) {
    rounds = atoi(argv[1]);
    static struct job jobs[4];
    pthread_t threads[4];
    for (int i = 0; i < 4; i++) { jobs[i].id = i; pthread_create(&threads[i], NULL, work, &jobs[i]); }
    for (int i = 0; i < 4; i++) pthread_join(threads[i], NULL);
    for (int i = 0; i < 4; i++) printf("%016llx\n", (unsigned long long)jobs[i].sum);
    return 0;
}
"""

FORK_EXEC = r"""
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv) {
    for (int i = 0, n = atoi(argv[1]); i < n; i++) {
        pid_t child = fork();
        if (child == 0) { execl(argv[2], argv[2], (char *)0); _exit(127); }
        waitpid(child, 0, 0);
    }
    return 0;
}
"""


def thread_rows(tmp: str, repeats: int) -> None:
    """Threads and processes on penryn against qemu-user -cpu Penryn (whole commands; the
    per-event rows over a run of the same program with 1 event)."""
    import shutil
    if not (shutil.which("gcc") and shutil.which("qemu-x86_64")):
        emit(("threads and processes", "needs gcc and qemu-user", "skipped", "", ""))
        return
    programs = {}
    for name, source, flags in (("pingpong", THREADS_PINGPONG, ["-pthread"]), ("forkexec", FORK_EXEC, []),
                                ("hello", LINUX_HELLO, []), ("compute", THREADS_COMPUTE, ["-pthread"])):
        Path(tmp, f"t_{name}.c").write_text(source)
        programs[name] = os.path.join(tmp, f"t_{name}")
        subprocess.run(["gcc", "-static", "-O1", *flags, "-o", programs[name], f"{programs[name]}.c"], check=True)
    checksum = str(Path(__file__).parent.parent / "minivmm" / "guests" / "shipped" / "linux" / "threads_checksum.c")
    programs["checksum"] = os.path.join(tmp, "t_checksum")
    subprocess.run(["gcc", "-static", "-O1", "-pthread", "-o", programs["checksum"], checksum], check=True)
    ours = lambda *argv: [sys.executable, "-m", "minivmm", "run", argv[0], "--host", "penryn", "--", *argv[1:]]  # noqa: E731
    qemu = lambda *argv: ["qemu-x86_64", "-cpu", "Penryn", *argv]  # noqa: E731
    count = 5000
    for label, mode in (("a thread switch (sched_yield between two threads)", "y"),
                        ("a futex wake-up round trip between two threads", "f")):
        few_q, many_q, few_m, many_m = (_timed_command(c, min(repeats, 3)) for c in (
            qemu(programs["pingpong"], mode, "1"), qemu(programs["pingpong"], mode, str(count)),
            ours(programs["pingpong"], mode, "1"), ours(programs["pingpong"], mode, str(count))))
        per_q, per_m = (many_q - few_q) / count * 1e6, (many_m - few_m) / count * 1e6
        emit((f"Linux: {label}", f"qemu-x86_64 {per_q:.1f} us", f"{per_m:.1f} us",
              f"{per_m / max(per_q, 1e-9):.1f}x qemu-user", "(measured)"))
    forks = 20
    few_q, many_q, few_m, many_m = (_timed_command(c, min(repeats, 3)) for c in (
        qemu(programs["forkexec"], "1", programs["hello"]), qemu(programs["forkexec"], str(forks), programs["hello"]),
        ours(programs["forkexec"], "1", programs["hello"]), ours(programs["forkexec"], str(forks), programs["hello"])))
    per_q, per_m = (many_q - few_q) / (forks - 1) * 1e3, (many_m - few_m) / (forks - 1) * 1e3
    emit(("Linux: fork + exec + wait of a static hello", f"qemu-x86_64 {per_q:.1f} ms", f"{per_m:.1f} ms",
          f"{per_m / max(per_q, 1e-9):.1f}x qemu-user", "(measured)"))
    theirs, mine = (_timed_command(c, min(repeats, 3)) for c in (qemu(programs["checksum"]), ours(programs["checksum"])))
    emit(("Linux: 4-thread compute program on penryn (threads_checksum, whole command)",
          f"qemu-x86_64 -cpu Penryn {theirs * 1e3:.0f} ms", f"{mine * 1e3:.0f} ms", f"{mine / theirs:.2f}x qemu-user",
          "<= 3x qemu-user"))
    few_q, many_q, few_m, many_m = (_timed_command(c, min(repeats, 3)) for c in (
        qemu(programs["compute"], "1"), qemu(programs["compute"], "400"),
        ours(programs["compute"], "1"), ours(programs["compute"], "400")))
    emit(("Linux: the same work's own time, 4 threads x 400 rounds (minus 1 round; start-up left out)",
          f"qemu-x86_64 -cpu Penryn {(many_q - few_q) * 1e3:.0f} ms", f"{(many_m - few_m) * 1e3:.0f} ms",
          f"{(many_m - few_m) / max(many_q - few_q, 1e-9):.1f}x qemu-user", "<= 3x qemu-user (2 cores: qemu's threads "
          "run at once)"))


def cost_rows(tmp: str, repeats: int) -> None:
    """Work that must cost the same the 100,000th time as the first: address-space
    look-ups and inserts, a signal's delivery and rt_sigreturn (whole commands)."""
    import shutil
    if not (shutil.which("gcc") and shutil.which("qemu-x86_64")):
        emit(("Linux costs", "needs gcc and qemu-user", "skipped", "", ""))
        return
    for name, source, memory in ((f"{MAPS:,} 4 KiB mmaps", LINUX_MAPS, "1G"),
                                 (f"{SIGNALS:,} self-signals (raise(SIGUSR1))", LINUX_SIGNALS, None)):
        program = os.path.join(tmp, "cost")
        Path(f"{program}.c").write_text(source)
        subprocess.run(["gcc", "-static", "-O1", "-o", program, f"{program}.c"], check=True)
        ours = [sys.executable, "-m", "minivmm", "run", program, "--host", "nehalem", *(["--memory", memory] if memory
                                                                                        else [])]
        theirs, mine = (_timed_command(c, min(repeats, 3)) for c in (["qemu-x86_64", "-cpu", "Nehalem", program], ours))
        emit((f"Linux: {name} (whole command)", f"qemu-x86_64 {theirs * 1e3:.0f} ms", f"{mine * 1e3:.0f} ms",
              f"{mine / theirs:.1f}x qemu-user", "(measured)"))


def native_rows(tmp: str, repeats: int) -> None:
    """AVX2 on a Haswell profile, run by the machine's CPU: minivmm against the program itself."""
    import shutil
    from minivmm.cpu.native import machine_features
    if not shutil.which("gcc") or not {"avx2", "fma", "f16c"} <= machine_features():
        emit(("AVX2 kernel on haswell", "needs gcc and an AVX2 machine", "skipped", "", ""))
        return
    kernel = os.path.join(tmp, "avx2_kernel")
    subprocess.run(["gcc", "-static", "-O2", "-mavx2", "-mfma", "-mf16c", "-o", kernel,
                    str(REPO / "guests" / "linux" / "avx2_kernel.c")], check=True)
    native = _timed_command([kernel, "20000"], min(repeats, 3))
    ours = _timed_command([sys.executable, "-m", "minivmm", "run", kernel, "--host", "haswell", "--", "20000"],
                          min(repeats, 3))
    qemu = _timed_command(["qemu-x86_64", "-cpu", "Haswell", kernel, "20000"], min(repeats, 3)) \
        if shutil.which("qemu-x86_64") else None
    emit(("AVX2 kernel on haswell (120k iterations of gathers, permutes, FMA; whole command)",
          f"native {native * 1e3:.0f} ms" + (f"; qemu-x86_64 -cpu Haswell {qemu * 1e3:.0f} ms" if qemu else ""),
          f"{ours * 1e3:.0f} ms", f"{ours / qemu:.0f}x qemu-user" if qemu else f"{ours / native:.0f}x native",
          "(measured)"))
    paths = {}
    for name, body in (("avx2", AVX2_BODY), ("sse2", SSE2_BODY), ("isolated", ISOLATED_AVX2), ("plain", ISOLATED_SSE2)):
        paths[name] = os.path.join(tmp, f"{name}.asm")
        Path(paths[name]).write_text(VECTOR_LOOP.format(body=body))
    sse, avx = interleaved(repeats, lambda: minivmm_run(paths["sse2"], "haswell"),
                           lambda: minivmm_run(paths["avx2"], "haswell"))
    emit((f"AVX2 hot loop, 8 instructions a body, {VECTOR_ITERATIONS // 1000}k times (extra per AVX2 instruction)",
          f"the same loop in SSE2: {sse * 1e3:.0f} ms", f"{avx * 1e3:.0f} ms",
          f"+{(avx - sse) / (8 * VECTOR_ITERATIONS) * 1e6:.2f} us", "<= 1 us"))
    plain, isolated = interleaved(repeats, lambda: minivmm_run(paths["plain"], "haswell"),
                                  lambda: minivmm_run(paths["isolated"], "haswell"))
    emit(("one isolated trapped instruction (vpaddd between stack operations)",
          f"paddd there: {plain * 1e3:.0f} ms", f"{isolated * 1e3:.0f} ms",
          f"+{(isolated - plain) / VECTOR_ITERATIONS * 1e6:.2f} us", "<= 5 us"))
    avx512_row(tmp, repeats)


def avx512_row(tmp: str, repeats: int) -> None:
    """The AVX-512 kernel on skylake-server: minivmm against the program itself
    (qemu-user runs no AVX-512)."""
    from minivmm.cpu.native import machine_features
    label = "AVX-512 kernel on skylake-server (120k iterations of masked gathers, opmask arithmetic; whole command)"
    if not {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= machine_features():
        emit((label, "needs an AVX-512 machine", "skipped", "", ""))
        return
    kernel = os.path.join(tmp, "avx512_kernel")
    subprocess.run(["gcc", "-static", "-O2", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-o", kernel,
                    str(REPO / "guests" / "linux" / "avx512_kernel.c")], check=True)
    native = _timed_command([kernel, "20000"], min(repeats, 3))
    ours = _timed_command([sys.executable, "-m", "minivmm", "run", kernel, "--host", "skylake-server", "--", "20000"],
                          min(repeats, 3))
    emit((label, f"native {native * 1e3:.0f} ms (qemu-user runs no AVX-512)", f"{ours * 1e3:.0f} ms",
          f"{ours / native:.0f}x native", "(measured)"))


CPUID_PROGRAM = r"""
#include <cpuid.h>
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    unsigned a, b, c, d, sum = 0;
    for (long i = 0, n = atol(argv[1]); i < n; i++) { __cpuid(1, a, b, c, d); sum += c; }
    printf("%u\n", sum);
    return 0;
}
"""


BIG_PROCESS = r"""
#include <stdlib.h>
#include <unistd.h>
int main(void) {
    size_t size = 64 << 20;
    char *memory = malloc(size);
    for (size_t i = 0; i < size; i += 4096)
        memory[i] = (char)(i >> 12) | 1;
    write(1, "touched\n", 8);
    return memory[4096] != 1;
}
"""


def supervised_rows(tmp: str, repeats: int) -> None:
    """--accel native: a CPU-bound program under the ptrace supervisor against the program
    alone, and one CPUID's round trip through the supervisor (in-process runs: Python's
    start-up is not in them)."""
    import shutil
    from minivmm.vmm.supervised import unusable_reason
    reason = unusable_reason()
    if reason or not shutil.which("gcc"):
        emit(("--accel native", "skipped", reason.split(" (")[0] if reason else "needs gcc", "", ""))
        return
    programs = {}
    for name, source in (("loop", LINUX_LOOP.replace("100000000", "1000000000")), ("cpuid", CPUID_PROGRAM)):
        Path(tmp, f"{name}.c").write_text(source)
        programs[name] = os.path.join(tmp, name)
        subprocess.run(["gcc", "-static", "-O1", "-o", programs[name], f"{programs[name]}.c"], check=True)

    def supervised(name: str, *argv: str) -> float:
        vm = VM(programs[name], argv=argv, accel="native")
        start = time.perf_counter()
        result = vm.run()
        elapsed = time.perf_counter() - start
        assert result.exit_code == 0, result.stop
        return elapsed

    alone = lambda *command: _timed(lambda: subprocess.run(command, check=True, capture_output=True))  # noqa: E731
    bare, ours = interleaved(repeats, lambda: alone(programs["loop"]), lambda: supervised("loop"))
    emit(("--accel native: static C loop, 1 G iterations (fork to exit)", f"the program alone {bare * 1e3:.0f} ms",
          f"{ours * 1e3:.0f} ms", f"{ours / bare:.2f}x", "(measured)"))
    count = 100_000
    none, many, plain_none, plain_many = interleaved(
        repeats, lambda: supervised("cpuid", "0"), lambda: supervised("cpuid", str(count)),
        lambda: alone(programs["cpuid"], "0"), lambda: alone(programs["cpuid"], str(count)))
    per, machine = (many - none) / count * 1e6, (plain_many - plain_none) / count * 1e6
    emit(("--accel native: one CPUID through the supervisor (100k CPUIDs, over a run without)",
          f"the machine's CPUID {machine:.2f} us", f"{per:.1f} us", f"{per / max(machine, 1e-9):.0f}x", "(measured)"))
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else shutil.which("python3")
    bare, ours = interleaved(repeats, lambda: alone(python, "-c", "pass"), lambda: _timed(
        lambda: VM(python, argv=["-c", "pass"], accel="native").run()))
    emit(("--accel native: python3 -c pass", f"python3 alone {bare * 1e3:.0f} ms", f"{ours * 1e3:.0f} ms",
          f"{ours / bare:.2f}x", "(measured)"))
    Path(tmp, "big.c").write_text(BIG_PROCESS)
    big = os.path.join(tmp, "big")
    subprocess.run(["gcc", "-static", "-O1", "-o", big, f"{big}.c"], check=True)
    point = VM(big, accel="native", memory="256M").run(migrations=["native@syscall:1000000"])
    point = point.syscalls["sample"].index("write") + 1
    moves = []
    for _ in range(repeats):
        moved = VM(big, accel="native", memory="256M").run(migrations=[f"native@syscall:{point}"])
        assert moved.exit_code == 0 and moved.migrations[0]["ok"], moved.stop
        moves.append(moved.migrations[0])
    move = sorted(moves, key=lambda m: m["downtime_ms"])[len(moves) // 2]
    emit(("--accel native: capture of a 64 MiB process into the emulator (its snapshot, ready to run)",
          f"{move['pages_sent']} pages", f"{move['downtime_ms']:.0f} ms", "", "(measured)"))


def kvm_rows(repeats: int) -> None:
    """The compute loop on the machine's own CPU (--accel kvm) against the emulator, start-up included."""
    from minivmm.accel.kvm import unusable_reason
    reason = unusable_reason()
    if reason:
        emit(("guest compute loop under --accel kvm", "skipped", reason.split(":")[0], "", "KVM within 1.5x of native"))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "loop.asm")
        Path(path).write_text(COMPUTE_LOOP)
        run = lambda accel: _timed_command([sys.executable, "-m", "minivmm", "run", path, "--host", "native",  # noqa: E731
                                            "--accel", accel], repeats)
        tcg, kvm = run("tcg"), run("kvm")
        emit(("guest compute loop (500 M insns) under --accel kvm (whole command)", f"--accel tcg {tcg * 1e3:.0f} ms",
              f"{kvm * 1e3:.0f} ms", f"{tcg / kvm:.1f}x faster", "KVM within 1.5x of native"))


def exit_rows(tmp: str, repeats: int) -> None:
    """The engine bare and with minivmm's exits: the compute loop, CPUID, #UD, the gate,
    the audit, the CPUID storm, the CLI's start-up."""
    loop_path = os.path.join(tmp, "loop.asm")
    cpuid_path = os.path.join(tmp, "cpuid.asm")
    Path(loop_path).write_text(COMPUTE_LOOP)
    Path(cpuid_path).write_text(CPUID_LOOP)

    # The block counter first: once a VM has run in this process, the engine's hooked
    # loop runs about 1.5x slower with any hook of machine code (the counter of the
    # last release and this one alike), which says nothing about the counter.
    uncounted, counted = interleaved(repeats, lambda: bare_unicorn(COMPUTE_LOOP),
                                     lambda: bare_unicorn(COMPUTE_LOOP, block_counter=True))
    bare, ours = interleaved(repeats, lambda: bare_unicorn(COMPUTE_LOOP), lambda: minivmm_run(loop_path))
    insns = 5 * LOOP_ITERATIONS
    emit(("guest compute loop (500 M insns)", f"{bare * 1e3:.0f} ms ({insns / bare / 1e6:.0f} M/s)",
             f"{ours * 1e3:.0f} ms ({insns / ours / 1e6:.0f} M/s)", f"{ours / bare:.3f}x", "<= 1.05x"))
    emit(("the same loop with a Linux program's clock counting its blocks (bare engine)", f"{uncounted * 1e3:.0f} ms",
          f"{counted * 1e3:.0f} ms", f"{counted / uncounted:.3f}x", "<= 1.1x"))

    engine, empty, exits = interleaved(
        repeats, lambda: bare_unicorn(CPUID_LOOP), lambda: bare_unicorn(CPUID_LOOP, lambda uc, ud: 0),
        lambda: minivmm_run(cpuid_path))
    per = lambda t: (t - engine) / CPUIDS * 1e6  # noqa: E731
    emit(("CPUID exit, 100k CPUIDs (us per CPUID over the engine's own)",
                 f"engine {engine / CPUIDS * 1e6:.2f} us; empty binding hook +{per(empty):.2f} us",
                 f"+{per(exits):.2f} us", f"{exits / engine:.0f}x engine", "<= 3.5 us"))

    paths = {}
    for name, source in (("ud", UD_LOOP.format(count=UDS, body="ud2")),
                         ("nop", UD_LOOP.format(count=UDS, body="nop\n    nop")),
                         ("gated", GATED_LOOP), ("audited", AUDITED_LOOP)):
        paths[name] = os.path.join(tmp, f"{name}.asm")
        Path(paths[name]).write_text(source)
    faults, plain = interleaved(repeats, lambda: minivmm_run(paths["ud"]), lambda: minivmm_run(paths["nop"]))
    emit(("#UD round trip: ud2 -> guest IDT handler -> iretq, 20k times",
                 f"same loop without the fault: {plain / UDS * 1e6:.2f} us per iteration",
                 f"{(faults - plain) / UDS * 1e6:.1f} us per #UD", "", "(measured)"))
    bare, gated = interleaved(repeats, lambda: bare_unicorn(GATED_LOOP), lambda: minivmm_run(paths["gated"], "penryn"))
    emit(("gate: hot loop on a page with trapped POPCNT/AESENC (penryn)", f"{bare * 1e3:.0f} ms",
                 f"{gated * 1e3:.0f} ms", f"{gated / bare:.3f}x", "~1.0x"))
    off, on = interleaved(repeats, lambda: minivmm_run(paths["gated"], "penryn"),
                          lambda: minivmm_run(paths["gated"], "penryn", audit=True))
    emit(("audit: the same hot loop, no violation in it", f"{off * 1e3:.0f} ms (no audit)",
                 f"{on * 1e3:.0f} ms", f"{on / off:.3f}x", "<= 1.5x"))
    off, on = interleaved(repeats, lambda: minivmm_run(paths["audited"], "nehalem", "intel-penryn"),
                          lambda: minivmm_run(paths["audited"], "nehalem", "intel-penryn", audit=True))
    emit(("audit: a loop whose POPCNT is hidden by EVC (counted 1000x, then it runs)",
                 f"{off * 1e3:.0f} ms (no audit)", f"{on * 1e3:.0f} ms", f"{on / off:.2f}x", "<= 3x"))
    off, on = interleaved(repeats, lambda: minivmm_run("dispatch_ud", "penryn", "intel-merom"),
                          lambda: minivmm_run("dispatch_ud", "penryn", "intel-merom", audit=True))
    emit(("audit: dispatch_ud under intel-merom (PMULLD hidden, 5 M executions)",
                 f"{off * 1e3:.0f} ms (no audit)", f"{on * 1e3:.0f} ms", f"{on / off:.2f}x", "<= 3x"))
    storm_row(tmp)

    startup, bare_python = cli_startup(repeats), python_startup(repeats)
    emit(("CLI start-up: minivmm run guests/hello.asm", f"python -c pass: {bare_python * 1e3:.0f} ms",
                 f"{startup * 1e3:.0f} ms", f"{startup / bare_python:.1f}x python", "<= 500 ms"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions instead of 7")
    parser.add_argument("--linux", action="store_true", help="only the rows of Linux programs (and native AVX2)")
    parser.add_argument("--native", action="store_true", help="only the rows of instructions run by the machine's CPU")
    parser.add_argument("--costs", action="store_true", help="only the rows of Linux work repeated 100,000 times")
    parser.add_argument("--supervised", action="store_true", help="only the rows of --accel native")
    parser.add_argument("--threads", action="store_true", help="only the rows of threads and processes")
    parser.add_argument("--dask", action="store_true", help="only the rows of matrix runs on Dask")
    parser.add_argument("--programs", action="store_true", help="only the rows of real programs against qemu-user")
    parser.add_argument("--exits", action="store_true", help="only the rows of the engine bare and with exits")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7

    if args.linux or args.native:
        with tempfile.TemporaryDirectory() as tmp:
            if args.linux:
                linux_rows(tmp, repeats)
                thread_rows(tmp, repeats)
            native_rows(tmp, repeats)
        return
    if args.dask:
        dask_rows(repeats)
        return
    only = {"supervised": supervised_rows, "costs": cost_rows, "threads": thread_rows, "programs": program_rows,
            "exits": exit_rows}
    chosen = [rows for flag, rows in only.items() if getattr(args, flag)]
    if chosen:
        with tempfile.TemporaryDirectory() as tmp:
            chosen[0](tmp, repeats)
        return
    with tempfile.TemporaryDirectory() as tmp:
        exit_rows(tmp, repeats)
        matrix_rows(repeats)
        dask_rows(repeats)
        migration_rows(tmp, repeats)
        linux_rows(tmp, repeats)
        program_rows(tmp, repeats)
        thread_rows(tmp, repeats)
        cost_rows(tmp, repeats)
        native_rows(tmp, repeats)
        supervised_rows(tmp, repeats)
    kvm_rows(repeats)



if __name__ == "__main__":
    main()
