"""A worker preload for the tests (``dask worker --preload``): the worker process dies at
once when it starts a cell whose guest is named kills-its-worker, as a worker killed by
the machine would (the out-of-memory killer, a crash of the engine)."""

import os

from distributed.diagnostics.plugin import WorkerPlugin


class KillsItsWorker(WorkerPlugin):
    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and "kills-its-worker" in str(key):
            os._exit(1)


async def dask_setup(worker):
    await worker.plugin_add(KillsItsWorker(), name="kills-its-worker")
