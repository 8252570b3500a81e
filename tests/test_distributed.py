"""Matrix runs on Dask: a real `dask scheduler` and two `dask worker`s started here on
loopback, and a LocalCluster. The `--jobs 1` run of the same cells is the oracle: the
same cells, in the same order, with the same outcomes."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
from helpers import minivmm_cli, one_line_error

from minivmm.guests import shipped_guests_dir
from minivmm.testing.distributed import INSTALL

distributed = pytest.importorskip("distributed", reason=f"Dask is not installed ({INSTALL})")
GUESTS = ("detect_cpuid", "detect_ud", "dispatch_cpuid")   # three shipped guests over the 19 hosts: 57 cells
KILLER = Path(__file__).parent / "data" / "dask" / "kills_its_worker.py"


def comparable(report: dict) -> dict:
    """A report without what differs between any two runs: how long each cell took."""
    return {"summary": report["summary"],
            "cells": [{k: v for k, v in cell.items() if k != "seconds"} for cell in report["cells"]]}


def junit_cases(xml: str) -> list:
    """Each test case's name, class, result and output (not its time)."""
    cases = ET.fromstring(xml).iter("testcase")
    return [(c.get("classname"), c.get("name"),
             [(child.tag, child.get("message"), child.text) for child in c]) for c in cases]


def matrix(tmp_path, *options, guests=GUESTS, hosts="all", timeout=240):
    report, junit = tmp_path / "report.json", tmp_path / "junit.xml"
    done = minivmm_cli("matrix", *guests, "--hosts", hosts, "--report", str(report), "--junit", str(junit),
                       *options, "--json", timeout=timeout)
    assert done.returncode in (0, 1), done.stderr
    return json.loads(report.read_text()), junit.read_text()


class Cluster:
    """A `dask scheduler` and ``workers`` `dask worker` processes on loopback."""

    def __init__(self, workers: int, env=None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.address = f"tcp://127.0.0.1:{port}"
        env = {**os.environ, **(env or {})}
        dask = [sys.executable, "-m", "dask"]
        self.scheduler = subprocess.Popen([*dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                           "--no-dashboard"], env=env, stderr=subprocess.DEVNULL,
                                          start_new_session=True)
        self.workers = [subprocess.Popen([*dask, "worker", self.address, "--nworkers", "1", "--nthreads", "1",
                                          "--no-dashboard", "--preload", str(KILLER), "--death-timeout", "60"],
                                         env=env, stderr=subprocess.DEVNULL, start_new_session=True)
                        for _ in range(workers)]
        with distributed.Client(self.address, timeout="60s") as client:
            client.wait_for_workers(workers, timeout=120)

    def close(self) -> None:
        for process in [*self.workers, self.scheduler]:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return matrix(tmp_path_factory.mktemp("jobs1"), "--jobs", "1")


@pytest.fixture(scope="module")
def cluster():
    running = Cluster(2)
    yield running
    running.close()


def test_a_cluster_of_two_workers_gives_what_jobs_1_gives(reference, cluster, tmp_path):
    report, junit = matrix(tmp_path, "--scheduler", cluster.address)
    assert len(report["cells"]) == 57 and report["summary"]["passed"] > 0
    assert comparable(report) == comparable(reference[0])
    assert junit_cases(junit) == junit_cases(reference[1])
    assert report["distributed"] == {"scheduler": cluster.address, "workers": 2, "retries": 0}


def test_a_local_cluster_gives_what_jobs_1_gives(reference, tmp_path):
    report, junit = matrix(tmp_path, "--scheduler", "local:2")
    assert comparable(report) == comparable(reference[0]) and junit_cases(junit) == junit_cases(reference[1])
    assert report["distributed"]["workers"] == 2


def test_a_worker_killed_mid_run_loses_no_cell(reference, tmp_path):
    doomed = Cluster(2)
    try:
        report_file = tmp_path / "report.json"
        run = subprocess.Popen([sys.executable, "-m", "minivmm", "matrix", *GUESTS, "--hosts", "all", "--scheduler",
                                doomed.address, "--report", str(report_file), "--json"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        with distributed.Client(doomed.address, timeout="30s") as watcher:
            victim = None
            while victim is None and run.poll() is None:   # a worker in the middle of a cell
                busy = [worker for worker, keys in watcher.processing().items()
                        if any(str(key).startswith("minivmm-cell-") for key in keys)]
                victim = busy[0] if busy else time.sleep(0.05)
            assert victim is not None, "the run ended before a worker could be killed"
            os.killpg(os.getpgid(watcher.run(os.getpid, workers=[victim])[victim]), signal.SIGKILL)
        _, stderr = run.communicate(timeout=240)
        assert run.returncode in (0, 1), stderr
    finally:
        doomed.close()
    report = json.loads(report_file.read_text())
    assert comparable(report) == comparable(reference[0])
    assert report["distributed"]["retries"] >= 1 and report["distributed"]["workers"] == 1


def test_a_cell_that_kills_every_worker_fails_and_the_run_finishes(tmp_path):
    killer = tmp_path / "kills-its-worker.asm"
    killer.write_text((shipped_guests_dir() / "detect_cpuid.asm").read_text())
    harsh = Cluster(2, env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"})
    try:
        report, _ = matrix(tmp_path, "--scheduler", harsh.address, guests=("detect_cpuid", str(killer)),
                           hosts="penryn")
    finally:
        harsh.close()
    by_guest = {cell["guest"]: cell for cell in report["cells"]}
    assert by_guest["detect_cpuid"]["status"] == "passed"
    assert by_guest[str(killer)]["status"] == "failed"
    assert "killed every worker it ran on" in by_guest[str(killer)]["message"]
    assert report["distributed"]["retries"] >= 1


def test_a_linux_program_runs_as_it_would_here(tmp_path, cluster):
    """Its path is part of what it sees ($0, /proc/self/exe): it runs from the worker's
    own file, the same by SHA-256, as under --jobs."""
    options = ["--mount", "/", "--arg", "-c", "--arg", "echo $0; readlink /proc/self/exe"]
    (tmp_path / "here").mkdir()
    (tmp_path / "there").mkdir()
    here, _ = matrix(tmp_path / "here", "--jobs", "1", *options, guests=("/bin/sh",), hosts="penryn")
    there, _ = matrix(tmp_path / "there", "--scheduler", cluster.address, *options, guests=("/bin/sh",),
                      hosts="penryn")
    assert comparable(there) == comparable(here) and here["cells"][0]["console"] == "/bin/sh\n/bin/sh\n"


def test_a_scheduler_that_is_not_one_is_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = minivmm_cli("matrix", "detect_cpuid", "--hosts", "penryn", "--scheduler", f"tcp://127.0.0.1:{port}",
                       timeout=60)
    assert one_line_error(done) and "no Dask scheduler answers there" in done.stderr
    done = minivmm_cli("matrix", "detect_cpuid", "--scheduler", "local:zero")
    assert one_line_error(done) and "not local:N" in done.stderr
    with socket.create_server(("127.0.0.1", 0)) as impostor:   # answers Dask's handshake with junk
        def junk():
            peer, _ = impostor.accept()
            peer.sendall(b"\xff" * 64)
            time.sleep(5)
            peer.close()
        threading.Thread(target=junk, daemon=True).start()
        done = minivmm_cli("matrix", "detect_cpuid", "--hosts", "penryn", "--scheduler",
                           f"tcp://127.0.0.1:{impostor.getsockname()[1]}", timeout=60)
    assert one_line_error(done) and "no Dask scheduler answers there" in done.stderr
