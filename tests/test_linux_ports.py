"""Port I/O in a Linux program: IN, OUT, INS and OUTS at CPL 3 with IOPL 0 are #GP, a
SIGSEGV the program may handle (SDM Vol. 1, 19.5.1), as the machine's kernel delivers
it; and the exits that raise it cost nothing where those one-byte opcodes only appear
inside other instructions' bytes."""

import subprocess
from pathlib import Path

import pytest
from test_linux import needs_gcc

from minivmm.vmm import engine
from minivmm.vmm.vm import VM

SOURCE = Path(__file__).parent / "data" / "linux" / "ports.c"


def _build(directory, *flags) -> str:
    target = directory / ("ports" + "".join(flags))
    done = subprocess.run(["gcc", "-static", "-O1", *flags, "-o", str(target), str(SOURCE)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"gcc -static failed (no static glibc?): {done.stderr.strip()[:200]}")
    return str(target)


@pytest.fixture(scope="module")
def ports(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("ports"))


@needs_gcc
@pytest.mark.parametrize("host", ["penryn", "haswell"])
def test_port_io_is_the_sigsegv_the_machines_kernel_sends(ports, host):
    native = subprocess.run([ports], capture_output=True, text=True, timeout=30)
    result = VM(ports, host).run(timeout=60)
    if result.stop.reason == "unsupported":   # glibc's AVX2 string functions on a machine without AVX2
        pytest.skip(f"this machine cannot run the {host} profile's instructions: {result.stop.message}")
    assert result.stop.reason == "exited", result.stop.message
    assert result.console == native.stdout
    assert native.stdout.count("SIGSEGV code=128 trapno=13 err=0") == 4


@needs_gcc
def test_port_and_x87_opcode_bytes_inside_instructions_plant_no_exits(ports, tmp_path, monkeypatch):
    """3,200 EC bytes (IN AL, DX) and 1,600 DB E8 pairs (FUCOMI) inside the immediates of
    code that runs: a hook for each would make the engine check thousands more hooks per
    translated instruction."""
    def hooks(program) -> int:
        planted = []
        add = engine.add_code_hook
        monkeypatch.setattr(engine, "add_code_hook", lambda uc, callback, begin, end, *data:
                            planted.append(begin) or add(uc, callback, begin, end, *data))
        assert VM(program, "penryn").run(timeout=60).console.endswith("done\n")
        return len(planted)
    assert hooks(ports) - hooks(_build(tmp_path, "-DWITHOUT_IMMEDIATES")) < 50
