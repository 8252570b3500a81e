"""The command line as users and scripts see it (docs/cli.md)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import dump_registers, minivmm_cli, parse_raw_lines

from minivmm.cpu.profiles import builtin_names
from minivmm.vmm.vm import VM

REPO = Path(__file__).resolve().parent.parent


def detections(report):
    found = {}
    for line in report["console"].splitlines():
        name, _, rest = line.partition(": ")
        found[name] = dict(kv.split("=") for kv in rest.split())
    return found


@pytest.mark.parametrize("host, present, absent", [
    ("penryn", {"sse4_1"}, {"sse4_2", "popcnt"}),
    ("nehalem", {"sse4_1", "sse4_2", "popcnt"}, {"avx", "avx2"}),
])
def test_detect_cpuid_json_report(host, present, absent):
    out = minivmm_cli("run", str(REPO / "guests" / "detect_cpuid.asm"), "--host", host, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)  # stdout holds only the report
    assert report["stop"]["reason"] == "exited" and report["host"] == host and report["hosts"] == [host]
    found = detections(report)
    assert {f for f, d in found.items() if d["cpuid"] == "1"} >= present
    assert not {f for f, d in found.items() if d["cpuid"] == "1"} & absent
    for key in ("guest", "stop", "console", "host", "hosts", "evc", "instructions", "cpuid_exits",
                "exceptions", "migrations", "audit"):
        assert key in report
    assert {"leaf", "subleaf", "eax", "ebx", "ecx", "edx", "host"} <= set(report["cpuid_exits"][0])
    assert set(report["stop"]) >= {"reason", "status", "vector", "rip", "instruction", "missing_features"}


def test_console_streams_to_stdout_and_the_ending_to_stderr():
    out = minivmm_cli("run", "hello", "--host", "core2")
    assert out.stdout == "Hello from a minivmm guest!\n"
    assert out.stderr.startswith("minivmm: exited") and out.stderr.count("\n") == 1


def test_exit_status_is_the_guests(tmp_path):
    guest = tmp_path / "g.asm"
    guest.write_text("mov al, 42\nout 0xf4, al\n")
    assert minivmm_cli("run", str(guest)).returncode == 42
    guest.write_text("ud2\n")
    assert minivmm_cli("run", str(guest)).returncode == 125
    guest.write_text("l: jmp l\n")
    assert minivmm_cli("run", str(guest), "--timeout", "0.3").returncode == 124
    assert minivmm_cli("run", str(guest), "--max-insns", "1000").returncode == 124


def elf_header_only():
    return b"\x7fELF\x02\x01\x01" + bytes(20)


@pytest.mark.parametrize("args, files, fragment", [
    (["run", "no/such/guest.asm"], {}, "not found"),
    (["run", "{bad.asm}"], {"bad.asm": "nop\nmov eax, 1\nbogus rax\n"}, "bad.asm:3: assembler error"),
    (["run", "{trunc.elf}"], {"trunc.elf": elf_header_only()}, "truncated ELF"),
    (["run", "hello", "--host", "pentium9"], {}, "unknown host profile 'pentium9'"),
    (["run", "hello", "--memory", "12Q"], {}, "malformed size '12Q'"),
    (["run", "hello", "--host", "file:/no/such/dump.xml"], {}, "cannot read CPUID dump"),
    (["run", "hello", "--host", "{junk.xml}"], {"junk.xml": "<cpudata><cpuid eax_in='zz'/></cpudata>"},
     "lacks a hex"),
    (["run", "hello", "--migrate", "penryn@later"], {}, "WHEN must be checkpoint:N, insn:N, ms:N or syscall:N"),
    (["run", "hello", "--migrate", "pentium9@insn:5"], {}, "unknown host profile 'pentium9'"),
    (["resume", "no/such.snap", "--host", "penryn"], {}, "cannot read snapshot"),
    (["run", "hello", "--no-such-flag"], {}, "No such option"),
    (["cpuid", "nosuchcpu"], {}, "unknown host profile"),
    (["mask", "convert", "-nosuch", "--to", "xen"], {}, "unknown CPU feature 'nosuch'"),
    (["run"], {}, "Missing argument 'GUEST'"),
    (["run", "{hello.c}"], {"hello.c": "int main(void) { return 0; }\n"}, "hello.c: not a guest: a text file; "
     "minivmm runs assembly source (.asm, .s, .S), ELF64 executables"),
    (["run", "{passwd}"], {"passwd": "root:x:0:0:root:/root:/bin/bash\n"}, "passwd: not a guest: a text file"),
    (["run", "{empty}"], {"empty": b""}, "empty: not a guest: an empty file; minivmm runs assembly source"),
    (["compare", "{notes.txt}", "--hosts", "core2"], {"notes.txt": "x\n"}, "notes.txt: not a guest: a text file"),
    (["matrix", "{notes.txt}", "--hosts", "core2"], {"notes.txt": "x\n"}, "notes.txt: not a guest: a text file"),
])
def test_bad_input_is_one_line_exit_2_no_traceback(tmp_path, args, files, fragment):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    for name in files:
        path = str(tmp_path / name)
        args = [a.replace("{" + name + "}", "file:" + path if name.endswith(".xml") else path) for a in args]
    out = minivmm_cli(*args)
    assert out.returncode == 2, out
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert fragment in out.stderr
    assert out.stdout == ""


def test_cpuid_raw_format_matches_the_real_dump_where_not_normalised():
    out = minivmm_cli("cpuid", "penryn", "--format", "raw")
    assert out.returncode == 0
    assert out.stdout.startswith("CPU:\n")  # as `cpuid -1 -r` prints it
    seen = parse_raw_lines(out.stdout)
    real = dump_registers("Xeon-X5460")
    assert seen.keys() == real.keys() | {(0x40000000, 0)}
    assert seen[(0, 0)] == real[(0, 0)] and seen[(0x80000001, 0)] == real[(0x80000001, 0)]
    assert seen[(1, 0)][2] == real[(1, 0)][2] | 1 << 31  # the hypervisor bit


def test_profiles_json_lists_every_builtin():
    out = minivmm_cli("profiles", "--json")
    names = [p["name"] for p in json.loads(out.stdout)]
    assert names[:3] == ["core2", "penryn", "nehalem"] and "epyc-rome" in names and len(names) == 19
    table = minivmm_cli("profiles")
    assert "Xeon" in table.stdout and table.returncode == 0


def test_help_teaches_with_examples():
    for command in (["--help"], ["run", "--help"], ["cpuid", "--help"], ["profiles", "--help"]):
        out = minivmm_cli(*command)
        assert out.returncode == 0 and "minivmm" in out.stdout
    assert "Examples" in minivmm_cli("run", "--help").stdout


def test_ctrl_c_interrupts_a_running_guest_cleanly(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    guest = tmp_path / "loop.asm"
    guest.write_text("l: jmp l\n")
    # A shell's background job ignores SIGINT; give the child the default handler back.
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            f"sys.argv = ['minivmm', 'run', {str(guest)!r}]; from minivmm.cli import main; main()")
    process = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=10)
    assert process.returncode == 130 and err.strip() == "minivmm: interrupted"


@pytest.mark.parametrize("host", builtin_names())
def test_cpuid_command_shows_exactly_what_a_booted_guest_reads(host):
    """The oracle is the guest itself: cpuid_dump executes CPUID for every leaf after
    boot; each of its lines is the command's line for that leaf (OSXSAVE set where the
    view has XSAVE, the hypervisor leaf 0x40000000 included)."""
    shown = parse_raw_lines(minivmm_cli("cpuid", host, "--format", "raw").stdout)
    read = parse_raw_lines(VM("cpuid_dump", host).run(timeout=30).console)
    assert read and all(shown[key] == regs for key, regs in read.items())
    assert shown[(0x40000000, 0)][1:] == (0x696E696D, 0x6D6D76, 0)  # "minivmm"


def test_a_recorded_cpuid_tool_output_is_a_host():
    """`cpuid -1 -r` as the real tool prints it (opening with "CPU:"), recorded on the
    development machine: a host, and printed back the same except the documented
    per-vCPU bits (APIC IDs) and the hypervisor leaves."""
    recorded = Path(__file__).parent / "data" / "cpuid-1-r.txt"
    out = minivmm_cli("cpuid", f"file:{recorded}", "--format", "raw")
    shown, real = parse_raw_lines(out.stdout), parse_raw_lines(recorded.read_text())
    differ = {key for key in real if shown.get(key) != real[key]}
    assert differ <= {(1, 0), (0x8000001E, 0)} | {k for k in real if k[0] in (0xB, 0x1F) or k[0] >> 28 == 4}
    assert shown[(1, 0)][2] == real[(1, 0)][2] | 1 << 31 and shown[(1, 0)][1] >> 24 == 0


@pytest.mark.skipif(not shutil.which("cpuid"), reason="the cpuid tool is not installed (apt install cpuid)")
def test_cpuid_native_diffs_against_the_real_tool_only_where_documented():
    mine = parse_raw_lines(minivmm_cli("cpuid", "native", "--format", "raw").stdout)
    real = parse_raw_lines(subprocess.run(["cpuid", "-1", "-r"], capture_output=True, text=True).stdout)
    differ = {key for key in mine.keys() & real.keys() if mine[key] != real[key]}
    # OSPKE (7.0:ECX[4]) mirrors CR4.PKE, which the machine's kernel may set and a guest's boot does not
    if (7, 0) in differ and mine[(7, 0)][2] ^ real[(7, 0)][2] == 1 << 4 and mine[(7, 0)][:2] == real[(7, 0)][:2] \
            and mine[(7, 0)][3] == real[(7, 0)][3]:
        differ.discard((7, 0))
    assert differ <= {(1, 0), (0x8000001E, 0)} | {k for k in real if k[0] in (0xB, 0x1F) or k[0] >> 28 == 4}
    assert len(mine.keys() & real.keys()) > 20


@pytest.mark.skipif(not shutil.which("cpuid"), reason="the cpuid tool is not installed (apt install cpuid)")
def test_a_captured_host_is_what_the_real_tool_reads_and_runs_guests(tmp_path):
    captured = tmp_path / "here.txt"
    done = minivmm_cli("profiles", "capture", str(captured))
    assert done.returncode == 0 and "--host file:" in done.stderr
    mine = parse_raw_lines(captured.read_text())
    real = parse_raw_lines(subprocess.run(["cpuid", "-1", "-r"], capture_output=True, text=True).stdout)
    differ = {key for key in mine.keys() & real.keys() if mine[key] != real[key]}
    assert differ <= {(1, 0), (0x8000001E, 0)} | {k for k in real if k[0] in (0xB, 0x1F)}   # the CPU it ran on
    assert len(mine.keys() & real.keys()) > 20 and mine[(0, 0)] == real[(0, 0)]
    assert minivmm_cli("profiles", "diff", f"file:{captured}", "native").returncode == 0
    assert minivmm_cli("run", "hello", "--host", f"file:{captured}").returncode == 0


def test_a_diff_of_two_hosts_names_the_drift_and_the_modes_each_runs():
    done = minivmm_cli("profiles", "diff", "penryn", "nehalem", "--json")
    data = json.loads(done.stdout)
    assert done.returncode == 1 and data["only_a"] == []
    assert {"popcnt", "sse4_2", "rdtscp"} <= set(data["only_b"])
    assert data["evc_a"] == ["intel-merom", "intel-penryn"] and "intel-nehalem" in data["evc_b"]
    same = minivmm_cli("profiles", "diff", "nehalem", "nehalem")
    assert same.returncode == 0 and "lacks: -" in same.stdout


@pytest.mark.parametrize("args", [[], ["mask"], ["evc"], ["snapshot"]])
def test_a_group_alone_prints_its_help(args):
    out = minivmm_cli(*args)
    assert out.returncode == 0 and out.stdout.startswith("Usage: minivmm") and "Commands:" in out.stdout


def _commands(group, path=()):
    import click
    for name, command in group.commands.items():
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


def test_help_on_a_command_three_ways_and_dash_h_everywhere():
    """"minivmm help COMMAND", "minivmm -h COMMAND" and "COMMAND -h" all print that
    command's help, for every command and every group's command."""
    from click.testing import CliRunner

    from minivmm.cli import cli
    runner = CliRunner()
    commands = list(_commands(cli))
    assert ("mask", "convert") in commands and ("help",) in commands
    for path in commands:
        expected = runner.invoke(cli, [*path, "--help"], prog_name="minivmm").output
        assert expected.startswith(f"Usage: minivmm {' '.join(path)} "), path
        for args in ([*path, "-h"], ["help", *path], ["-h", *path], ["--help", *path]):
            done = runner.invoke(cli, args, prog_name="minivmm")
            assert (done.exit_code, done.output) == (0, expected), args
    assert runner.invoke(cli, ["help"], prog_name="minivmm").output.startswith("Usage: minivmm [OPTIONS] COMMAND")
    for wrong in (["help", "nosuch"], ["help", "mask", "nosuch"], ["-h", "nosuch"]):
        done = minivmm_cli(*wrong)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "no command 'minivmm" in done.stderr


@pytest.mark.parametrize("command", ["convert", "lint", "msr", "explain"])
def test_dash_h_is_help_on_mask_commands_and_masks_stay_masks(command):
    out = minivmm_cli("mask", command, "-h")
    assert out.returncode == 0 and out.stdout.startswith(f"Usage: minivmm mask {command}")
    assert minivmm_cli("mask", "lint", "-shstk").stdout.startswith("no problems")


@pytest.mark.skipif(not shutil.which("gcc"), reason="gcc is not installed: cannot build a Linux program")
def test_where_a_linux_programs_system_calls_fall_to_choose_syscall_n():
    """The report's syscalls.where and run --syscalls: per name, in the order first
    called, the calls and the first and last, numbered as syscall:N counts (from 1, in
    the sample of calls in order); a point never reached says how many calls there were."""
    import re

    from minivmm.guests import shipped_guests_dir
    from minivmm.guests.toolchain import build_c
    program = str(build_c([shipped_guests_dir() / "linux" / "probe_popcnt.c"], cflags=("-mno-popcnt",), linux=True))
    syscalls = json.loads(minivmm_cli("run", program, "--json").stdout)["syscalls"]
    sample, where = syscalls["sample"], syscalls["where"]
    assert [p["name"] for p in where] == list(dict.fromkeys(sample)) and "write" in sample
    for p in where:
        assert sample[p["first"] - 1] == sample[p["last"] - 1] == p["name"] and sample.count(p["name"]) == p["calls"]
    assert sum(p["calls"] for p in where) == syscalls["total"] == len(sample)
    shown = minivmm_cli("run", program, "--syscalls", "--migrate", "penryn@syscall:100000")
    assert f"(the run ended first, after {syscalls['total']} system calls)" in shown.stderr
    assert f"minivmm: {syscalls['total']} system calls (syscall:N is right after call #N)" in shown.stderr
    write = next(p for p in where if p["name"] == "write")
    assert re.search(rf"^  write +{write['calls']}  #{write['first']}\.\.#{write['last']}$", shown.stderr, re.M)
    assert "not a Linux program" in minivmm_cli("run", "hello", "--syscalls").stderr
    assert json.loads(minivmm_cli("run", "hello", "--json").stdout)["syscalls"] is None
    at = minivmm_cli("matrix", "--help").stdout
    assert "syscall:N" in " ".join(at[at.index("--at"):at.index("--arg")].split())


def test_evc_list_reads_whole_at_80_columns_with_its_sources(monkeypatch):
    """Nothing cut ("intel-mer…"): every mode, parent, feature and source word whole, in
    80 columns; each source a real dump usable as a host, a QEMU model or VMware's page."""
    from minivmm.cpu.profiles import load_profile
    monkeypatch.setenv("COLUMNS", "80")
    shown = minivmm_cli("evc", "list").stdout
    assert "…" not in shown and max(map(len, shown.splitlines())) <= 80
    words = set(shown.replace("│", " ").split())
    modes = json.loads(minivmm_cli("evc", "list", "--json").stdout)
    for mode in modes:
        assert {mode["mode"], mode["parent"] or mode["mode"], f"{mode['confidence']}:", *mode["added"],
                *mode["source_name"].split()} <= words, mode["mode"]
    names = {m["mode"]: m["source_name"] for m in modes}
    assert (names["intel-merom"], names["intel-penryn"], names["amd-rev-e"]) == (
        "dump:Xeon-5110", "docs.vmware.com", "QEMU model Opteron_G1")
    assert load_profile(names["intel-merom"]).vendor == "intel"


def test_strategies_without_hypothesis_say_how_to_get_it():
    code = ("import sys; sys.modules['hypothesis'] = None\n"
            "try:\n    import minivmm.testing.strategies\n"
            "except ModuleNotFoundError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "pip install 'minivmm[hypothesis]'" in out.stdout


def test_the_report_schema_rejects_a_report_missing_a_key():
    """The negative control of the schema check every test's report goes through."""
    import jsonschema
    from conftest import report_validator
    report = json.loads(minivmm_cli("run", "hello", "--json").stdout)
    report_validator().validate(report)
    del report["stop"]["reason"]
    with pytest.raises(jsonschema.ValidationError):
        report_validator().validate(report)


def on_a_terminal(*args) -> tuple[int, bytes]:
    """The command line with stdout and stderr on one terminal: (exit status, what it shows)."""
    import os
    import pty
    controller, terminal = pty.openpty()
    done = subprocess.run([sys.executable, "-m", "minivmm", *args], stdin=subprocess.DEVNULL,
                          stdout=terminal, stderr=terminal, timeout=60)
    os.close(terminal)
    out = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return done.returncode, out


def test_on_a_terminal_the_stop_line_starts_a_line_of_its_own():
    """A console without a final newline (hello stopped after 10 instructions prints "H")
    is not glued to the stop line when both go to one terminal; pipes get the bytes as
    they are."""
    status, shown = on_a_terminal("run", "hello", "--max-insns", "10")
    assert status == 124
    assert b"H\r\nminivmm: limit:" in shown
    piped = minivmm_cli("run", "hello", "--max-insns", "10")
    assert piped.stdout == "H" and piped.stderr.startswith("minivmm: limit:")


@pytest.mark.skipif(not shutil.which("gcc"), reason="gcc is not installed: cannot build a Linux program")
def test_a_linux_programs_stderr_without_a_newline_is_not_glued_to_the_stop_line(tmp_path):
    """minivmm's lines follow the program's standard error on stderr: they start a line of
    their own there, on a terminal or not; the console keeps its bytes in a pipe."""
    from minivmm.guests.toolchain import build_c
    source = tmp_path / "partial.c"
    source.write_text('#include <stdio.h>\nint main(void) { fputs("partial", stdout); fputs("oops", stderr); '
                      'return 3; }\n')
    program = str(build_c([source], linux=True))
    piped = minivmm_cli("run", program)
    assert piped.returncode == 3 and piped.stdout == "partial"
    assert piped.stderr.startswith("oops\nminivmm: exited:"), piped.stderr
    status, shown = on_a_terminal("run", program)
    assert status == 3 and shown.startswith(b"partial\r\noops\r\nminivmm: exited:"), shown
