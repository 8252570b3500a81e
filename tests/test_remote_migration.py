"""vMotion between minivmm processes: `minivmm receive` in one process, `run --migrate
tcp:ADDR:PORT@WHEN` in another, on loopback. The run that never moved is the oracle:
whatever goes wrong before the handover, the VM finishes at its source with exactly
its console and status."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from helpers import one_line_error

from minivmm.vmm import wire
from minivmm.vmm.migration import PreCopy
from minivmm.vmm.vm import VM

SECRET = b"the cluster's shared secret, 40 bytes.."
# The pair of the EVC story, on a Nehalem under the Penryn baseline (POPCNT hidden):
CPUID_GUIDED = """
    mov eax, 1
    cpuid
    mov edx, ecx
    out 0xf5, al                     ; checkpoint 1: the VM may move here
    mov ecx, 1000000                 ; work enough that pre-copy ends before the guest does
spin:
    dec ecx
    jnz spin
    bt edx, 23                       ; popcnt, asked properly: hidden under intel-penryn
    jc fast
    mov al, 0x11                     ; the generic path
    out 0xf4, al
fast:
    mov ebx, 0xff
    popcnt eax, ebx
    out 0xf4, al
"""
PROBING = """
    mov ebx, 0xff
    popcnt eax, ebx                  ; the probe: it ran, so the guest takes popcnt as there
    out 0xf5, al                     ; checkpoint 1
    mov ecx, 1000000
spin:
    dec ecx
    jnz spin
    popcnt eax, ebx
    out 0xf4, al                     ; powers off with 8
"""
TWO_POINTS = """
    out 0xf5, al                     ; checkpoint 1
    mov ecx, 1000000
spin:
    dec ecx
    jnz spin
    out 0xf5, al                     ; checkpoint 2
    mov ecx, 1000000
again:
    dec ecx
    jnz again
    mov al, 0x2a
    out 0xf4, al
"""


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "secret.key"
    path.write_bytes(SECRET + b"\n")
    return str(path)


class Receiver:
    """`minivmm receive` on a free loopback port."""

    def __init__(self, host: str, secret_file: str, *options):
        self.process = subprocess.Popen([sys.executable, "-m", "minivmm", "receive", "--listen", "127.0.0.1:0",
                                         "--host", host, "--secret-file", secret_file, *options],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = self.process.stderr.readline()
        assert "receiving VMs on 127.0.0.1:" in first, first + self.process.stderr.read()
        self.address = first.split(" on ")[1].split()[0]

    def finish(self, timeout=60) -> tuple[int, str, str]:
        out, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, out, err

    def kill(self) -> str:
        self.process.kill()
        return self.process.communicate()[1]


def run_to(guest, destination: str, secret=SECRET, **options):
    return VM(guest, "nehalem", evc="intel-penryn").run(migrations=[f"{destination}@checkpoint:1"], secret=secret,
                                                         timeout=60, **options)


@pytest.mark.parametrize("precopy", [PreCopy(), PreCopy(enabled=False)], ids=["live", "stop-and-copy"])
def test_the_cpuid_guided_guest_finishes_at_the_destination(asm_guest, secret_file, precopy):
    guest = asm_guest(CPUID_GUIDED)
    alone = VM(guest, "nehalem", evc="intel-penryn").run(timeout=60)
    receiver = Receiver("penryn", secret_file, "--once", "--json")
    moved = run_to(guest, f"tcp:{receiver.address}", precopy=precopy)
    status, out, err = receiver.finish()
    record = moved.migrations[0]
    assert record["ok"] and moved.stop.reason == "migrated" and moved.exit_code == 0, (record, err)
    assert record["mode"] == ("pre-copy" if precopy.enabled else "stop-and-copy") and record["downtime_ms"] > 0
    there = json.loads(out)
    assert status == alone.exit_code == 0x11 and there["hosts"] == ["nehalem", "penryn"]
    assert there["stop"] == alone.to_dict()["stop"] | {"rip": there["stop"]["rip"]}


def test_the_probing_guest_dies_at_the_destination_of_ud_naming_popcnt(asm_guest, secret_file):
    guest = asm_guest(PROBING)
    receiver = Receiver("penryn", secret_file, "--once", "--json")
    moved = run_to(guest, f"tcp:{receiver.address}")
    status, out, _ = receiver.finish()
    assert moved.migrations[0]["ok"] and moved.exit_code == 0
    stop = json.loads(out)["stop"]
    assert status == 125 and stop["reason"] == "crashed" and stop["vector"] == 6
    assert stop["missing_features"] == ["popcnt"]


def test_a_vm_moves_on_to_a_third_receiver(asm_guest, secret_file):
    guest = asm_guest(TWO_POINTS)
    last = Receiver("westmere", secret_file, "--once", "--json")
    middle = Receiver("penryn", secret_file, "--once", "--migrate", f"tcp:{last.address}@checkpoint:2",
                      "--secret-file", secret_file)
    first = run_to(guest, f"tcp:{middle.address}")
    status_middle, _, err_middle = middle.finish()
    status, out, _ = last.finish()
    assert first.migrations[0]["ok"] and status_middle == 0, err_middle
    assert "migrated penryn -> tcp:" in err_middle
    assert status == 0x2a and json.loads(out)["hosts"] == ["nehalem", "penryn", "westmere"]


def test_a_receiver_that_cannot_run_the_view_refuses_and_the_vm_finishes_at_its_source(asm_guest, secret_file):
    guest = asm_guest(CPUID_GUIDED)
    alone = VM(guest, "nehalem", evc="intel-penryn").run(timeout=60)
    receiver = Receiver("core2", secret_file)
    stayed = run_to(guest, f"tcp:{receiver.address}")
    err = receiver.kill()
    record = stayed.migrations[0]
    assert not record["ok"] and record["refused"] and "core2 cannot run EVC mode intel-penryn" in record["reason"]
    assert "the VM stays on nehalem" in record["reason"] and "refused a migration from" in err
    assert (stayed.console, stayed.exit_code) == (alone.console, alone.exit_code)


def test_a_wrong_secret_is_refused_on_both_sides_and_the_vm_finishes_at_its_source(asm_guest, secret_file):
    guest = asm_guest(CPUID_GUIDED)
    alone = VM(guest, "nehalem", evc="intel-penryn").run(timeout=60)
    receiver = Receiver("penryn", secret_file)
    stayed = run_to(guest, f"tcp:{receiver.address}", secret=b"not the secret at all, but long")
    err = receiver.kill()
    assert "different secrets" in stayed.migrations[0]["reason"] and "does not know the secret" in err
    assert (stayed.console, stayed.exit_code) == (alone.console, alone.exit_code)


def fake_receiver(how: str) -> tuple[str, threading.Thread]:
    """A receiver that speaks the protocol and breaks it as ``how`` says: its process
    killed during pre-copy (the socket closed under the source), or the connection
    closed in the middle of a page."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        sock, _ = server.accept()
        channel = wire.Channel(sock, "source", is_source=False)
        channel.greet(SECRET)
        channel.receive(wire.OFFER)
        channel.send(wire.ACCEPT)
        if how == "mid-page":
            channel.deadline = time.monotonic() + 30
            channel._exactly(wire.HEADER.size + 6 + 4 + 100)   # a header and 100 bytes of the first page
        else:
            channel.receive(wire.PAGES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")   # as a killed process's: RST
        sock.close()
        server.close()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"127.0.0.1:{server.getsockname()[1]}", thread


@pytest.mark.parametrize("how", ["killed during pre-copy", "mid-page"])
def test_a_receiver_lost_mid_move_leaves_the_vm_finishing_at_its_source(how):
    alone = VM("dirty_loop", "nehalem").run(timeout=3)
    address, thread = fake_receiver(how)
    stayed = VM("dirty_loop", "nehalem").run(migrations=[f"tcp:{address}@checkpoint:1"], secret=SECRET, timeout=3)
    thread.join(10)
    record = stayed.migrations[0]
    assert not record["ok"] and "the VM stays on nehalem" in record["reason"], record
    assert (stayed.console, stayed.stop.reason, stayed.host) == (alone.console, alone.stop.reason, "nehalem")


def test_a_migration_over_tcp_without_a_secret_is_one_line():
    done = subprocess.run([sys.executable, "-m", "minivmm", "run", "hello", "--migrate", "tcp:127.0.0.1:9@checkpoint:1"],
                          capture_output=True, text=True, timeout=60)
    assert one_line_error(done) and "needs the receiver's shared secret" in done.stderr


def test_a_short_secret_is_one_line(tmp_path):
    short = tmp_path / "short.key"
    short.write_text("tiny\n")
    done = subprocess.run([sys.executable, "-m", "minivmm", "receive", "--listen", "127.0.0.1:0", "--host", "penryn",
                           "--secret-file", str(short)], capture_output=True, text=True, timeout=60)
    assert one_line_error(done) and "a secret has at least 16" in done.stderr


def test_the_receiver_stays_up_after_a_peer_that_is_not_minivmm(secret_file, asm_guest):
    receiver = Receiver("penryn", secret_file, "--once", "--json")
    host, port = receiver.address.rsplit(":", 1)
    for junk in (b"", b"GET / HTTP/1.0\r\n\r\n", os.urandom(4096)):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(junk)
    moved = run_to(asm_guest(CPUID_GUIDED), f"tcp:{receiver.address}")
    status, _, err = receiver.finish()
    assert moved.migrations[0]["ok"] and status == 0x11
    assert err.count("refused a migration from") == 3


def test_peers_that_say_nothing_hold_up_no_migration(asm_guest, secret_file):
    receiver = Receiver("penryn", secret_file, "--once", "--json")
    host, port = receiver.address.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(3)]
    try:
        moved = run_to(asm_guest(CPUID_GUIDED), f"tcp:{receiver.address}")
        status, _, _ = receiver.finish()
    finally:
        for sock in idle:
            sock.close()
    assert moved.migrations[0]["ok"] and status == 0x11


def test_what_an_unauthenticated_peer_says_is_shown_as_such_and_escaped(secret_file):
    receiver = Receiver("penryn", secret_file)
    host, port = receiver.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        said = b"x\nminivmm: a VM arrived from 10.0.0.9:4444: /bin/evil"
        sock.sendall(wire.HEADER.pack(wire.REFUSE, len(said)) + said)
        sock.recv(100)
    time.sleep(1)
    err = receiver.kill()
    assert "(not authenticated) refused: x\\x0aminivmm: a VM arrived" in err
    assert not any(line.startswith("minivmm: a VM arrived") for line in err.splitlines())


def test_a_state_whose_processes_do_not_hold_together_is_refused_before_use(tmp_path):
    from minivmm.cpu.profiles import load_profile
    from minivmm.vmm import snapshot as snapshot_mod
    from minivmm.vmm.remote import Destination
    path = tmp_path / "vm.snap"
    VM("dispatch_cpuid", "penryn").run(snapshot_at="checkpoint:1", snapshot_file=str(path), timeout=30)
    snap = snapshot_mod.load(str(path))
    offer = {"meta": snap.meta, "cpuid": snap.cpuid}
    destination = Destination(load_profile("penryn"), None, SECRET, lambda s: VM.resume(s, "penryn"))
    for process in ({"machine": []}, {"tid": [1]}, {"machine": {"processes": 5}}):
        state = wire.pack_state({"meta": snap.meta, "regs": snap.regs, "cpuid": snap.cpuid, "process": process}, b"")
        with pytest.raises(wire.ProtocolError, match="the VM's process state"):
            destination._snapshot(offer, state, {}, snap.meta["memory"])
