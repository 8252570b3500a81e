"""The vDSO (linux/vdso.py): a shared object with the kernel's symbols and version, which
glibc and musl find through AT_SYSINFO_EHDR and call instead of clock_gettime,
gettimeofday, time, clock_getres and getcpu system calls; virtual time read there
agrees with the system calls', run after run. The oracle for the image is binutils'
readelf; for the answers, the same program's system calls."""

import shutil
import subprocess
from pathlib import Path

import pytest

from minivmm.linux import memory as memory_mod
from minivmm.linux import vdso
from minivmm.vmm.vm import VM

SOURCE = Path(__file__).parent / "data" / "linux" / "vdso.c"
ANSWERED = ("clock_gettime", "gettimeofday", "time", "clock_getres", "getcpu")
COMPILERS = {"glibc": ["gcc", "-O1"], "musl": ["musl-gcc", "-static", "-O1"]}


@pytest.fixture(scope="module", params=sorted(COMPILERS))
def program(request, tmp_path_factory):
    compiler = COMPILERS[request.param]
    if not shutil.which(compiler[0]):
        pytest.skip(f"{compiler[0]} is not installed: cannot build the {request.param} program")
    out = tmp_path_factory.mktemp("vdso") / f"vdso-{request.param}"
    subprocess.run([*compiler, "-o", str(out), str(SOURCE)], check=True, capture_output=True)
    return str(out)


def run(program: str, *args: str, **options):
    result = VM(program, "haswell", argv=list(args), mounts=["/"], linux=True, **options).run(timeout=120)
    assert result.exit_code == 0, (result.stop.message, result.console)
    return result


def test_the_image_has_the_kernels_symbols_and_version(tmp_path):
    image = vdso.image()
    assert image[:4] == b"\x7fELF" and len(image) <= vdso.PAGE
    assert vdso.elf_hash(b"LINUX_2.6") == 0x3AE75F6   # the hash glibc's dl_vdso_vsym asks for
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf is not installed (binutils): the image's tables are not checked")
    (tmp_path / "vdso.so").write_bytes(image)
    out = subprocess.run([readelf, "-W", "--dyn-syms", "-d", "-V", str(tmp_path / "vdso.so")],
                         capture_output=True, check=True, text=True).stdout
    for name in ANSWERED:
        assert f"__vdso_{name}@@LINUX_2.6" in out and f" {name}@@LINUX_2.6" in out
    assert "Library soname: [linux-vdso.so.1]" in out and "Name: LINUX_2.6" in out


def test_the_library_reads_the_clocks_without_a_system_call(program):
    """Every answered call goes through the vDSO (no such system call counted but the
    one the program makes itself), agrees with the system call's answer, and the
    CPU-time clock, which the vDSO leaves to the kernel as Linux's does, is a call."""
    result = run(program)
    lines = result.console.splitlines()
    assert lines[0] == "vdso mapped"
    assert "monotonic in order 1" in lines
    realtime = next(line.split() for line in lines if line.startswith("realtime"))
    assert realtime[1] == realtime[2] == realtime[3] and realtime[4:] == ["tz", "0", "0"] or \
        "musl" in program and realtime[1] == realtime[2] == realtime[3]   # musl's gettimeofday leaves tz
    assert "resolution 1" in lines and "cpu time positive 1" in lines
    if "glibc" in program:
        assert "getcpu 0 0 0" in lines
    counts = result.syscalls["counts"]
    assert counts.get("clock_gettime") == 2   # the program's own call, CLOCK_PROCESS_CPUTIME_ID
    # (musl asks the vDSO for clock_gettime only, and makes clock_getres a system call)
    assert counts.get("clock_getres", 0) == ("musl" in program)
    assert not any(counts.get(name) for name in ("gettimeofday", "time", "getcpu")), counts


def test_virtual_time_through_the_vdso_is_the_same_run_after_run(program):
    assert run(program).console == run(program).console


def test_under_realtime_every_clock_is_a_system_call(program):
    """The machine's clock is not in [vvar]: the vDSO makes the call (mode 0), as
    Linux's does without a clock source readable in user mode (a negative control
    for the count above)."""
    counts = run(program, realtime=True).syscalls["counts"]
    assert counts.get("clock_gettime", 0) + counts.get("gettimeofday", 0) + counts.get("time", 0) >= 5
    assert counts.get("clock_getres") == 1


def test_the_maps_name_vvar_and_vdso():
    cat = shutil.which("cat")
    result = VM(cat, "haswell", argv=["/proc/self/maps"], mounts=["/"]).run(timeout=120)
    names = [line.split()[-1] for line in result.console.splitlines() if len(line.split()) == 6]
    assert names.count("[vvar]") == names.count("[vdso]") == 1
    at = {line.split()[-1]: line.split()[0] for line in result.console.splitlines()}
    vvar_end, vdso_start = at["[vvar]"].split("-")[1], at["[vdso]"].split("-")[0]
    assert vvar_end == vdso_start   # [vdso] right after [vvar], as map_vdso lays them out
    assert result.console.count("r--p") and "r-xp" in next(l for l in result.console.splitlines() if "[vdso]" in l)


def test_a_page_mapped_where_vvar_was_keeps_its_bytes(program, monkeypatch):
    """A program may unmap [vvar]: the engine stops storing the time there, so a page
    of the program's own mapped in its place keeps what the program wrote."""
    assert run(program, "unmap").console == "intact\n"
    monkeypatch.setattr(memory_mod.AddressSpace, "_lose_vvar", lambda self, start, end: None)
    result = VM(program, "haswell", argv=["unmap"], mounts=["/"], linux=True).run(timeout=120)
    assert result.exit_code == 3 and "overwritten at 0" in result.console   # negative control


def test_vvar_cannot_become_writable_lose_its_page_or_grow(program):
    """[vvar] is a special mapping (vdso_install_vvar_mapping): without VM_MAYWRITE,
    mprotect(PROT_WRITE) is EACCES (mm/mprotect.c); VM_PFNMAP makes MADV_DONTNEED EINVAL
    (mm/madvise.c); VM_DONTEXPAND makes growing it EFAULT (mm/mremap.c). A program
    cannot rewrite what its vDSO reads."""
    assert run(program, "special").console == "mprotect -1 13\nmadvise -1 22\nmremap 1 14\n"
