"""--accel kvm: the machine's own CPU as the host, CPUID from the view's table.

Where KVM runs guests on the CPU, the seed's claim is shown on real silicon: a feature
hidden from CPUID still executes. Where it cannot (no /dev/kvm, no permission, or a
paravirtual KVM that emulates a guest's instructions), those tests skip naming the
reason, and --accel kvm is one line, exit 2; the refusals below hold everywhere.
"""

import shutil

import pytest
from helpers import minivmm_cli

from minivmm.accel import kvm
from minivmm.cpu.native import machine_features
from minivmm.errors import MinivmmError
from minivmm.vmm.vm import VM

REASON = kvm.unusable_reason()
needs_kvm = pytest.mark.skipif(REASON is not None, reason=f"--accel kvm cannot run here: {REASON}")
needs_sse4a = pytest.mark.skipif("sse4a" not in machine_features(), reason="this machine has no SSE4a to hide")


@pytest.fixture
def usable(monkeypatch):
    """KVM taken as usable: for what is refused before a guest runs."""
    monkeypatch.setattr("minivmm.vmm.accelerated.unusable_reason", lambda: None)


@needs_sse4a
def test_sse4a_hidden_by_a_mask_still_executes_on_the_emulated_native_profile():
    result = VM("guests/detect_extended.asm", "native", masks=["-sse4a"]).run(timeout=30)
    assert result.detections["sse4a"].cpuid is False and result.detections["sse4a"].probe is True


@needs_kvm
@needs_sse4a
def test_on_the_machines_own_cpu_a_hidden_feature_executes_and_the_emulator_agrees():
    """The hardware, not minivmm, executes EXTRQ here: CPUID says no, the probe finds it,
    and the guest's #UD handler is never called for it (probe=1); the emulated native
    profile prints the same lines."""
    on_cpu = VM("guests/detect_extended.asm", "native", masks=["-sse4a"], accel="kvm").run(timeout=30)
    emulated = VM("guests/detect_extended.asm", "native", masks=["-sse4a"]).run(timeout=30)
    assert on_cpu.accel == "kvm" and on_cpu.exit_code == 0
    assert on_cpu.detections["sse4a"].cpuid is False and on_cpu.detections["sse4a"].probe is True
    assert on_cpu.console == emulated.console
    assert on_cpu.cpuid_exits == [] and "not visible" in on_cpu.notes[0]


@needs_kvm
def test_the_timeout_interrupts_a_guest_spinning_on_the_cpu(tmp_path):
    spin = tmp_path / "spin.asm"
    spin.write_text("top:\n    jmp top\n")
    result = VM(str(spin), "native", accel="kvm").run(timeout=1)
    assert result.stop.reason == "limit" and "1 s" in result.stop.message


def test_kvm_needs_the_machine_itself_as_host():
    with pytest.raises(MinivmmError, match="use --host native, not penryn"):
        VM("detect_both", "penryn", accel="kvm")


def test_kvm_refuses_a_view_that_shows_what_the_machine_lacks():
    lacking = next(f for f in ("xop", "fma4", "tbm", "avx512_fp16", "sse4a") if f not in machine_features())
    with pytest.raises(MinivmmError, match=f"shows {lacking}, which this machine lacks"):
        VM("detect_both", "native", masks=[f"+{lacking}"], accel="kvm")


def test_kvm_refuses_what_the_hardware_cannot_give_the_vmm(usable):
    vm = VM("detect_both", "native", accel="kvm")
    with pytest.raises(MinivmmError, match="exact --max-insns"):
        vm.run(max_insns=1000)
    with pytest.raises(MinivmmError, match="--audit"):
        vm.run(audit=True)
    with pytest.raises(MinivmmError, match="Linux programs and snapshots run on the emulator"):
        VM(shutil.which("true"), "native", accel="kvm")


def test_without_a_usable_kvm_it_is_one_line_and_exit_2(monkeypatch):
    monkeypatch.setattr(kvm, "DEVICE", "/nonexistent/kvm")
    kvm.unusable_reason.cache_clear()
    try:
        with pytest.raises(MinivmmError, match="/nonexistent/kvm does not exist"):
            VM("detect_both", "native", accel="kvm")
    finally:
        kvm.unusable_reason.cache_clear()


@pytest.mark.skipif(REASON is None, reason="KVM runs guests here: nothing to refuse")
def test_on_this_machine_the_cli_says_why_kvm_cannot_run():
    done = minivmm_cli("run", "detect_both", "--host", "native", "--accel", "kvm")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("minivmm: error: --accel kvm: ") and "Traceback" not in done.stderr
