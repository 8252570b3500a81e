"""Processes under emulated hosts: fork, vfork, exec, wait, pipes, readiness and signals
between processes, so that shells, build tools and runtimes run on a Penryn. The
machine's own run of the same program (the machine's kernel) is the oracle."""

import os
import shutil
import select
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HASWELL, SYSTEM_PYTHON, needs_python

from minivmm.vmm.vm import VM

SOURCES = Path(__file__).parent / "data" / "linux"
SHELL = shutil.which("sh")
pytestmark = pytest.mark.skipif(SHELL is None, reason="no sh on this machine")


def natively(argv, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd)


def emulated(argv, host: str, cwd=None):
    return VM(shutil.which(argv[0]) or argv[0], host, argv=argv[1:], mounts=["/"]).run(timeout=300)


COMMANDS = {
    "pipeline": [SHELL, "-c", "echo a | cat"],
    "exec": [SHELL, "-c", "/bin/echo x"],
    "xargs": [SHELL, "-c", "printf 'a\\nb\\nc\\n' | xargs echo"],
    "timeout": ["timeout", "5", "true"],
    "timeout-kills": ["timeout", "1", "sleep", "3"],
    "env": ["env", "echo", "from env"],
    "perl-fork": ["perl", "-e", "if (my $p = fork) { waitpid($p, 0); print qq(parent $?\\n) } "
                                "else { print qq(child\\n); exit 3 }"],
    "xz": [SHELL, "-c", "seq 1 2000 | xz | xz -d | tail -1"],
    "zstd-threads": [SHELL, "-c", "seq 1 2000 | zstd -q -T2 | zstd -q -d | tail -1"],
    "sort-pipeline": [SHELL, "-c", "seq 1 50 | sort -rn | head -3"],
}


@pytest.mark.parametrize("host", ["penryn", HASWELL])
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_shells_and_tools_give_the_native_output(name, host):
    argv = COMMANDS[name]
    if not shutil.which(argv[0]) or (argv[0] == SHELL and not all(
            shutil.which(tool) for tool in ("xz", "zstd", "perl") if tool in argv[-1])):
        pytest.skip(f"{argv[0]} or a tool it runs is not installed here")
    expected = natively(argv)
    result = emulated(argv, host)
    assert (result.console, result.exit_code) == (expected.stdout, expected.returncode), result.stderr[-400:]


def test_make_prints_its_commands_as_natively(tmp_path):
    if not shutil.which("make"):
        pytest.skip("make is not installed here")
    (tmp_path / "Makefile").write_text("all: a b\na:\n\techo building a\nb:\n\t$(MAKE) -s c\nc:\n\tcc -c x.c\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)   # the program starts in the directory the command runs in, as under qemu-user
    try:
        result = VM(shutil.which("make"), "penryn", argv=["-n"], mounts=["/"]).run(timeout=120)
    finally:
        os.chdir(cwd)
    expected = natively([shutil.which("make"), "-n"], cwd=tmp_path)   # $(MAKE) is its argv[0]
    assert result.console == expected.stdout and result.exit_code == 0


def test_process_calls_answer_as_the_machines_kernel(tmp_path):
    program = tmp_path / "process_calls"
    built = subprocess.run(["gcc", "-static", "-O1", "-o", str(program), str(SOURCES / "process_calls.c")],
                           capture_output=True, text=True) if shutil.which("gcc") else None
    if built is None or built.returncode:
        pytest.skip("gcc -static is not available to build the program")
    expected = natively([str(program)])
    result = VM(str(program), "penryn").run(timeout=120)
    assert result.console == expected.stdout and result.exit_code == 0
    assert "killed by: SIGTERM, SIGCHLD handled: yes" in result.console


@needs_python
@pytest.mark.parametrize("host", ["penryn", HASWELL])
def test_python_subprocess_runs_a_child(host):
    """subprocess.run: pipes, fork (or vfork) and exec, and a wait, from CPython
    (its threads: test_linux_threads.py)."""
    python = SYSTEM_PYTHON
    code = "import subprocess; print(subprocess.run(['echo', 'sub'], capture_output=True).stdout.decode(), end='')"
    assert emulated([python, "-c", code], host).console == natively([python, "-c", code]).stdout == "sub\n"


def test_the_report_covers_the_whole_tree():
    result = emulated([SHELL, "-c", "echo a | cat; echo b"], "penryn")
    counts = result.syscalls["counts"]
    assert counts["execve"] >= 1 and counts["wait4"] >= 2 and counts["pipe2"] + counts.get("pipe", 0) >= 1
    assert result.console == "a\nb\n"


@pytest.mark.skipif(not os.environ.get("MINIVMM_THOROUGH"), reason="minutes of V8 under the emulator: "
                    "MINIVMM_THOROUGH=1 runs it")
def test_node_prints_on_a_penryn():
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed here")
    result = VM(node, "penryn", argv=["-e", "console.log(6*7)"], mounts=["/"], memory="4G").run(timeout=900)
    assert result.console == "42\n" and result.exit_code == 0


def test_a_fork_bomb_meets_the_vms_bound_and_the_vmm_stays_small(tmp_path):
    """fork until it fails: EAGAIN at the VM's bound (its processes' RAM and translated
    code within MAX_VM_MEMORY), every child reaped, the VMM's peak memory bounded."""
    from minivmm.linux.scheduler import MAX_VM_MEMORY, PROCESS_OVERHEAD
    program = tmp_path / "fork_bomb"
    built = subprocess.run(["gcc", "-static", "-O1", "-o", str(program), str(SOURCES / "fork_bomb.c")],
                           capture_output=True, text=True) if shutil.which("gcc") else None
    if built is None or built.returncode:
        pytest.skip("gcc -static is not available to build the program")
    bound = MAX_VM_MEMORY // ((64 << 20) + PROCESS_OVERHEAD) - 1          # children beside the parent
    script = (f"import resource, subprocess, sys; done = subprocess.run([sys.executable, '-m', 'minivmm', 'run', "
              f"{str(program)!r}, '--memory', '64M', '--timeout', '300'], capture_output=True, text=True); "
              f"print(done.stdout, end=''); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
              f"file=sys.stderr); sys.exit(done.returncode)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"forked {bound}, then EAGAIN; reaped {bound}\n"
    peak_kib = int(done.stderr.split()[-1])
    assert peak_kib < 3 << 20, f"the VMM peaked at {peak_kib >> 10} MiB"   # far below MAX_VM_MEMORY's 8 GiB


def test_a_process_waiting_for_standard_input_lets_the_others_run():
    """cat waits for this command's standard input in the background while the shell
    runs sleep and echo: "first" comes out before any input is given (a read that held
    the whole VM would hold it back until then), and the input reaches cat after."""
    script = "exec 3<&0; cat <&3 & sleep 0.01; echo first; wait"
    child = subprocess.Popen([sys.executable, "-m", "minivmm", "run", SHELL, "--mount", "/", "--host", "penryn", "--",
                              "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
    try:
        ready, _, _ = select.select([child.stdout], [], [], 60)
        first = child.stdout.readline() if ready else ""
        rest, _ = child.communicate("later\n", timeout=120)
    finally:
        child.kill()
    assert (first, rest) == ("first\n", "later\n")


EPOLL_NESTS = """
import select
a, b = select.epoll(), select.epoll()
b.register(a.fileno(), select.EPOLLIN)
try:
    a.register(b.fileno(), select.EPOLLIN)
    print("a loop of epolls was accepted")
except OSError as e:
    print("loop:", e.errno)
chain = [select.epoll() for _ in range(7)]
for i in range(6):
    try:
        chain[i + 1].register(chain[i].fileno(), select.EPOLLIN)
    except OSError as e:
        print("nested", i + 1, "deep:", e.errno)
        break
print(a.poll(0.01))
"""


@needs_python
def test_epolls_in_a_loop_or_nested_too_deep_are_eloop_as_natively():
    """fs/eventpoll.c's ep_loop_check: the machine's kernel is the oracle."""
    argv = [SYSTEM_PYTHON, "-S", "-c", EPOLL_NESTS]
    expected = natively(argv)
    assert "loop: 40" in expected.stdout
    result = emulated(argv, "penryn")
    assert (result.console, result.exit_code) == (expected.stdout, expected.returncode), result.stderr[-400:]
