"""execve in place, #! scripts, and the single-process calls statfs, fstatfs, close_range
and socket: each program runs natively and under minivmm with the same arguments, and
the two runs must say the same (the kernel is the oracle)."""

import gzip
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import minivmm_cli, one_line_error

from minivmm.linux.binfmt import find_program
from minivmm.linux.errno import SyscallError
from minivmm.linux.vfs import FileSystem, Mount
from minivmm.vmm.vm import VM

SOURCES = Path(__file__).parent / "data" / "linux"
pytestmark = pytest.mark.skipif(not shutil.which("gcc"), reason="gcc is not installed: cannot build a Linux program")


def native(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60, **kw)


def script(folder: Path, name: str, text: str, mode: int = 0o755) -> Path:
    path = folder / name
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The programs, built static, and the files execve.c tries (see its comment)."""
    d = tmp_path_factory.mktemp("exec")
    for source, flags in (("execve.c", []), ("entry_registers.c", ["-nostdlib"]), ("fs_calls.c", [])):
        done = native("gcc", "-static", "-O1", *flags, "-o", d / source[:-2], SOURCES / source)
        if done.returncode:
            pytest.skip(f"gcc -static failed (no static glibc?): {done.stderr.strip()[:200]}")
    script(d, "notes.txt", "just some notes\n")
    script(d, "not-executable", "#!/bin/sh\n", 0o644)
    # five scripts in a row (what Linux allows), their #! lines in each form it reads
    script(d, "s1", f"#!{d}/s2\n")
    script(d, "s2", f"#! {d}/s3  an  argument\t \necho never\n")
    script(d, "s3", f"#!{d}/s4\tx\n")
    script(d, "s4", f"#!{d}/s5 y")
    script(d, "s5", f"#!{d}/execve\n")
    for i in range(1, 7):
        script(d, f"l{i}", f"#!{d}/l{i + 1}\n" if i < 6 else f"#!{d}/execve\n")
    script(d, "no-interpreter", f"#!{d}/none\n")
    script(d, "empty-line", "#!   \n")
    return d


def test_execve_replaces_the_program_as_natively(folder):
    """Failing execve calls return ENOENT, ENOEXEC (text without #!), EACCES (a directory,
    no execute bit), ELOOP (six scripts in a row), EFAULT and E2BIG and the program goes
    on; then five nested scripts end in a new image with the argv they rewrote, the new
    envp, AT_EXECFN, comm, /proc/self/exe and cmdline, O_CLOEXEC closed, handlers reset,
    the mask kept, no alternate stack, and its exit status. The report counts both
    images' system calls."""
    expected = native(folder / "execve", folder)
    assert expected.returncode == 42, expected.stderr
    result = VM(str(folder / "execve"), "haswell", argv=[folder], mounts=[str(folder)]).run(timeout=120)
    assert (result.stop.reason, result.stop.status) == ("exited", 42), result.stop.message
    assert result.console == expected.stdout
    assert result.syscalls["counts"]["execve"] == 12 and result.syscalls["counts"]["set_tid_address"] == 2


def test_the_new_image_starts_with_linux_s_registers(folder):
    """ELF_PLAT_INIT and start_thread: every general register 0, RFLAGS 0x202, FS and GS
    bases 0; the FPU in its initial state (FCW 0x37F, empty tags, MXCSR 0x1F80, XMM and
    the YMM upper halves 0), whatever the old image left in them."""
    if "avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("the machine has no AVX2: the test program fills YMM registers")
    expected = native(folder / "execve", "dirty", folder / "entry_registers")
    assert expected.returncode == 0 and "ymm_upper_bits" in expected.stdout, expected.stderr
    result = VM(str(folder / "execve"), "haswell", argv=["dirty", folder / "entry_registers"],
                mounts=[str(folder)]).run(timeout=60)
    assert result.stop.reason == "exited", result.stop.message
    assert result.console == expected.stdout


@pytest.mark.parametrize("line", [
    b"#!INTERP\n", b"#!INTERP one argument\n", b"#!  INTERP   a  b \t \n", b"#!INTERP\targ\n", b"#!INTERP",
    b"#!INTERP arg", b"#!INTERP \n", b"#!INTERP a\0b\n", b"#!INTERP\0junk\n", b"#!INTERP\r\n", b"#!\n",
    b"#! \t\n", b"#!" + b" " * 300 + b"\n", b"#!INTERP " + b"a" * 300 + b"\n", b"#!" + b"/" * 300 + b"INTERP\n",
    b"#!/" + b"/" * 250 + b"INTERP x\n", b"#!NOTHERE\n", b"no #! at all\n", b"",
])
def test_a_script_s_first_line_is_read_as_the_kernel_reads_it(folder, tmp_path, line):
    """fs/binfmt_script.c: the interpreter and at most one argument in 256 bytes, trailing
    whitespace gone, a path that would be cut refused (ENOEXEC). The argv (or errno)
    find_program gives is what the machine's kernel gives the same script."""
    path = tmp_path / "script"
    path.write_bytes(line.replace(b"INTERP", str(folder / "execve").encode()))
    path.chmod(0o755)
    try:
        done = native(path, "A", env={"ONLY": "1"})
        expected = [re.sub(r"^argv\[\d+\] ", "", row) for row in done.stdout.splitlines() if row.startswith("argv[")]
    except OSError as e:
        expected = e.errno
    fs = FileSystem([Mount(str(tmp_path), str(tmp_path)), Mount(str(folder), str(folder))], {})
    try:
        got = find_program(fs, "/", str(path), [str(path), "A"]).argv
    except SyscallError as e:
        got = e.errno
    assert got == expected


def test_execveat_opens_a_scripts_interpreter_from_the_working_directory(folder, tmp_path):
    """execveat(dirfd, "s"): the script is found from dirfd, its relative #! interpreter
    from the process's working directory (open_exec in load_script), not from dirfd."""
    (tmp_path / "sub").mkdir()
    for where in (tmp_path, tmp_path / "sub"):
        (where / "interp").write_bytes((folder / "execve").read_bytes())
        (where / "interp").chmod(0o755)
    script(tmp_path / "sub", "s", "#!interp\n")
    fs = FileSystem([Mount(str(tmp_path), str(tmp_path))], {})
    program = find_program(fs, str(tmp_path / "sub"), "s", ["s"], process_cwd=str(tmp_path))
    assert program.image.linux["exe"] == str(tmp_path / "interp")
    unchanged = find_program(fs, str(tmp_path / "sub"), "s", ["s"])   # the control: without it, dirfd's
    assert unchanged.image.linux["exe"] == str(tmp_path / "sub" / "interp")


def test_a_script_given_to_minivmm_runs_as_natively(folder):
    """minivmm run SCRIPT: its interpreter (five scripts deep here) reads it by its path
    in the program's file system, which must show it: else one line says to mount it."""
    expected = native(folder / "s1", "a", "b c", env={"ONLY": "x"})
    done = minivmm_cli("run", folder / "s1", "--env", "ONLY=x", "--mount", folder, "--", "a", "b c")
    assert (done.returncode, done.stdout) == (42, expected.stdout), done.stderr
    done = minivmm_cli("run", folder / "s1", "--", "a")
    assert one_line_error(done) and f"--mount {folder}" in done.stderr
    done = minivmm_cli("run", folder / "l1", "--mount", folder)
    assert one_line_error(done) and "ELOOP" in done.stderr


ZCAT = shutil.which("zcat")


@pytest.mark.skipif(not ZCAT or Path(ZCAT).read_bytes()[:2] != b"#!", reason="zcat is absent or not a #! script")
def test_zcat_a_shell_script_that_execs_gzip(tmp_path):
    """Debian's zcat is '#!/bin/sh ... exec gzip -cd "$@"': dash runs the script, looks
    gzip up along PATH (execve after execve) and replaces itself with it."""
    data = tmp_path / "words.txt.gz"
    data.write_bytes(gzip.compress(b"".join(b"line %d of some text\n" % i for i in range(2000))))
    expected = native(ZCAT, data)
    assert expected.returncode == 0
    result = VM(ZCAT, "penryn", argv=[data], mounts=["/"]).run(timeout=120)
    assert (result.stop.reason, result.console) == ("exited", expected.stdout), result.stop.message + result.stderr
    assert result.syscalls["counts"]["execve"] >= 1


def test_statfs_close_range_and_sockets_as_linux_answers(folder):
    """statfs of a mounted directory is the machine's (read-only, as every mount is);
    minivmm's /proc and /sys are procfs and sysfs, /dev devtmpfs; close_range closes or
    marks close-on-exec by range, as natively. Sockets: none, EAFNOSUPPORT for every
    family, as in a sandbox without network (the machine itself has sockets)."""
    expected = native(folder / "fs_calls", folder)
    assert expected.returncode == 0, expected.stderr
    result = VM(str(folder / "fs_calls"), "haswell", argv=[folder], mounts=[str(folder)]).run(timeout=60)
    assert result.stop.reason == "exited", result.stop.message
    got = result.console.splitlines()
    assert [row for row in got if "read-only" in row] and all(row.endswith("read-only 1") for row in got
                                                               if "read-only" in row)
    assert [row for row in got if row.startswith("socket")] == [
        "socket inet: -1 EAFNOSUPPORT", "socket unix: -1 EAFNOSUPPORT", "socketpair unix: -1 EAFNOSUPPORT"]

    def comparable(rows):   # /dev's size is the machine's memory; read-only and sockets are shown above
        return [re.sub(r"blocks \d+ files \d+", "", row) if row.startswith("/dev/") else row
                for row in rows if "read-only" not in row and not row.startswith("socket")]
    assert comparable(got) == comparable(expected.stdout.splitlines())
