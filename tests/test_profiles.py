"""Built-in and dump profiles present exactly the real CPU data they came from."""

import pytest
from helpers import dump_registers, parse_raw_lines

from minivmm.cpu.profiles import builtin_names, dump_names, load_profile
from minivmm.vmm.vm import VM

HYPERVISOR = 1 << 31
OSXSAVE, XSAVE = 1 << 27, 1 << 26
OSPKE = 1 << 4

BUILTIN_DUMPS = {
    "core2": "Core2-E6850", "penryn": "Xeon-X5460", "nehalem": "Xeon-W3520", "westmere": "Core-i5-650",
    "sandybridge": "Core-i7-2600", "ivybridge": "Core-i7-3770", "haswell": "Xeon-E5-2650-v3",
    "broadwell": "Xeon-E5-2650-v4", "skylake-client": "Core-i5-6600", "skylake-server": "Xeon-Gold-6148",
    "cascadelake-server": "Xeon-Platinum-8268", "icelake-server": "Ice-Lake-Server",
    "opteron-g3": "Opteron-2350", "opteron-g4": "Opteron-6234", "opteron-g5": "A10-5800K",
    "epyc": "EPYC-7601-32-Core", "epyc-rome": "EPYC-7502-32-Core",
}
REAL_DUMPS = ["Xeon-5110", "Xeon-E5-2650", "Core-i7-8700", "Ryzen-9-3900X-12-Core", "EPYC-9334-32-Core",
              "Hygon-C86-7185-32-core"]


def guest_view(host):
    """What the shipped cpuid_dump guest printed, leaf by leaf (subleaf 0)."""
    result = VM("cpuid_dump", host).run(timeout=20)
    assert result.stop.reason == "exited", result.stop.message
    return parse_raw_lines(result.console)


def expected_leaf(real, leaf):
    """The real registers with the guest view's normalisation (docs/abi.md): hypervisor bit set, APIC ID 0,
    OSXSAVE mirroring CR4.OSXSAVE (set at boot exactly when the CPU has XSAVE), and
    OSPKE clear (CR4.PKE is off at boot)."""
    a, b, c, d = real[(leaf, 0)]
    if leaf == 1:
        b &= 0x00FFFFFF
        c = (c | HYPERVISOR) & ~OSXSAVE | (OSXSAVE if c & XSAVE else 0)
    if leaf == 7:
        c &= ~OSPKE
    return (a, b, c, d)


@pytest.mark.parametrize("host, dump", sorted(BUILTIN_DUMPS.items()) + [(f"dump:{d}", d) for d in REAL_DUMPS])
def test_guest_sees_the_real_cpu(host, dump):
    real = dump_registers(dump)
    seen = guest_view(host)
    for leaf in (0, 1, 7, 0x80000001):
        if (leaf, 0) in real:
            assert seen[(leaf, 0)] == expected_leaf(real, leaf), f"{host} leaf {leaf:#x}"
    # Family/model/stepping and vendor decode to the dump's.
    profile = load_profile(host)
    assert profile.cpuid.vendor_string == (real[(0, 0)][1].to_bytes(4, "little") + real[(0, 0)][3].to_bytes(4, "little")
                                           + real[(0, 0)][2].to_bytes(4, "little")).decode()
    eax = real[(1, 0)][0]
    family = (eax >> 8 & 0xF) + (eax >> 20 & 0xFF if eax >> 8 & 0xF == 0xF else 0)
    assert profile.signature.family == family
    assert profile.signature.stepping == eax & 0xF


def test_negative_control_guest_view_differs_between_generations():
    """The comparison above can fail: penryn's view is not nehalem's data."""
    assert guest_view("penryn")[(1, 0)] != expected_leaf(dump_registers("Xeon-W3520"), 1)


@pytest.mark.parametrize("host", ["opteron-g1", "opteron-g2"])
def test_qemu_model_profiles_follow_the_model(host):
    seen = guest_view(host)
    profile = load_profile(host)
    assert seen[(0, 0)][1:] == (0x68747541, 0x444D4163, 0x69746E65)  # "AuthenticAMD"
    assert profile.signature.family == 15
    for feature in ("sse2", "lm", "nx", "syscall"):
        assert profile.has(feature)
    assert profile.has("cx16") == (host == "opteron-g2")
    # 0x80000001 EDX carries AMD's copies of leaf-1 EDX bits, as QEMU builds it.
    assert seen[(0x80000001, 0)][3] & 1 == seen[(1, 0)][3] & 1 == 1


def test_every_builtin_name_resolves_and_runs_on_its_engine_model():
    for name in builtin_names():
        profile = load_profile(name)
        assert profile.engine_model
        assert len(profile.physical) > 20


def test_physical_isa_matches_generation():
    assert not load_profile("core2").has("sse4_1")
    assert load_profile("penryn").has("sse4_1") and not load_profile("penryn").has("popcnt")
    assert load_profile("nehalem").has("popcnt") and load_profile("nehalem").has("sse4_2")
    assert load_profile("haswell").has("avx2") and load_profile("haswell").has("bmi1")
    assert load_profile("opteron-g3").has("3dnow") and not load_profile("epyc").has("3dnow")
    # State bits are never physical features.
    assert "osxsave" not in load_profile("haswell").physical
    assert "hypervisor" not in load_profile("haswell").physical


def test_dump_profiles_pick_an_engine_model_that_covers_them():
    for name in dump_names():
        assert load_profile(f"dump:{name}").engine_model


def test_file_profile_from_cpuid_raw_text(tmp_path):
    text = load_profile("nehalem").cpuid.raw_lines()
    path = tmp_path / "nehalem.txt"
    path.write_text("\n".join(text) + "\n")
    profile = load_profile(f"file:{path}")
    assert dict(profile.cpuid) == dict(load_profile("nehalem").cpuid)
    assert profile.physical == load_profile("nehalem").physical


def test_native_profile_reads_this_machine():
    import platform
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("native needs an x86-64 machine")
    profile = load_profile("native")
    assert profile.vendor in ("intel", "amd", "hygon")
    assert "sse2" in profile.physical and "lm" in profile.physical
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    for feature in ("sse4_1", "sse4_2", "popcnt", "avx", "avx2", "aes"):
        if flags:
            assert (feature in flags) == profile.has(feature), feature
