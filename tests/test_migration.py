"""Live migration: transparent for guests that follow CPUID, fatal for those that probe,
refused when the destination lacks what the VM sees; snapshots that can be trusted."""

import json
import os

import pytest
from helpers import minivmm_cli
from test_linux import build, needs_gcc
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import minivmm.vmm.snapshot as snapshot_mod
from minivmm.cpu.native import machine_features
from minivmm.errors import MinivmmError
from minivmm.masking.evc import highest_common_mode
from minivmm.testing import strategies as mst
from minivmm.vmm.migration import PreCopy
from minivmm.vmm.snapshot import Snapshot
from minivmm.vmm.vm import VM

# CPUID-guided, and using GPRs, memory, x87 and SSE state across any migration point.
STATEFUL = """
    mov eax, 1
    cpuid
    bt ecx, 19                       ; sse4_1?
    setc r15b
    finit
    fld1
    mov edx, 3
    movd xmm3, edx
    pxor xmm2, xmm2
    lea rdi, [rip + buf]
    mov ecx, 60000
l:  fmul qword ptr [rip + factor]
    paddd xmm2, xmm3
    mov eax, ecx
    and eax, 1023
    add dword ptr [rdi + rax * 4], ecx
    test r15b, r15b
    jz plain
    pmulld xmm2, xmm3                ; sse4_1 path, taken only if CPUID said so
plain:
    dec ecx
    jnz l
    fstp qword ptr [rip + result]
    mov rax, [rip + result]
    movd ebx, xmm2
    xor rax, rbx
    mov ecx, 16
p:  rol rax, 4
    mov bl, al
    and bl, 15
    add bl, 0x41
    push rax
    mov al, bl
    out 0xe9, al
    pop rax
    loop p
    xor eax, eax
    out 0xf4, al
.align 8
factor: .double 1.0000001
result: .quad 0
buf: .fill 4096, 1, 0
"""
SLOW_PRECOPY = PreCopy(guest_insns_per_s=2e7)  # rounds short enough to switch mid-run


@pytest.fixture(scope="module")
def stateful(tmp_path_factory):
    path = tmp_path_factory.mktemp("g") / "stateful.asm"
    path.write_text(STATEFUL)
    return str(path)


def outcome(result):
    return result.console, result.stop.reason, result.stop.status, result.memory_sha256


@settings(max_examples=25)
@given(cluster=mst.clusters(min_hosts=2), data=st.data())
def test_migration_is_transparent_for_cpuid_guided_guests(stateful, cluster, data):
    mode = highest_common_mode(cluster)
    assume(mode is not None)  # e.g. a K8 and a Zen share no EVC mode
    source, destination = data.draw(st.permutations(cluster))[:2]
    k = data.draw(st.integers(1, 450_000), label="k")
    params = data.draw(st.sampled_from([SLOW_PRECOPY, PreCopy(enabled=False)]))
    alone = VM(stateful, source, memory="2M", evc=mode.key).run(timeout=30)
    moved = VM(stateful, source, memory="2M", evc=mode.key).run(
        timeout=30, migrations=[f"{destination.name}@insn:{k}"], precopy=params)
    assert moved.migrations[0]["ok"], moved.migrations
    assert moved.hosts == [source.name, destination.name]
    assert outcome(moved) == outcome(alone)


@pytest.mark.parametrize("group", ["x87", "sse", "general"])
def test_negative_control_dropping_state_breaks_transparency(stateful, monkeypatch, group):
    alone = VM(stateful, "penryn", memory="2M").run(timeout=30)
    dropped = {"x87": snapshot_mod.X87, "sse": snapshot_mod.SSE + snapshot_mod.YMM, "general": ("RBX", "RCX", "RDI")}[group]
    monkeypatch.setattr(snapshot_mod, "ENGINE_REGISTERS",
                        tuple(r for r in snapshot_mod.ENGINE_REGISTERS if r not in dropped))
    moved = VM(stateful, "penryn", memory="2M").run(timeout=3, migrations=["penryn@insn:100000"],
                                                    precopy=PreCopy(enabled=False))
    assert moved.migrations[0]["ok"]
    assert outcome(moved) != outcome(alone)


def test_insn_points_are_exact(stateful):
    result = VM(stateful, "penryn", memory="2M").run(migrations=["nehalem@insn:12345"],
                                                     precopy=PreCopy(enabled=False), timeout=30)
    assert result.instructions is not None
    assert result.migrations[0]["ok"] and result.migrations[0]["when"] == "insn:12345"


# ---- the seed story ---------------------------------------------------------------------

def test_cpuid_guided_guest_survives_migration_to_core2():
    result = VM("dispatch_cpuid", "penryn", evc="intel-merom").run(migrations=["core2@checkpoint:1"], timeout=60)
    alone = VM("dispatch_cpuid", "penryn", evc="intel-merom").run(timeout=60)
    assert result.migrations[0]["ok"] and result.hosts == ["penryn", "core2"]
    assert result.stop.reason == "exited" and result.console == alone.console
    assert "path: sse2" in result.console


def test_probing_guest_crashes_on_core2_naming_sse4_1():
    result = VM("dispatch_ud", "penryn", evc="intel-merom").run(migrations=["core2@checkpoint:1"], timeout=60)
    assert result.migrations[0]["ok"]
    assert result.stop.reason == "crashed" and result.stop.vector == 6 and result.host == "core2"
    assert result.stop.missing_features == ["sse4_1"]


POPCNT_AFTER_CHECKPOINT = """
    mov eax, 1
    cpuid
    bt ecx, 23                       ; popcnt, asked properly
    jnc none
    out 0xf5, al                     ; checkpoint: the VM may move here
    mov ebx, 0xff
    popcnt eax, ebx
    out 0xf4, al
none:
    mov al, 0xee
    out 0xf4, al
"""


def test_without_evc_the_move_is_refused_and_the_guest_finishes_on_the_source(asm_guest):
    guest = asm_guest(POPCNT_AFTER_CHECKPOINT)
    result = VM(guest, "nehalem").run(migrations=["penryn@checkpoint:1"], timeout=10)
    migration = result.migrations[0]
    assert not migration["ok"] and migration["missing"] == ["popcnt", "rdtscp", "sse4_2"]
    assert result.stop.status == 8 and result.host == "nehalem"


def test_forcing_the_move_crashes_on_penryn(asm_guest):
    guest = asm_guest(POPCNT_AFTER_CHECKPOINT)
    result = VM(guest, "nehalem").run(migrations=["penryn@checkpoint:1"], force=True, timeout=10,
                                      precopy=PreCopy(enabled=False))
    assert result.migrations[0]["ok"] and result.migrations[0]["forced"]
    assert result.stop.reason == "crashed" and result.stop.missing_features == ["popcnt"]


def test_cold_migration_redetects_and_is_always_safe():
    from minivmm.vmm.migration import MigrationRequest
    cold = VM("dispatch_ud", "penryn").run(migrations=[MigrationRequest.parse("core2@checkpoint:1", cold=True)],
                                          timeout=60)
    assert cold.migrations[0]["ok"] and cold.migrations[0]["mode"] == "cold"
    assert cold.stop.reason == "exited"
    assert cold.console.count("checksum") == 1  # the first boot was cut short at its checkpoint
    assert cold.console.endswith("path: sse2\n")  # re-detected on the Core 2


@pytest.mark.parametrize("policy, cold, ok", [("disabled", False, False), ("disabled", True, False),
                                              ("offline", False, False), ("offline", True, True)])
def test_migration_policy(policy, cold, ok):
    from minivmm.vmm.migration import MigrationRequest
    result = VM("dispatch_cpuid", "penryn", evc="intel-merom", policy=policy).run(
        migrations=[MigrationRequest.parse("core2@checkpoint:1", cold=cold)], timeout=60)
    assert result.migrations[0]["ok"] is ok
    assert result.stop.reason == "exited"


def test_precopy_converges_and_reports_rounds():
    result = VM("dispatch_cpuid", "penryn", evc="intel-merom", memory="64M").run(
        migrations=["core2@checkpoint:1"], timeout=60, precopy=PreCopy(guest_insns_per_s=1e8))
    m = result.migrations[0]
    assert m["ok"] and m["mode"] == "pre-copy" and m["rounds"] >= 1
    assert m["downtime_ms"] < 50
    # Pages never written are zeros on both sides and are not sent (zero-page detection):
    # the first round sends what the guest touched, not its 64 MiB.
    assert 0 < m["pages_per_round"][0] < 64 * 256 // 100


def test_precopy_of_a_guest_that_never_converges_ends_within_its_instruction_bound():
    """Every round dirties every page: without a bound the guest would run all 30 rounds."""
    from minivmm.vmm.migration import precopy
    given = []

    def run_guest(insns):
        given.append(insns)
        return set(range(0, 100_000 * 4096, 4096))
    params = PreCopy(switchover_goal_ms=0.001)
    result = precopy(params, list(range(0, 100_000 * 4096, 4096)), run_guest, lambda pages: None)
    assert sum(given) == params.max_guest_insns and result["mode"] == "stunned"
    assert len(result["remaining"]) == 100_000
    unbounded = PreCopy(switchover_goal_ms=0.001, max_guest_insns=10**15)  # the control: every round runs
    given.clear()
    assert precopy(unbounded, [0], run_guest, lambda pages: None)["rounds"] == unbounded.max_rounds


@needs_gcc
def test_default_precopy_moves_a_sigill_prober_before_it_finishes(tmp_path_factory):
    """probe_avx2 finishes within its first pre-copy round's nominal time: the bound on
    the guest's work keeps the switchover near its point, where the prober dies."""
    if "avx2" not in machine_features():
        pytest.skip("this machine has no AVX2: the Haswell's AVX2 cannot run")
    probe = build(tmp_path_factory, "probe_avx2.c", "probe_avx2")
    alone = VM(probe, "haswell", evc="intel-sandybridge").run(timeout=60)
    point = f"sandybridge@syscall:{alone.syscalls['sample'].index('write') + 1}"
    moved = VM(probe, "haswell", evc="intel-sandybridge").run(migrations=[point], timeout=60)
    m = moved.migrations[0]
    assert m["ok"] and m["mode"] == "pre-copy" and m["rounds"] >= 1
    assert (moved.stop.reason, moved.stop.signal, moved.stop.missing_features) == ("signaled", "SIGILL", ["avx2"])


# ---- snapshot files ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("snap") / "vm.snap"
    VM("dispatch_cpuid", "penryn", evc="intel-merom").run(snapshot_at="checkpoint:1", snapshot_file=str(path),
                                                           timeout=60)
    return path


def test_save_inspect_resume_across_processes(saved):
    inspect = minivmm_cli("snapshot", "inspect", str(saved), "--json")
    summary = json.loads(inspect.stdout)
    assert summary["host"] == "penryn" and summary["evc"] == "intel-merom" and summary["checkpoints"] == 1
    resumed = minivmm_cli("resume", str(saved), "--host", "core2", "--json")
    report = json.loads(resumed.stdout)
    alone = VM("dispatch_cpuid", "penryn", evc="intel-merom").run(timeout=60)
    assert report["console"] == alone.console and report["hosts"] == ["penryn", "core2"]


def test_resume_is_refused_where_the_view_cannot_run(tmp_path):
    path = tmp_path / "n.snap"
    VM("dispatch_cpuid", "nehalem").run(snapshot_at="checkpoint:1", snapshot_file=str(path), timeout=60)
    out = minivmm_cli("resume", str(path), "--host", "penryn")
    assert out.returncode == 2 and "has popcnt, rdtscp, sse4_2, which penryn lacks" in out.stderr


def corrupt(data: bytes, how: str) -> bytes:
    if how == "flipped bit":
        i = len(data) // 2
        return data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]
    if how == "truncated":
        return data[:len(data) - 100]
    if how == "wrong version":
        return data[:8] + (99).to_bytes(2, "little") + data[10:]
    if how == "oversized length":
        header = 12 + 8 + 1
        return data[:header] + (1 << 62).to_bytes(8, "little") + data[header + 8:]
    if how == "missing section":
        return data[:10] + (4).to_bytes(2, "little") + data[12:]
    if how == "not a snapshot":
        return b"GARBAGE!" + data[8:]
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["flipped bit", "truncated", "wrong version", "oversized length",
                                 "missing section", "not a snapshot"])
def test_every_corruption_is_refused_before_anything_runs(saved, tmp_path, how):
    bad = tmp_path / "bad.snap"
    bad.write_bytes(corrupt(saved.read_bytes(), how))
    with pytest.raises(MinivmmError, match="not a usable minivmm snapshot"):
        snapshot_mod.load(str(bad))
    out = minivmm_cli("resume", str(bad), "--host", "core2")
    assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr


@settings(max_examples=200)
@given(data=st.binary(max_size=400), cut=st.integers(0, 2000), flip=st.integers(0, 5000))
def test_parser_fuzz_never_crashes(saved, data, cut, flip):
    original = saved.read_bytes()
    for blob in (data, original[:cut] + data, original[:flip] + bytes([original[flip % len(original)] ^ 0xFF])
                 + original[flip + 1:]):
        try:
            Snapshot.from_bytes(blob)
        except MinivmmError:
            pass


def test_snapshot_is_not_pickle(saved):
    data = saved.read_bytes()
    assert data.startswith(b"MINIVMM\0") and b"pickle" not in data[:64]
    assert os.path.getsize(saved) < 16 << 20  # memory is compressed


# ---- checks from what the guest did -------------------------------------------------------

PROBES_THEN_RUNS = """
    mov ebx, 0xff
    popcnt eax, ebx                  ; found by trying it: the view (intel-penryn) hides popcnt
    mov eax, 1
    cpuid
    out 0xf5, al                     ; checkpoint 1
    popcnt eax, ebx
    out 0xf4, al
"""


def test_check_of_what_ran_finds_the_masked_instruction_the_view_hides(asm_guest, tmp_path):
    """The view says the Penryn can take the VM; what it executed says it cannot."""
    guest = asm_guest(PROBES_THEN_RUNS)
    assert minivmm_cli("check", "nehalem", "penryn", "--evc", "intel-penryn").stdout.startswith("IDENTICAL")
    report = tmp_path / "ran.json"
    done = minivmm_cli("run", guest, "--host", "nehalem", "--evc", "intel-penryn", "--audit", "--json")
    report.write_text(done.stdout)
    checked = minivmm_cli("check", str(report), "penryn", "--json")
    answer = json.loads(checked.stdout)
    assert checked.returncode == 1 and answer["verdict"] == "UNSAFE"
    assert answer["view"] == [] and answer["executed"] == ["popcnt"] and "sse4_1" in answer["read_features"]
    assert minivmm_cli("check", str(report), "nehalem").returncode == 0       # where popcnt is, it is safe
    unaudited = tmp_path / "unaudited.json"
    unaudited.write_text(minivmm_cli("run", guest, "--host", "nehalem", "--evc", "intel-penryn", "--json").stdout)
    blind = minivmm_cli("check", str(unaudited), "penryn")
    assert blind.returncode == 0 and "not audited" in blind.stdout     # without the audit, only the view speaks


def test_a_snapshot_carries_what_the_guest_did_to_its_check_and_its_resume(asm_guest, tmp_path):
    snap = tmp_path / "p.snap"
    VM(asm_guest(PROBES_THEN_RUNS), "nehalem", evc="intel-penryn").run(
        audit=True, snapshot_at="checkpoint:1", snapshot_file=str(snap), timeout=30)
    checked = minivmm_cli("check", str(snap), "core2", "--json")
    answer = json.loads(checked.stdout)
    assert answer["verdict"] == "INCOMPATIBLE" and answer["view"] == ["sse4_1"] and answer["read"] == ["sse4_1"]
    resumed = VM.resume(snapshot_mod.load(str(snap))).run(audit=True, timeout=30)
    assert resumed.observed["executed"] == ["popcnt"] and resumed.observed["audited"]


def test_check_of_a_file_that_is_neither_is_one_line(tmp_path):
    junk = tmp_path / "junk.json"
    junk.write_text('{"view_features": 3}')
    done = minivmm_cli("check", str(junk), "penryn")
    assert done.returncode == 2 and "neither a snapshot nor a run's --json report" in done.stderr
