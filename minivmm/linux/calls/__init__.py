"""The system-call tables, one module per concern (files, memory, signals, the process
and its environment), merged into one table by number."""

from . import files, memory, process, signals
from .base import RETURNED

TABLE = {**files.TABLE, **memory.TABLE, **process.TABLE, **signals.TABLE}

__all__ = ["RETURNED", "TABLE"]
