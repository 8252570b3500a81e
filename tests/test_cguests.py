"""C guests: the freestanding runtime in guests/c, built with the system gcc at test time."""

import shutil

import pytest
from helpers import minivmm_cli

from minivmm.errors import MinivmmError
from minivmm.guests.toolchain import build_c, runtime_dir
from minivmm.vmm.vm import VM

pytestmark = pytest.mark.skipif(not shutil.which("gcc"), reason="gcc is not installed: C guests cannot be built")


def built(name):
    return str(build_c([runtime_dir() / f"{name}.c"]))


def test_libgcc_builtin_cpu_supports_follows_the_cpuid_view():
    """GCC's own detection asks CPUID, so it sees the EVC baseline, not the host."""
    guest = built("builtin_cpu")
    masked = VM(guest, "nehalem", evc="intel-penryn").run(timeout=20).detections
    assert (masked["sse4_1"].uses, masked["sse4_2"].uses, masked["popcnt"].uses) == ("sse4_1", "generic", "generic")
    plain = VM(guest, "nehalem").run(timeout=20).detections
    assert (plain["sse4_2"].uses, plain["popcnt"].uses) == ("sse4_2", "popcnt")
    # libgcc checks XCR0 too: AVX is off while the OS has not enabled YMM state.
    assert VM(guest, "sandybridge").run(timeout=20).detections["avx"].cpuid is False


def test_the_probing_c_guest_finds_what_the_mask_hides():
    result = VM(built("probe"), "nehalem", evc="intel-penryn").run(timeout=20)
    assert result.stop.reason == "exited" and result.stop.status == 0
    popcnt = result.detections["popcnt"]
    assert (popcnt.cpuid, popcnt.probe, popcnt.uses) == (False, True, "popcnt")
    on_penryn = VM(built("probe"), "penryn").run(timeout=20).detections["popcnt"]
    assert (on_penryn.probe, on_penryn.uses) == (False, "generic")


def test_ud_hook_sees_the_frame_and_can_skip_the_instruction(tmp_path):
    source = tmp_path / "skip.c"
    source.write_text(r'''
#include "minivmm.h"
static int faults;
static void skip(struct minivmm_frame *frame) { faults++; frame->rip += 4; }  /* popcnt eax, ebx */
int main(void)
{
    minivmm_on_ud(skip);
    for (int i = 0; i < 3; i++)
        __asm__ volatile(".byte 0xf3, 0x0f, 0xb8, 0xc3" ::: "eax");
    minivmm_on_ud(0);
    return faults;
}
''')
    guest = str(build_c([source]))
    assert VM(guest, "penryn").run(timeout=20).stop.status == 3       # no popcnt: three #UD
    assert VM(guest, "nehalem").run(timeout=20).stop.status == 0      # popcnt runs


def test_cc_command_and_its_errors(tmp_path, monkeypatch):
    out = tmp_path / "probe.elf"
    done = minivmm_cli("cc", str(runtime_dir() / "probe.c"), "-o", str(out))
    assert done.returncode == 0 and out.read_bytes()[:4] == b"\x7fELF"
    broken = tmp_path / "broken.c"
    broken.write_text("int main(void) { return nosuch; }\n")
    done = minivmm_cli("cc", str(broken), "-o", str(tmp_path / "b.elf"))
    assert done.returncode == 2 and "nosuch" in done.stderr and len(done.stderr.splitlines()) == 1
    undefined = tmp_path / "undefined.c"
    undefined.write_text("void nowhere(void);\nint main(void) { nowhere(); return 0; }\n")
    done = minivmm_cli("cc", str(undefined), "-o", str(tmp_path / "u.elf"))
    assert done.returncode == 2 and "undefined reference to `nowhere'" in done.stderr
    monkeypatch.setenv("CC", "no-such-compiler")
    done = minivmm_cli("cc", str(broken), "-o", str(tmp_path / "b.elf"))
    assert done.returncode == 2 and "no-such-compiler" in done.stderr


def test_a_failing_build_keeps_the_previous_image_and_never_overwrites_a_source(tmp_path):
    good, bad, image = tmp_path / "good.c", tmp_path / "bad.c", tmp_path / "guest.elf"
    good.write_text('#include "minivmm.h"\nint main(void) { return 0; }\n')
    bad.write_text("int main(void) { return syntax error; }\n")
    build_c([good], image)
    before = image.read_bytes()
    with pytest.raises(MinivmmError, match="building .*bad.c failed"):
        build_c([bad], image)
    assert image.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["bad.c", "good.c",
                                                                                            "guest.elf"]
    with pytest.raises(MinivmmError, match="also an input"):
        build_c([good], good)
    done = minivmm_cli("cc", str(tmp_path), "-o", str(tmp_path / "x.elf"))
    assert done.returncode == 2 and "a directory" in done.stderr  # a directory is no source


def test_endbr64_is_never_an_audited_use_of_ibt():
    """ENDBR64 executes as a NOP where CET is absent or off (SDM Vol. 2A, ENDBR64): a
    program built with -fcf-protection uses no hidden feature by running it. GCC's own
    detection code, compiled that way, passes the audit on hosts without IBT."""
    from minivmm.testing import audit_problems
    guest = str(build_c([runtime_dir() / "builtin_cpu.c"], cflags=["-fcf-protection=full"]))
    for host in ("penryn", "haswell", "epyc"):
        result = VM(guest, host).run(timeout=20, audit=True)
        assert not audit_problems(result), (host, audit_problems(result))
