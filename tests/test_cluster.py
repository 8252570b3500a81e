"""Baselines, migration checks and EVC on real CPUs, by property and by example."""

import itertools
import json

import pytest
from helpers import minivmm_cli
from hypothesis import given
from hypothesis import strategies as st

from minivmm.cpu.features import catalogue
from minivmm.cpu.profiles import load_profile
from minivmm.errors import MinivmmError
from minivmm.masking.compat import baseline, compare, physical, presented, reportable
from minivmm.masking.evc import evc_mode, evc_modes, highest_common_mode
from minivmm.masking.view import GuestCpuidView
from minivmm.testing import strategies as mst
from minivmm.vmm.cluster import Cluster
from minivmm.vmm.vm import VM

# ---- properties over the real profiles ------------------------------------------------

@given(mst.clusters(include_dumps=True))
def test_baseline_is_a_subset_of_every_member(hosts):
    common = baseline(hosts).features
    assert all(common <= physical(h) for h in hosts)


@given(mst.clusters(include_dumps=True), st.randoms())
def test_baseline_is_commutative(hosts, rnd):
    shuffled = list(hosts)
    rnd.shuffle(shuffled)
    assert baseline(shuffled).features == baseline(hosts).features
    assert baseline(shuffled).evc == baseline(hosts).evc


@given(mst.clusters(), mst.clusters(), mst.clusters())
def test_baseline_is_associative(a, b, c):
    merged = baseline(a + b).features & baseline(c).features
    assert merged == baseline(a).features & baseline(b + c).features == baseline(a + b + c).features


@given(mst.clusters())
def test_baseline_is_idempotent(hosts):
    assert baseline(hosts + hosts).features == baseline(hosts).features


@given(mst.clusters(), mst.profiles())
def test_adding_a_host_never_raises_the_baseline(hosts, extra):
    before, after = baseline(hosts), baseline(hosts + [extra])
    assert after.features <= before.features
    if after.evc:
        assert before.evc and before.evc.features >= after.evc.features


@given(mst.clusters(min_hosts=2, include_dumps=True))
def test_levelling_masks_make_every_host_present_the_baseline(hosts):
    result = baseline(hosts)
    for host in hosts:
        assert presented(GuestCpuidView(host.cpuid, result.masks[host.name])) == result.features


@given(mst.clusters(min_hosts=2, include_dumps=True))
def test_under_the_clusters_evc_mode_every_pair_is_identical(hosts):
    mode = highest_common_mode(hosts)
    if mode is None:
        return
    views = {presented(GuestCpuidView.for_host(h, mode.key)) for h in hosts}
    assert views == {mode.features}
    for src, dst in itertools.permutations(hosts, 2):
        assert compare(src, dst, mode.key).verdict == "IDENTICAL"


def test_negative_control_without_evc_pairs_differ():
    assert compare(load_profile("nehalem"), load_profile("penryn")).verdict == "INCOMPATIBLE"
    assert compare(load_profile("penryn"), load_profile("nehalem")).verdict == "SUPERSET"


# ---- real data -----------------------------------------------------------------------

@pytest.mark.parametrize("a, b, mode", [
    ("dump:Xeon-X5460", "dump:Xeon-W3520", "intel-penryn"),
    ("dump:Xeon-E5-2650-v3", "dump:Xeon-Gold-6148", "intel-haswell"),
    ("dump:EPYC-7601-32-Core", "dump:EPYC-7502-32-Core", "amd-zen"),
])
def test_baseline_of_real_cpu_pairs(a, b, mode):
    pa, pb = load_profile(a), load_profile(b)
    result = baseline([pa, pb])
    assert result.features <= physical(pa) and result.features <= physical(pb)
    assert result.features == reportable(pa) & reportable(pb)  # what both have and can show
    # not what a host executes without reporting it (PREFETCHW on the Haswell)
    assert not result.features & (physical(pa) - catalogue().decode(pa.cpuid))
    assert result.evc.key == mode


def test_nehalem_under_penryn_evc_hides_but_still_executes_sse4_2_and_popcnt(run_asm):
    result = run_asm("""
        mov eax, 1
        cpuid
        mov r8d, ecx               ; what CPUID says
        mov rbx, 0xff
        popcnt rax, rbx            ; executes anyway: the mask hides, it does not disable
        mov r9, rax
        crc32 eax, ebx             ; SSE4.2
        shr r8d, 20                ; sse4_2 bit
        and r8d, 1
        mov eax, r8d
        shl eax, 4
        or eax, r9d                ; status = sse4_2_bit << 4 | popcount(0xff)
        out 0xf4, al
    """, "nehalem", evc="intel-penryn")
    assert result.stop.reason == "exited"
    assert result.stop.status == 8  # CPUID said no SSE4.2 (0 << 4), POPCNT ran: 8
    seen = catalogue_decode(result)
    assert not {"sse4_2", "popcnt"} & seen and "sse4_1" in seen


def catalogue_decode(result):
    from minivmm.cpu.features import catalogue
    leaf1 = next(e for e in result.cpuid_exits if e["leaf"] == 1)
    regs = (leaf1["eax"], leaf1["ebx"], leaf1["ecx"], leaf1["edx"])
    return {f.name for f in catalogue() if (f.leaf, f.subleaf) == (1, 0) and f.is_set(regs)}


def test_evc_on_a_host_that_cannot_run_it_is_refused_naming_the_missing_features():
    with pytest.raises(MinivmmError, match="penryn cannot run EVC mode intel-nehalem: it lacks popcnt, rdtscp, sse4_2"):
        VM("hello", "penryn", evc="intel-nehalem")
    with pytest.raises(MinivmmError, match="for INTEL hosts"):
        VM("hello", "epyc", evc="intel-merom")


@pytest.mark.parametrize("host, mode", [
    ("core2", "intel-merom"), ("penryn", "intel-penryn"), ("nehalem", "intel-nehalem"),
    ("westmere", "intel-westmere"), ("sandybridge", "intel-sandybridge"), ("ivybridge", "intel-ivybridge"),
    ("haswell", "intel-haswell"), ("broadwell", "intel-broadwell"),
    # A client Skylake has no AVX-512, CLWB or PKU: its highest mode is Broadwell (as in
    # VMware's compatibility guide for Xeon E3 v5), not the Skylake (server) baseline.
    ("skylake-client", "intel-broadwell"),
    ("skylake-server", "intel-skylake"), ("cascadelake-server", "intel-cascadelake"),
    ("icelake-server", "intel-icelake"), ("opteron-g1", "amd-rev-e"), ("opteron-g2", "amd-rev-f"),
    ("opteron-g3", "amd-greyhound"), ("opteron-g4", "amd-bulldozer"), ("opteron-g5", "amd-piledriver"),
    ("epyc", "amd-zen"), ("epyc-rome", "amd-zen2"),
])
def test_each_builtin_supports_its_generations_mode(host, mode):
    assert highest_common_mode([load_profile(host)]).key == mode


def test_modes_are_ordered_within_a_track():
    modes = evc_modes()
    for key, mode in modes.items():
        if mode.parent:
            assert mode.includes(modes[mode.parent]) and not modes[mode.parent].includes(mode)
    assert not evc_mode("amd-greyhound").includes(evc_mode("amd-bulldozer"))
    assert evc_mode("amd-bulldozer").includes(evc_mode("amd-greyhound-no3dnow"))


# ---- the Cluster object --------------------------------------------------------------

def test_cluster_refuses_a_host_below_its_mode_until_the_mode_is_lowered():
    cluster = Cluster()
    cluster.add_host(load_profile("nehalem"))
    cluster.add_host(load_profile("westmere"))
    cluster.set_mode("intel-nehalem")
    with pytest.raises(MinivmmError, match="penryn cannot run EVC mode intel-nehalem"):
        cluster.add_host(load_profile("penryn"))
    cluster.set_mode("intel-penryn")
    cluster.add_host(load_profile("penryn"))
    with pytest.raises(MinivmmError, match="cannot run EVC mode intel-westmere"):
        cluster.set_mode("intel-westmere")
    with pytest.raises(MinivmmError, match="mixed vendors|for INTEL"):
        cluster.add_host(load_profile("epyc"))


def test_raising_the_mode_reaches_a_vm_only_at_its_next_power_on():
    cluster = Cluster()
    for name in ("nehalem", "westmere"):
        cluster.add_host(load_profile(name))
    cluster.set_mode("intel-penryn")
    vm = cluster.power_on("web", "detect_cpuid")
    cluster.set_mode("intel-nehalem")
    assert vm.run(timeout=10).detections["popcnt"].cpuid is False  # frozen at power-on
    assert cluster.vm_mode("web") == "intel-penryn"
    again = cluster.power_on("web", "detect_cpuid")
    assert again.run(timeout=10).detections["popcnt"].cpuid is True
    assert cluster.vm_mode("web") == "intel-nehalem"


# ---- the commands --------------------------------------------------------------------

def test_check_command_verdicts_and_exit_codes():
    out = minivmm_cli("check", "nehalem", "penryn")
    assert out.returncode == 1 and out.stdout.startswith("INCOMPATIBLE") and "popcnt rdtscp sse4_2" in out.stdout
    out = minivmm_cli("check", "nehalem", "penryn", "--evc", "intel-penryn", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["verdict"] == "IDENTICAL"
    assert minivmm_cli("check", "penryn", "nehalem").stdout.startswith("SUPERSET")


def test_baseline_command_json():
    out = minivmm_cli("baseline", "penryn", "nehalem", "westmere", "--json")
    report = json.loads(out.stdout)
    assert report["evc"] == "intel-penryn" and "sse4_1" in report["features"]
    assert report["masks"]["nehalem"] == "-sse4_2,-popcnt,-rdtscp"


def test_mask_commands():
    assert minivmm_cli("mask", "convert", "-sse4_1", "--to", "xen").stdout.strip() == "0x1:ecx=" + "x" * 12 + "0" + "x" * 19
    msr = minivmm_cli("mask", "msr", "-sse4_1", "--host", "penryn")
    assert "wrmsr 0x478 0xfffffffffff7ffff" in msr.stdout
    nomsr = minivmm_cli("mask", "msr", "-sse4_1", "--host", "haswell")
    assert "no CPUID masking MSRs" in nomsr.stdout
    lint = minivmm_cli("mask", "lint", "-avx,+avx2")
    assert lint.returncode == 1 and "avx2 is shown but needs avx" in lint.stdout
    assert minivmm_cli("mask", "lint", "-sse4_1", "--host", "penryn").returncode == 0
    explain = minivmm_cli("mask", "explain", "-xsave", "--host", "sandybridge")
    assert "avx (CPUID.0x1:ECX[28]): host 1 -> guest 0: mask -xsave: needs xsave" in explain.stdout
    assert "hypervisor (CPUID.0x1:ECX[31]): host 0 -> guest 1: normalisation" in explain.stdout
    shown = json.loads(minivmm_cli("evc", "show", "intel-penryn", "--json").stdout)
    assert "sse4_1" in shown["added"] and "penryn" in shown["hosts"] and "core2" not in shown["hosts"]


def test_lint_finds_vendor_and_max_leaf_problems():
    from minivmm.masking.formats import parse_mask
    from minivmm.masking.lint import lint
    haswell = load_profile("haswell")
    assert any("AMD feature" in p for p in lint(parse_mask("+sse4a"), haswell))
    assert any("SVM" in p for p in lint(parse_mask("0x8000000a:eax=0b1"), haswell))
    clamp = parse_mask("0x0:eax=0b" + "0" * 28 + "0001")  # max basic leaf 1
    assert any("maximum leaf 0x1 hides leaves that still advertise" in p for p in lint(clamp, haswell))
    assert lint(parse_mask("evc:intel-penryn"), haswell) == []
