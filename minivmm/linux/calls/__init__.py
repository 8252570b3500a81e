"""The system-call tables, one module per concern (files, memory, signals, execve, sockets, timers, the
process and its environment, threads and processes, pipes, readiness), merged into one table by number."""

from . import events, execve, files, memory, net, pipes, process, processes, signals, threads, timers
from .base import RETURNED, reads_cpu

TABLE = {**execve.TABLE, **files.TABLE, **events.TABLE, **memory.TABLE, **net.TABLE, **process.TABLE, **signals.TABLE,
         **threads.TABLE, **pipes.TABLE, **processes.TABLE, **timers.TABLE}

# the calls whose handlers never see the engine (base.reads_cpu)
CPU_FREE = frozenset(number for number, (_, handler) in TABLE.items() if not reads_cpu(handler))

__all__ = ["CPU_FREE", "RETURNED", "TABLE"]
