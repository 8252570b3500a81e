"""The system-call tables, one module per concern (files, memory, signals, execve, sockets, timers, the
process and its environment, threads and processes, pipes, readiness), merged into one table by number."""

from . import events, execve, files, memory, net, pipes, process, processes, signals, threads, timers
from .base import RETURNED

TABLE = {**execve.TABLE, **files.TABLE, **events.TABLE, **memory.TABLE, **net.TABLE, **process.TABLE, **signals.TABLE,
         **threads.TABLE, **pipes.TABLE, **processes.TABLE, **timers.TABLE}

__all__ = ["RETURNED", "TABLE"]
