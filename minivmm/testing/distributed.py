"""Matrix cells as Dask tasks, on a cluster (``tcp://ADDR:PORT``: a ``dask scheduler``
and its ``dask worker``s) or on a LocalCluster of N worker processes (``local:N``).

Dask is an extra (``pip install 'minivmm[distributed]'``): its scheduler places the
cells, moves a cell whose worker died to another (the scheduler's own retries, up to
its ``distributed.scheduler.allowed-failures``), and past that reports the cell failed
with KilledWorker, while the run goes on. What travels with a cell is its content, not
its paths: a guest file goes as its bytes (shipped guests by name), so a worker needs
only ``pip install minivmm``. A Linux program is the exception: its path is what it
is (argv[0], /proc/self/exe) and its ``--mount``s name the worker's own files, so it
runs where the worker has the same file (by SHA-256) and every mount; a worker without
them refuses the cell in one line. A cell's outcome is the one ``--jobs`` gives,
wherever it ran, and the outcomes come back in cell order.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import CancelledError
from pathlib import Path

from ..errors import MinivmmError
from ..files import read_bytes
from ..guests import shipped_guests_dir
from ..guests.loader import MAX_IMAGE, find_guest, load_guest
from .matrix import Cell, Outcome, run_cell

INSTALL = "pip install 'minivmm[distributed]'"
LOCAL = re.compile(r"local:([1-9][0-9]{0,2})")
CONNECT_SECONDS = 10


def check_scheduler(text: str) -> str:
    """``local:N`` (1 to 999 workers) or ``tcp://HOST:PORT``, else one line."""
    remote = re.fullmatch(r"tcp://[^\s/:]+:([0-9]{1,5})", text)
    if LOCAL.fullmatch(text) or remote and 0 < int(remote.group(1)) < 65536:
        return text
    raise MinivmmError(f"--scheduler {text!r}: not local:N (N workers on this machine) or tcp://HOST:PORT "
                       f"(a 'dask scheduler')")


def _dask():
    try:
        import distributed
    except ImportError:
        raise MinivmmError(f"--scheduler needs Dask, which is not installed: {INSTALL}") from None
    return distributed


def _guest_parcel(guest: str | None) -> tuple[str | None, bytes | None, str | None]:
    """(file name, content, SHA-256) of what travels for ``guest``: nothing for a shipped
    guest (every worker has it by name), the SHA-256 of a Linux program (which runs
    from the same file of the worker's), the bytes of any other file."""
    if guest is None:
        return None, None, None
    path = find_guest(guest)
    if shipped_guests_dir() in path.resolve().parents:
        return None, None, None
    data = read_bytes(path, "guest", MAX_IMAGE)
    if load_guest(guest).kind == "linux":
        return None, None, hashlib.sha256(data).hexdigest()
    return path.name, data, None


def _lacks(cell: Cell, digest: str | None) -> str | None:
    """Why this worker cannot run a Linux program's cell as the machine that made it would."""
    where = f"worker {socket.gethostname()}"
    if digest is not None:
        try:
            same = hashlib.sha256(read_bytes(cell.guest, "guest", MAX_IMAGE)).hexdigest() == digest
        except MinivmmError:
            return f"{where} has no file {cell.guest}: a Linux program runs from the worker's own copy"
        if not same:
            return f"{where} has another {cell.guest} (its SHA-256 differs)"
    for mount in cell.mounts:
        if not os.path.exists(mount.split(":", 1)[0]):
            return f"{where} lacks {mount.split(':', 1)[0]}, which --mount {mount} shows the program"
    return None


def _held(content: bytes) -> bytes:
    """A guest's bytes as a task's result: the scheduler keeps the task, so a worker that
    dies with them makes them again."""
    return content


def run_remote_cell(cell: Cell, name: str | None, content: bytes | None, digest: str | None,
                    timeout: float) -> Outcome:
    """On a worker: the cell, with its guest's bytes written to a file of its own (a
    Linux program: the worker's own file, the same)."""
    why = _lacks(cell, digest)
    if why:
        return Outcome(cell, "failed", why)
    if content is None:
        return run_cell(cell, timeout)
    with tempfile.TemporaryDirectory(prefix="minivmm-cell-") as folder:
        path = Path(folder, name)
        path.write_bytes(content)
        path.chmod(0o755)
        outcome = run_cell(cell, timeout, guest=str(path))
    outcome.message = outcome.message.replace(str(path), cell.guest)   # as a local run words it
    return outcome


def run_cells_on_dask(cell_list: list[Cell], scheduler: str, timeout: float = 60,
                      progress: Callable[[Outcome], None] | None = None) -> tuple[list[Outcome], dict]:
    """Run cells as Dask tasks on ``scheduler``: their outcomes, in cell order, and what
    the cluster did ({"scheduler", "workers", "retries"}: cells moved after a worker died)."""
    distributed = _dask()
    cluster = None
    check_scheduler(scheduler)
    local = LOCAL.fullmatch(scheduler)
    if local:
        cluster = distributed.LocalCluster(n_workers=int(local.group(1)), threads_per_worker=1, processes=True,
                                           dashboard_address=":0", silence_logs=40)
        client = distributed.Client(cluster)
    else:
        client = _connect(distributed, scheduler)
    try:
        warnings.filterwarnings("ignore", message="Sending large graph")   # a guest's bytes, once: meant
        parcels = {guest: _guest_parcel(guest) for guest in dict.fromkeys(c.guest for c in cell_list)}
        # Each guest's bytes once, as a task the cells depend on: data scattered to
        # workers would die with them (and every cell that needs it), bytes in each
        # cell's task would cost the scheduler a copy per cell.
        held = {guest: client.submit(_held, content, key=f"minivmm-guest-{i}", pure=False)
                for i, (guest, (_, content, _)) in enumerate(parcels.items()) if content is not None}
        futures = {}
        for i, cell in enumerate(cell_list):
            name, _, digest = parcels[cell.guest]
            key = f"minivmm-cell-{i}-{name or os.path.basename(cell.guest or '')}-{cell.id}"
            futures[client.submit(run_remote_cell, cell, name, held.get(cell.guest), digest, timeout, key=key,
                                  pure=False)] = i
        results: dict[int, Outcome] = {}
        for future in distributed.as_completed(futures):
            i = futures[future]
            try:
                results[i] = future.result()
            except distributed.KilledWorker as e:
                results[i] = Outcome(cell_list[i], "failed", f"the cell killed every worker it ran on ({e})")
            except CancelledError as e:   # the cluster lost it: the cell's failure, and the run goes on
                results[i] = Outcome(cell_list[i], "failed", f"Dask did not run the cell: {e}")
            if progress:
                progress(results[i])
        keys = [future.key for future in futures]
        retries = client.run_on_scheduler(_retries, keys=keys)
        workers = len(client.scheduler_info()["workers"])
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return [results[i] for i in range(len(cell_list))], {"scheduler": scheduler, "workers": workers,
                                                          "retries": retries}


def _connect(distributed, scheduler: str):
    """A client of the scheduler at ``scheduler``, within CONNECT_SECONDS, or one line:
    what answers there may be silent, or not Dask at all (its bytes read as a length)."""
    done: list = []

    def attempt():
        try:
            done.append(distributed.Client(scheduler, timeout=f"{CONNECT_SECONDS}s"))
        except BaseException as e:   # whatever the peer made of Dask's handshake
            done.append(e)
    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(CONNECT_SECONDS)
    if not done or isinstance(done[0], BaseException):
        why = f"{type(done[0]).__name__}: {done[0]}"[:200] if done else f"no answer within {CONNECT_SECONDS} s"
        raise MinivmmError(f"--scheduler {scheduler}: no Dask scheduler answers there ({why})")
    return done[0]


def _retries(dask_scheduler, keys) -> int:
    """On the scheduler: how many times the cells' tasks were moved after their worker died."""
    return sum(dask_scheduler.tasks[key].suspicious for key in keys if key in dask_scheduler.tasks)
