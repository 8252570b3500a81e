"""A Linux program's world: the machine's files only where mounted (read-only), minivmm's
own /proc, /dev and /sys, dynamically linked programs with their interpreter and
libraries, and the address space with its protections enforced. Programs nobody here
wrote (Debian's busybox and coreutils) are checked against their native runs."""

import json
import os
import shutil
import subprocess
import time

import pytest
from helpers import minivmm_cli, one_line_error

from minivmm.errors import MinivmmError
from minivmm.guests import shipped_guests_dir
from minivmm.linux.vfs import Mount
from minivmm.vmm.vm import VM

BUSYBOX = shutil.which("busybox")
needs_busybox = pytest.mark.skipif(not BUSYBOX, reason="busybox is not installed (apt install busybox-static)")
needs_gcc = pytest.mark.skipif(not shutil.which("gcc"), reason="gcc is not installed: cannot build a Linux program")
SHA256SUM = shutil.which("sha256sum")


def native(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, **kw)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    (folder / "a.txt").write_text("minivmm reads what is mounted\n")
    (folder / "b.bin").write_bytes(bytes(range(256)) * 1000)
    (folder / "sub").mkdir()
    (folder / "sub" / "c.txt").write_text("deeper\n")
    os.symlink("a.txt", folder / "link")
    return folder


@needs_busybox
def test_busybox_sha256sum_of_a_mounted_file_equals_the_native_run(data_dir):
    """The file is mounted at another path in the program's namespace (--mount HOST:GUEST)."""
    expected = native(BUSYBOX, "sha256sum", str(data_dir / "b.bin")).stdout.split()[0]
    done = minivmm_cli("run", BUSYBOX, "--linux", "--mount", f"{data_dir}:/data", "--", "sha256sum", "/data/b.bin")
    assert done.returncode == 0 and done.stdout == f"{expected}  /data/b.bin\n", done.stderr


@needs_busybox
def test_nothing_of_the_machine_is_visible_unless_mounted(data_dir):
    done = minivmm_cli("run", BUSYBOX, "--linux", "--", "cat", str(data_dir / "a.txt"))
    assert done.returncode == 1 and "No such file or directory" in done.stderr
    done = minivmm_cli("run", BUSYBOX, "--linux", "--mount", str(data_dir), "--", "cat", str(data_dir / "link"))
    assert done.returncode == 0 and done.stdout == "minivmm reads what is mounted\n"  # a link, followed


@needs_busybox
def test_directory_listings_and_stat_equal_the_native_ones(data_dir):
    """getdents64 and newfstatat through a mount: busybox ls -la shows the machine's own
    sizes, modes and link targets, entry by entry as natively; and their times, not their
    years: the virtual clock starts at the mount's modification time, so they are recent."""
    ours = minivmm_cli("run", BUSYBOX, "--linux", "--mount", f"{data_dir}:/d", "--", "ls", "-ln", "/d", "/d/sub")
    theirs = native(BUSYBOX, "ls", "-ln", str(data_dir), str(data_dir / "sub"))
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == theirs.stdout.replace(str(data_dir), "/d")


@needs_busybox
def test_the_file_system_is_read_only(data_dir):
    """A bind mount mounted read-only answers EROFS to every change (open for writing,
    creating, removing): the machine's files are never touched."""
    for args in (["touch", "/d/new"], ["rm", "/d/a.txt"], ["mkdir", "/d/x"], ["sh", "-c", "echo > /d/a.txt"]):
        done = minivmm_cli("run", BUSYBOX, "--linux", "--mount", f"{data_dir}:/d", "--", *args)
        assert done.returncode != 0 and "Read-only file system" in done.stderr, (args, done.stderr)
    assert sorted(os.listdir(data_dir)) == ["a.txt", "b.bin", "link", "sub"]
    assert (data_dir / "a.txt").read_text() == "minivmm reads what is mounted\n"


@needs_busybox
def test_standard_input_is_passed_through():
    done = minivmm_cli("run", BUSYBOX, "--linux", "--", "wc", "-c", input="twelve bytes")
    assert done.returncode == 0 and done.stdout.split() == ["12"]


@needs_busybox
def test_proc_self_is_the_process_s_own():
    """/proc/self/maps lists the mappings (the image with its segments' protections, the
    heap, the stack), /proc/self/exe links to the program; /proc/cpuinfo and /sys are
    minivmm's (one CPU) even with the whole machine mounted. (busybox's applets run one
    by one: the program cannot fork.)"""
    def applet(*args):
        done = minivmm_cli("run", BUSYBOX, "--linux", "--mount", "/", "--", *args)
        assert done.returncode == 0, done.stderr
        return done.stdout
    maps = applet("cat", "/proc/self/maps").splitlines()
    assert any(" r-xp " in line and line.endswith(BUSYBOX) for line in maps), maps
    assert any(" rw-p " in line and line.endswith("[heap]") for line in maps)
    assert maps[-1].endswith("[stack]") and " rw-p " in maps[-1]
    assert applet("readlink", "/proc/self/exe") == BUSYBOX + "\n"
    assert applet("grep", "-c", "processor", "/proc/cpuinfo") == "1\n"
    assert applet("cat", "/sys/devices/system/cpu/online") == "0\n" and applet("nproc") == "1\n"
    assert applet("wc", "-c", "/proc/self/auxv").split()[0] != "0"


@needs_busybox
def test_dev_urandom_follows_the_seed_and_the_clock_is_virtual_unless_asked():
    def run(*args):
        return minivmm_cli("run", BUSYBOX, "--linux", *args).stdout
    random = ["--", "od", "-An", "-tx1", "-N16", "/dev/urandom"]
    one, again, other = run(*random), run(*random), run("--seed", "7", *random)
    assert one == again and one != other and len(one.split()) == 16
    # the virtual epoch, reproducible: the program file's modification time (no mounts), at the earliest 1700000000
    assert run("--", "date", "+%s") == f"{max(-(-os.stat(BUSYBOX).st_mtime_ns // 10**9), 1_700_000_000)}\n"
    assert abs(int(run("--realtime", "--", "date", "+%s")) - time.time()) < 60


@pytest.mark.skipif(not SHA256SUM, reason="no sha256sum on this machine")
@pytest.mark.parametrize("host", ["penryn", "nehalem", "sandybridge"])
def test_a_dynamically_linked_program_of_the_machine_runs_with_its_libraries(data_dir, host):
    """/usr/bin/sha256sum: ld.so loaded at AT_BASE from the mounted machine, libc.so.6
    found through /etc/ld.so.cache, mapped, relocated and protected (RELRO)."""
    expected = native(SHA256SUM, str(data_dir / "b.bin")).stdout
    result = VM(SHA256SUM, host, mounts=["/"], argv=[str(data_dir / "b.bin")]).run(timeout=120)
    assert result.exit_code == 0 and result.console == expected, result.stop.message
    assert result.syscalls["counts"]["mmap"] >= 4 and result.syscalls["counts"]["mprotect"] >= 1


LDSO = "/lib64/ld-linux-x86-64.so.2"


@pytest.mark.skipif(not os.path.exists(LDSO), reason="no glibc dynamic loader on this machine")
def test_the_dynamic_loader_s_own_cpu_detection_follows_the_view():
    """glibc's ld.so run as a program (--list-diagnostics) prints what its
    init_cpu_features found: the x86-64-v2 level (and the glibc-hwcaps/x86-64-v2 library
    directory) on a Nehalem, neither under the Penryn baseline that hides POPCNT and
    SSE4.2; the same ld.so sees the same under qemu-user's Nehalem."""
    def diagnostics(evc=None):
        result = VM(LDSO, "nehalem", evc=evc, mounts=["/"], argv=["--list-diagnostics"], linux=True).run(timeout=120)
        assert result.exit_code == 0, result.stop.message
        return dict(line.split("=", 1) for line in result.console.splitlines() if "=" in line)
    plain, masked = diagnostics(), diagnostics("intel-penryn")
    assert "x86.cpu_features.isa_1" in plain, "this ld.so lists no x86 diagnostics"
    assert int(plain["x86.cpu_features.isa_1"], 16) & 2 and not int(masked["x86.cpu_features.isa_1"], 16) & 2
    assert plain["dl_hwcaps_subdirs_active"] == "0x4" and masked["dl_hwcaps_subdirs_active"] == "0x0"
    if shutil.which("qemu-x86_64"):
        qemu = native("qemu-x86_64", "-cpu", "Nehalem", LDSO, "--list-diagnostics").stdout
        theirs = dict(line.split("=", 1) for line in qemu.splitlines() if "=" in line)
        assert theirs["x86.cpu_features.isa_1"] == plain["x86.cpu_features.isa_1"]
        assert theirs["dl_hwcaps_subdirs_active"] == plain["dl_hwcaps_subdirs_active"]


def test_a_missing_mount_or_interpreter_is_one_line(tmp_path):
    done = minivmm_cli("run", BUSYBOX or "hello", "--linux", "--mount", str(tmp_path / "nowhere"))
    assert one_line_error(done) and "does not exist on this machine" in done.stderr
    for spec, says in ((f"{tmp_path}:relative", "must be absolute"), (f"{tmp_path}:/proc", "minivmm's own"),
                       (":/x", "expected HOST")):
        with pytest.raises(MinivmmError, match=says):
            Mount.parse(spec)
    if SHA256SUM:
        done = minivmm_cli("run", SHA256SUM)
        assert one_line_error(done) and "interpreter /lib64/ld-linux-x86-64.so.2 is not in the program's file system" \
            in done.stderr and "--mount /" in done.stderr


@pytest.fixture(scope="module")
def readonly(tmp_path_factory):
    out = tmp_path_factory.mktemp("ro") / "readonly"
    src = shipped_guests_dir().joinpath("linux", "readonly.c")
    done = subprocess.run(["gcc", "-static", "-O1", "-o", str(out), str(src)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"gcc -static failed: {done.stderr.strip()[:200]}")
    return str(out)


@needs_gcc
def test_a_write_to_a_read_only_page_is_sigsegv_as_natively(readonly):
    """mprotect(PROT_READ) is enforced: the write is SIGSEGV with SEGV_ACCERR and si_addr
    the byte written, the page still reads what it held; a read after munmap is
    SEGV_MAPERR. The same program natively prints the same."""
    expected = native(readonly).stdout
    result = VM(readonly, "nehalem").run(timeout=60)
    assert result.exit_code == 0 and result.console == expected, result.console
    assert expected.startswith('SIGSEGV code 2 at offset 100; still reads "before"')


@needs_gcc
def test_the_same_write_without_a_handler_is_fatal(readonly):
    assert native(readonly, "fatal").returncode == -11
    done = minivmm_cli("run", readonly, "--json", "--", "fatal")
    report = json.loads(done.stdout)
    assert done.returncode == 139 and report["stop"]["signal"] == "SIGSEGV" and report["stop"]["vector"] == 14
    assert "write to" in report["stop"]["message"] and "a page mapped r--" in report["stop"]["message"]
