"""Give freed heap memory back to the operating system (glibc's malloc_trim).

A server that parses many short-lived JSON documents, map frames and TLS records churns the
C heap; glibc keeps what is freed inside its arenas, so RSS creeps up although nothing
leaks (the fuzz run shows every such MiB comes back with a trim). The server trims once a
minute; it costs a few milliseconds. Without glibc this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging

log = logging.getLogger("pyheadscale.memory")
TRIM_INTERVAL = 60.0

_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _libc.malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):
    _libc = None


def trim() -> bool:
    """Return free heap pages to the OS; False where malloc_trim does not exist."""
    if _libc is None:
        return False
    _libc.malloc_trim(0)
    return True


async def trim_periodically(interval: float = TRIM_INTERVAL) -> None:
    if _libc is None:
        return
    while True:
        await asyncio.sleep(interval)
        trim()
