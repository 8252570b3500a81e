"""/proc/cpuinfo as the kernel builds it: a flag only from a leaf the maximum leaf covers."""

import os
import shutil
from importlib import resources

import pytest

from minivmm.cpu.features import catalogue
from minivmm.cpu.profiles import builtin_profiles, load_profile
from minivmm.linux.cpuinfo import cpuinfo
from minivmm.masking.view import GuestCpuidView
from minivmm.vmm.vm import VM

DUMPS = sorted(p.name[len("x86_64-cpuid-"):-len(".xml")]
               for p in resources.files("minivmm").joinpath("data", "cpuid-dumps").iterdir() if p.name.endswith(".xml"))


def _flags(host) -> list[str]:
    text = cpuinfo(host, GuestCpuidView.for_host(host, None, ()))
    return next(line for line in text.splitlines() if line.startswith("flags")).split(": ", 1)[1].split()


@pytest.mark.parametrize("name", [p.name for p in builtin_profiles()] + [f"dump:{d}" for d in DUMPS])
def test_no_flag_comes_from_a_leaf_above_the_maximum(name):
    """Above the maximum basic leaf Intel CPUs return the highest basic leaf's data (SDM
    Vol. 2A, CPUID); the kernel reads a leaf only when the maximum covers it
    (arch/x86/kernel/cpu/common.c, get_cpu_cap)."""
    host = load_profile(name)
    by_name = {f.name: f for f in catalogue()}
    beyond = [flag for flag in _flags(host) if flag in by_name and not host.cpuid.in_range(by_name[flag].leaf)]
    assert not beyond, f"{name} lists {beyond}"


def test_penryn_lists_neither_xsavec_nor_sgx():
    """Penryn's maximum basic leaf is 0xA: leaves 0xD and 0x12 were read as leaf 0xA's
    data (the fault this guards against; a program trusting cpuinfo then ran XSAVEC)."""
    flags = _flags(load_profile("penryn"))
    assert "sse4_1" in flags and not {"xsavec", "sgx2", "xgetbv1"} & set(flags)


def test_model_name_is_the_brand_string_as_the_kernel_keeps_it():
    """get_model_name trims the ends and keeps the blanks inside; no brand string is
    "unknown" (show_cpuinfo), never a profile's own name."""
    from minivmm.linux.cpuinfo import model_name
    view = lambda name: GuestCpuidView.for_host(load_profile(name), None, ())  # noqa: E731
    assert model_name(view("penryn")) == "Intel(R) Xeon(R) CPU           X5460  @ 3.16GHz"
    assert model_name(view("epyc")) == "AMD EPYC 7601 32-Core Processor"
    assert model_name(view("icelake-server")) == "unknown"


@pytest.mark.skipif(not shutil.which("lscpu"), reason="lscpu (util-linux) is not installed")
def test_lscpu_sees_one_thread_one_core_one_socket():
    """lscpu counts from /sys/devices/system/cpu/cpu0/topology (it showed 0/0/0)."""
    lscpu = os.path.realpath(shutil.which("lscpu"))
    result = VM(lscpu, "haswell", linux=True, mounts=["/"]).run(timeout=60)
    assert result.stop.reason == "exited", result.stop.message
    lines = dict(line.split(":", 1) for line in result.console.splitlines() if ":" in line)
    counts = {key: lines[key].strip() for key in ("Thread(s) per core", "Core(s) per socket", "Socket(s)")}
    assert counts == dict.fromkeys(counts, "1")
    assert lines["Model name"].strip() == "Intel(R) Xeon(R) CPU E5-2650 v3 @ 2.30GHz"


def test_flags_follow_the_kernels_words_names_and_power_line():
    """cpufeatures.h: constant_tsc and nonstop_tsc are word 3 (from the invariant TSC bit,
    after lm), CPUID.6:EAX[1] is "ida", ""-named bits and AMD's copies of leaf 1 are not
    flags; 0x80000007 EDX is the power management line (proc.c x86_power_flags)."""
    haswell, epyc = _flags(load_profile("haswell")), _flags(load_profile("epyc"))
    assert haswell[haswell.index("lm") + 1:haswell.index("lm") + 3] == ["constant_tsc", "nonstop_tsc"]
    assert "ida" in haswell and not {"turbo_boost", "zero_fcs_fds", "fdp_excptn_only"} & set(haswell)
    assert not [f for f in epyc if f.startswith("e_")] and "cpb" in epyc
    host = load_profile("epyc")
    power = cpuinfo(host, GuestCpuidView.for_host(host, None, ())).splitlines()[-2]
    assert power == "power management: ts ttp tm hwpstate cpb eff_freq_ro [13] [14]"
