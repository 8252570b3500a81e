"""What a CPU does that CPUID does not say: instructions executed although never
reported (PREFETCHW before Broadwell, per vendor and generation), and RTM, which no
engine model has, carried out as a CPU whose transactions always abort may."""

import re
import subprocess

import pytest
from iced_x86 import Decoder
from test_linux import build, needs_gcc

from minivmm.cpu import isa
from minivmm.cpu.features import catalogue
from minivmm.cpu.native import machine_features
from minivmm.cpu.profiles import _from_table, builtin_names, executed_unreported, load_profile
from minivmm.linux.cpuinfo import cpuinfo
from minivmm.masking.view import GuestCpuidView
from minivmm.vmm.vm import VM

PREFETCHW = bytes.fromhex("0f0d4c24c0")  # prefetchw [rsp - 64]


def _verdict(physical) -> isa.Verdict:
    instr = Decoder(64, PREFETCHW).decode()
    return isa.verdict(isa.needed_features(instr), instr.mnemonic, physical, instr.code)


def _netburst() -> "HostProfile":
    """A Core 2's table with NetBurst's signature (family 15): a 64-bit Pentium 4."""
    core2 = load_profile("core2").cpuid
    return _from_table("netburst", core2.replace({(1, 0): (0xF43, *core2[(1, 0)][1:])}), "test")


@pytest.mark.parametrize("host", builtin_names())
def test_prefetchw_runs_on_every_64_bit_family_6_intel_and_every_amd64(host):
    profile = load_profile(host)
    assert "3dnowprefetch" in profile.physical
    assert _verdict(profile.physical) is isa.Verdict.RUN
    reported = catalogue().decode(profile.cpuid)
    if "3dnowprefetch" not in reported:  # negative control: by CPUID alone it would be #UD
        assert _verdict(profile.physical - executed_unreported(profile.vendor, profile.signature.family,
                                                               reported)) is isa.Verdict.UD


def test_prefetchw_is_ud_on_netburst_and_unreported_before_broadwell():
    netburst = _netburst()
    assert netburst.signature.family == 15 and netburst.vendor == "intel"
    assert _verdict(netburst.physical) is isa.Verdict.UD
    reported = {h: "3dnowprefetch" in catalogue().decode(load_profile(h).cpuid) for h in builtin_names()}
    assert not any(reported[h] for h in ("core2", "penryn", "nehalem", "sandybridge", "haswell"))
    assert all(reported[h] for h in ("broadwell", "skylake-server", "icelake-server"))


@pytest.mark.parametrize("host, shown", [("opteron-g1", True), ("opteron-g2", True), ("penryn", False),
                                         ("haswell", False), ("broadwell", True)])
def test_cpuinfo_names_3dnowprefetch_as_linux_does(host, shown):
    """init_amd sets it for long mode or 3DNow!; on Intel only CPUID's bit counts."""
    profile = load_profile(host)
    view = GuestCpuidView(profile.cpuid)
    flags = re.search(r"^flags\s*: (.*)$", cpuinfo(profile, view), re.M)[1].split()
    assert ("3dnowprefetch" in flags) is shown
    assert flags.count("3dnowprefetch") <= 1


def _run(program: str, host: str):
    result = VM(program, host).run(timeout=60)
    if result.stop.reason == "unsupported":   # glibc's AVX2 string functions on a machine without AVX2
        pytest.skip(f"this machine cannot run the {host} profile's instructions: {result.stop.message}")
    return result


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    return build(tmp_path_factory, "probe_prefetchw.c", "probe_prefetchw")


@needs_gcc
@pytest.mark.parametrize("host, line", [("penryn", "cpuid=0 probe=1"), ("haswell", "cpuid=0 probe=1"),
                                        ("broadwell", "cpuid=1 probe=1"), ("opteron-g1", "cpuid=0 probe=1")])
def test_a_probe_finds_prefetchw_that_cpuid_never_reported(probe, host, line):
    result = _run(probe, host)
    assert result.stop.reason == "exited", result.stop.message
    assert result.console == f"prefetchw: {line}\n"


@pytest.fixture(scope="module")
def transactions(tmp_path_factory):
    return build(tmp_path_factory, "transactions.c", "transactions")


# The SDM's fixed answers outside a transaction (XTEST, XABORT, XEND); XBEGIN's may be either.
OUTSIDE = ["xtest: zf=1 cf=0", "xabort: nothing", "xend: signal 11"]


@needs_gcc
def test_rtm_outside_transactions_and_a_transaction_that_aborts(transactions):
    result = _run(transactions, "broadwell")
    assert result.stop.reason == "exited", result.stop.message
    lines = result.console.splitlines()
    assert [lines[0], lines[1], lines[3]] == OUTSIDE
    assert lines[2] == "xbegin: aborted inside=0 explicit=0"  # state as at XBEGIN, no XABORT status
    if "rtm" in machine_features():  # the machine agrees wherever the SDM fixes the answer
        native = subprocess.run([transactions], capture_output=True, text=True, timeout=30).stdout.splitlines()
        assert [native[0], native[1], native[3]] == OUTSIDE
        assert native[2] in ("xbegin: committed inside=1", "xbegin: aborted inside=0 explicit=0")


@needs_gcc
def test_rtm_is_sigill_where_the_host_has_none(transactions):
    assert "rtm" not in load_profile("penryn").physical
    result = VM(transactions, "penryn").run(timeout=60)
    assert result.console == "rtm: signal 4\n"
