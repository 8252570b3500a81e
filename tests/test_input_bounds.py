"""No input reaches past what it was given: a snapshot gets only the mounts its resume
grants, every field of a snapshot has the bound of what minivmm writes there, a small
file costs little memory whatever the reader's limit, a guest choosing CPUID subleaves
cannot grow the VMM or its report, and numbers are ASCII digits."""

import base64
import json
import os
import resource
import subprocess
import sys

import pytest
from helpers import measured_cli, minivmm_cli, one_line_error

from minivmm.errors import MinivmmError
from minivmm.guests import shipped_guests_dir
from minivmm.guests.toolchain import build_c
from minivmm.linux.files import identity
from minivmm.vmm import snapshot as snapshot_mod
from minivmm.vmm.exits.io import CONSOLE_KEPT
from minivmm.vmm.vm import VM, parse_size

LINES = "".join(f"line {i:03d} of the mounted file\n" for i in range(40))


@pytest.fixture(scope="module")
def rounds():
    try:
        return str(build_c([shipped_guests_dir().joinpath("linux", "rounds.c")], linux=True))
    except MinivmmError as e:
        pytest.skip(f"cannot build a Linux program: {e}")


@pytest.fixture
def saved(rounds, tmp_path):
    """rounds saved between two reads of /in/data.txt (tmp_path/in mounted at /in):
    (the snapshot, the folder, its --mount)."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "data.txt").write_text(LINES)
    snap = tmp_path / "mid.snap"
    VM(rounds, "nehalem", memory="32M", mounts=[f"{folder}:/in"], argv=["/in/data.txt"]).run(
        snapshot_at="syscall:22", snapshot_file=str(snap), timeout=60)  # small RAM: rewriting it is cheap
    return snap, folder, f"{folder}:/in"


def _rewritten(snap, out, process=None, meta=None, console=None) -> str:
    """``snap`` with its process state, metadata or console changed: valid checksums,
    lying contents."""
    good = snapshot_mod.load(str(snap))
    memory = bytearray(good.meta["memory"])
    good.load_memory(memory)
    bad = snapshot_mod.Snapshot(meta or good.meta, good.regs, good.cpuid, good.console if console is None else console,
                                bytes(memory), process=process(json.loads(json.dumps(good.process))) if process
                                else good.process)
    out.write_bytes(bad.to_bytes())
    return str(out)


def _set(path, value):
    """A change of one field of a process state (``path``: keys down to it)."""
    def change(state):
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value(target) if callable(value) else value
        return state
    return change


# ---- a snapshot gets only what its resume grants -------------------------------------------

def _open_secret(secret, mounts):
    def change(state):
        state["mounts"] = mounts
        state["files"]["3"].update(path=str(secret), host=str(secret), offset=0, **identity(os.stat(secret)))
        return state
    return change


@pytest.mark.parametrize("mounts, needs", [([["/", "/"]], "/"), ([], "{secret}")])
def test_a_snapshot_reads_no_file_its_resume_did_not_grant(saved, tmp_path, mounts, needs):
    """Its own mounts and an fd naming any file of the machine: refused, naming the
    --mount it would need, and the file's bytes never reach the console."""
    snap, _, grant = saved
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET, never mounted\n")
    hostile = _rewritten(snap, tmp_path / "hostile.snap", process=_open_secret(secret, mounts))
    done = minivmm_cli("resume", hostile, "--mount", grant)
    assert one_line_error(done) and "SECRET" not in done.stdout
    assert f"hostile.snap needs --mount {needs.format(secret=secret)} (its open file {secret})" in done.stderr


@pytest.mark.parametrize("grant, resumes", [(None, False), ("{folder}:/in", True), ("{tmp}:/", True),
                                            ("{tmp}:/in", False), ("{folder}:/data", False)])
def test_resume_mount_grants_as_run_does(saved, tmp_path, grant, resumes):
    """The same bind or a wider one resumes; none, or one showing another folder at
    /in, is refused naming exactly the --mount to give."""
    snap, folder, spec = saved
    args = ("--mount", grant.format(folder=folder, tmp=tmp_path)) if grant else ()
    done = minivmm_cli("resume", str(snap), *args)
    if resumes:
        assert done.returncode != 2 and done.stdout.count("round") == 6, done.stderr
    else:
        assert one_line_error(done) and f"needs --mount {spec} (its open file /in/data.txt)" in done.stderr


def test_the_api_grants_mounts_as_the_command_line_does(saved):
    snap, folder, spec = saved
    with pytest.raises(MinivmmError, match=r"needs --mount .*:/in \(its open file /in/data.txt\)"):
        VM.resume(snapshot_mod.load(str(snap)))
    result = VM.resume(snapshot_mod.load(str(snap)), mounts=[spec]).run(timeout=60)
    assert result.stop.reason == "exited" and result.console.count("round") == 8


def test_inspect_says_which_mounts_a_resume_needs(saved):
    snap, _, spec = saved
    assert f"mounts: {spec}" in minivmm_cli("snapshot", "inspect", str(snap)).stdout


def test_a_file_changed_with_its_size_and_mtime_set_back_is_refused(saved):
    snap, folder, spec = saved
    data = folder / "data.txt"
    before = os.stat(data)
    data.write_text(LINES.upper())
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (os.stat(data).st_size, os.stat(data).st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    done = minivmm_cli("resume", str(snap), "--mount", spec)
    assert one_line_error(done) and "/in/data.txt (fd 3) changed since the snapshot was taken: ctime_ns" in done.stderr


@pytest.mark.parametrize("kind, says", [
    ("Directory", "it was of kind Directory, it opens as HostFile"),
    ("Device", "it was of kind Device, it opens as HostFile"),
    ("directory", "descriptor 3 is of kind 'directory', not one of"),
    (["HostFile"], "descriptor 3 is of kind (not a name)"),
])
def test_a_descriptor_of_another_or_unknown_kind_is_one_line(saved, tmp_path, kind, says):
    snap, _, spec = saved
    hostile = _rewritten(snap, tmp_path / "kind.snap", process=_set(["files", "3", "kind"], kind))
    done = minivmm_cli("resume", hostile, "--mount", spec)
    assert one_line_error(done) and says in done.stderr, done.stderr


# ---- every field has the bound of what minivmm writes -------------------------------------------

HOSTILE_PROCESS = {
    "200000 descriptors": (_set(["files"], lambda _: {str(fd): {"same_as": 0} if fd else {
        "kind": "Stream", "path": "/dev/stdin", "flags": 0, "offset": 0} for fd in range(200_000)}),
        "section 'process' holds more lists, objects or values"),
    "17 MiB of stderr": (_set(["stderr"], base64.b64encode(bytes(17 << 20)).decode()), "stderr is not base64"),
    "a million cloexec": (_set(["cloexec"], [0] * 1_000_000), "cloexec is not a list"),
    "3 MB of argv": (_set(["argv"], ["x" * 1_000_000] * 3), "argv is not a list of strings within"),
    "a 5000-byte mapping name": (_set(["maps", 0, 3], "x" * 5000), "maps is not a list"),
    "1001 mounts": (_set(["mounts"], [["/", "/"]] * 1001), "mounts is not a list of at most 1000"),
    "an unknown call in the sample": (_set(["stats", "sample", 0], "x" * 100_000), "stats are malformed"),
    "fd '٣'": (_set(["files", "٣"], {"same_as": 0}), "files is not a table"),
    "fd '03'": (_set(["files", "03"], {"same_as": 0}), "files is not a table"),
    "a 5000-byte exe": (_set(["exe"], "/" * 5000), "exe is not a path"),
    "a MemoryFile without its contents": (_set(["files", "3", "kind"], "MemoryFile"), "descriptor 3 lacks"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_PROCESS))
def test_a_process_section_past_minivmm_s_bounds_is_one_line_in_bounded_memory(saved, tmp_path, name):
    change, says = HOSTILE_PROCESS[name]
    snap, _, spec = saved
    done, rss, _ = measured_cli("resume", _rewritten(snap, tmp_path / "h.snap", process=change), "--mount", spec)
    assert one_line_error(done) and says in done.stderr, done.stderr
    assert rss < 200, rss  # about 50 MiB idle; the file itself is at most 25 MB


@pytest.fixture(scope="module")
def abi_snapshot(tmp_path_factory):
    path = tmp_path_factory.mktemp("snap") / "vm.snap"
    VM("dispatch_cpuid", "penryn").run(snapshot_at="checkpoint:1", snapshot_file=str(path), timeout=60)
    return path


@pytest.mark.parametrize("key", ["xcr0", "guest", "host", "entry", "masks", "policy", "checkpoints", "hosts"])
def test_a_missing_metadata_field_is_one_line(abi_snapshot, tmp_path, key):
    meta = {k: v for k, v in snapshot_mod.load(str(abi_snapshot)).meta.items() if k != key}
    done = minivmm_cli("resume", _rewritten(abi_snapshot, tmp_path / "m.snap", meta=meta))
    assert one_line_error(done) and f"meta.{key} is missing" in done.stderr, done.stderr


@pytest.mark.parametrize("change, says", [
    ({"hosts": ["penryn"] * (snapshot_mod.MAX_HOSTS + 1)}, "meta.hosts must be a list of at most"),
    ({"guest": "g" * (snapshot_mod.MAX_NAME + 1)}, "meta.guest is longer than"),
    ({"masks": ["-sse4_1"] * 257}, "meta.masks must be a list of at most 256"),
])
def test_metadata_past_minivmm_s_bounds_is_refused(abi_snapshot, tmp_path, change, says):
    meta = {**snapshot_mod.load(str(abi_snapshot)).meta, **change}
    done = minivmm_cli("resume", _rewritten(abi_snapshot, tmp_path / "m.snap", meta=meta))
    assert one_line_error(done) and says in done.stderr, done.stderr


def test_resume_on_an_empty_host_name_is_refused(abi_snapshot):
    done = minivmm_cli("resume", str(abi_snapshot), "--host", "")
    assert one_line_error(done) and "unknown host profile ''" in done.stderr


def test_a_mask_template_stored_by_content_resumes_whatever_its_length(tmp_path):
    """A template is kept in the snapshot as its JSON: up to the template's own 1 MiB."""
    leaves = [{"leaf": hex(0x40000010 + i), "subleaf": "0x0", "flags": 0,
               "modifiers": [{"register": "eax", "bitmap": "0b" + "x" * 32}]} for i in range(100)]
    leaves.append({"leaf": "0x1", "subleaf": "0x0", "flags": 0,
                   "modifiers": [{"register": "ecx", "bitmap": "0b" + "x" * 12 + "0" + "x" * 19}]})
    template = tmp_path / "long.json"
    template.write_text(json.dumps({"cpuid_modifiers": leaves}))
    snap = tmp_path / "vm.snap"
    VM("dispatch_cpuid", "penryn", masks=[str(template)]).run(snapshot_at="checkpoint:1", snapshot_file=str(snap),
                                                               timeout=60)
    assert len(snapshot_mod.load(str(snap)).meta["masks"][0]) > 4096
    done = minivmm_cli("resume", str(snap))
    assert done.returncode == 0 and "path: sse2" in done.stdout, done.stderr


def test_a_console_longer_than_the_console_keeps_is_refused(abi_snapshot, tmp_path):
    done = minivmm_cli("resume", _rewritten(abi_snapshot, tmp_path / "c.snap", console=bytes(CONSOLE_KEPT + 1)))
    assert one_line_error(done) and "section 'console' claims" in done.stderr


def test_minivmm_saves_no_snapshot_it_would_refuse(abi_snapshot, tmp_path):
    good = snapshot_mod.load(str(abi_snapshot))
    memory = bytearray(good.meta["memory"])
    good.load_memory(memory)
    meta = {**good.meta, "hosts": ["penryn"] * (snapshot_mod.MAX_HOSTS + 1)}
    too_far = snapshot_mod.Snapshot(meta, good.regs, good.cpuid, good.console, bytes(memory))
    with pytest.raises(MinivmmError, match="cannot save a snapshot to .*meta.hosts"):
        snapshot_mod.save(too_far, str(tmp_path / "out.snap"))
    assert not (tmp_path / "out.snap").exists()


# ---- a small file is cheap to read whatever the limit ---------------------------------------------

def test_a_small_snapshot_reads_in_little_address_space(abi_snapshot):
    """The snapshot reader's limit is 4 GiB and more: reading a 4 KB file must not
    allocate it (ulimit -v below the limit)."""
    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))

    assert snapshot_mod.MAX_FILE > 1 << 30 and abi_snapshot.stat().st_size < 64 << 10
    done = subprocess.run([sys.executable, "-m", "minivmm", "snapshot", "inspect", str(abi_snapshot)],
                          capture_output=True, text=True, preexec_fn=limited, timeout=60)
    assert done.returncode == 0 and "memory: 16 MiB" in done.stdout, done.stderr


# ---- a guest cannot grow the CPUID counts ---------------------------------------------------------

def test_a_storm_over_cpuid_subleaves_keeps_1000_counts_and_says_how_many_exits_it_left_out(asm_guest):
    """Leaf 4 with ECX counting up: each exit a new (leaf, subleaf)."""
    from conftest import report_validator
    guest = asm_guest("l: mov eax, 4\nmov ecx, r8d\ncpuid\ninc r8d\njmp l\n")
    done, rss, _ = measured_cli("run", guest, "--json", "--timeout", "3")
    report = json.loads(done.stdout)
    report_validator().validate(report)
    counts, truncated = report["cpuid_exit_counts"], report["truncated"]
    exits = len(report["cpuid_exits"]) + truncated["cpuid_exits"]
    assert len(counts) == 1000 and truncated["cpuid_exit_counts"] > 0
    assert sum(c["count"] for c in counts) + truncated["cpuid_exit_counts"] == exits
    assert len(done.stdout) < 4 << 20 and rss < 300, (len(done.stdout), rss)


# ---- numbers are ASCII digits, and an empty value is no value -------------------------------------

@pytest.mark.parametrize("args", [
    ["run", "hello", "--memory", ""], ["run", "hello", "--memory", "16 M"], ["run", "hello", "--memory", "１６M"],
    ["run", "hello", "--memory", "١٦M"], ["run", "hello", "--evc", ""], ["run", "hello", "--cpuid-mask=0x1:ecx=0b"],
    ["run", "hello", "--cpuid-mask", "{}"], ["run", "hello", "--cpuid-mask=0x١:ecx=0b0"],
    ["run", "hello", "--cpuid-mask=1_0:ecx=0b0"], ["run", "hello", "--cpuid-mask=١:ecx=" + "x" * 32],
    ["run", "hello", "--cpuid-mask", '{"cpuid_modifiers": [{"leaf": "0x١", "modifiers": []}]}'],
    ["run", "hello", "--max-insns", "１０"], ["run", "hello", "--timeout", "٣"], ["run", "hello", "--seed", "٣"],
    ["run", "hello", "--migrate", "penryn@checkpoint:١"], ["cpuid", "nehalem", "--evc", ""],
    ["mask", "lint", "-sse4_1", "--host", ""],
    ["compare", "hello", "--hosts", "core2", "--migrate-to", ""],
    ["matrix", "hello", "--hosts", "core2", "--jobs", "٢"],
])
def test_values_python_alone_would_read_are_one_line_errors(args):
    assert one_line_error(minivmm_cli(*args))


@pytest.mark.parametrize("text", ["16 M", " 16M", "１６M", "١٦M"])
def test_parse_size_reads_ascii_digits_only(text):
    with pytest.raises(MinivmmError, match="malformed size"):
        parse_size(text)
