"""The system-call tables, one module per concern (files, memory, signals, execve, sockets, the process
and its environment), merged into one table by number."""

from . import execve, files, memory, net, process, signals
from .base import RETURNED

TABLE = {**execve.TABLE, **files.TABLE, **memory.TABLE, **net.TABLE, **process.TABLE, **signals.TABLE}

__all__ = ["RETURNED", "TABLE"]
