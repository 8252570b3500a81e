"""Matrix cells as Dask tasks, on a cluster (``tcp://ADDR:PORT``: a ``dask scheduler``
and its ``dask worker``s) or on a LocalCluster of N worker processes (``local:N``).

Dask is an extra (``pip install 'minivmm[distributed]'``): its scheduler places the
cells, moves a cell whose worker died to another (the scheduler's own retries, up to
its ``distributed.scheduler.allowed-failures``), and past that reports the cell failed
with KilledWorker, while the run goes on. What travels with a cell is its content, not
its paths: a guest file goes as its bytes (shipped guests by name), so a worker needs
only ``pip install minivmm``. A Linux program's ``--mount`` names paths of the worker's
machine: a worker that lacks one refuses the cell in one line. A cell's outcome is the
one ``--jobs`` gives, wherever it ran, and the outcomes come back in cell order.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
from collections.abc import Callable
from concurrent.futures import CancelledError
from pathlib import Path

from ..errors import MinivmmError
from ..files import read_bytes
from ..guests import shipped_guests_dir
from ..guests.loader import MAX_IMAGE, find_guest
from .matrix import Cell, Outcome, run_cell

INSTALL = "pip install 'minivmm[distributed]'"
LOCAL = re.compile(r"local:([1-9][0-9]{0,2})")
CONNECT_TIMEOUT = "10s"


def check_scheduler(text: str) -> str:
    """``local:N`` (1 to 999 workers) or ``tcp://HOST:PORT``, else one line."""
    if LOCAL.fullmatch(text) or re.fullmatch(r"tcp://[^\s/:]+:[0-9]{1,5}", text):
        return text
    raise MinivmmError(f"--scheduler {text!r}: not local:N (N workers on this machine) or tcp://HOST:PORT "
                       f"(a 'dask scheduler')")


def _dask():
    try:
        import distributed
    except ImportError:
        raise MinivmmError(f"--scheduler needs Dask, which is not installed: {INSTALL}") from None
    return distributed


def _guest_parcel(guest: str | None) -> tuple[str | None, bytes | None]:
    """(file name, content) of what travels for ``guest``: nothing for a shipped guest
    (every worker has it by name), the bytes of any other file."""
    if guest is None:
        return None, None
    path = find_guest(guest)
    if shipped_guests_dir() in path.resolve().parents:
        return None, None
    return path.name, read_bytes(path, "guest", MAX_IMAGE)


def run_remote_cell(cell: Cell, name: str | None, content: bytes | None, timeout: float) -> Outcome:
    """On a worker: the cell, with its guest's bytes written to a file of its own."""
    missing = [mount for mount in cell.mounts if not os.path.exists(mount.split(":", 1)[0])]
    if missing:
        return Outcome(cell, "failed", f"worker {socket.gethostname()} lacks {missing[0].split(':', 1)[0]}, "
                                       f"which --mount {missing[0]} shows the program")
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
    try:
        if local:
            cluster = distributed.LocalCluster(n_workers=int(local.group(1)), threads_per_worker=1, processes=True,
                                               dashboard_address=":0", silence_logs=40)
            client = distributed.Client(cluster)
        else:
            client = distributed.Client(scheduler, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as e:
        if cluster is not None:
            cluster.close()
        raise MinivmmError(f"--scheduler {scheduler}: no Dask scheduler answers there ({e})") from None
    try:
        parcels = {guest: _guest_parcel(guest) for guest in dict.fromkeys(c.guest for c in cell_list)}
        futures = {}
        for i, cell in enumerate(cell_list):
            # The bytes go in each task, held by the scheduler: data scattered to workers
            # would die with them, and with it every cell that needs it.
            name, content = parcels[cell.guest]
            key = f"minivmm-cell-{i}-{name or cell.guest}-{cell.id}"
            futures[client.submit(run_remote_cell, cell, name, content, timeout, key=key, pure=False)] = i
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


def _retries(dask_scheduler, keys) -> int:
    """On the scheduler: how many times the cells' tasks were moved after their worker died."""
    return sum(dask_scheduler.tasks[key].suspicious for key in keys if key in dask_scheduler.tasks)
