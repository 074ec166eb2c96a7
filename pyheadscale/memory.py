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
    _libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
except (OSError, AttributeError):
    _libc = None

# glibc's mallopt parameters (malloc.h); other C libraries have no such calls.
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
ARENAS = 2
MMAP_THRESHOLD = 128 * 1024


def tune_malloc() -> bool:
    """Bound glibc's heap before any thread starts; False where mallopt does not exist.

    * Every thread that calls malloc gets its own arena (up to 8 per core), and what one
      thread freed serves only that thread again: the database thread and the to_thread
      pool each kept tens of MiB of their own. Python serialises most allocations behind
      the GIL anyway, so two arenas cost no measurable contention.
    * A freed large block raises glibc's mmap threshold to its size (up to 32 MiB), after
      which large transient buffers (first maps, frames being written) come from the heap
      and leave it fragmented. A fixed threshold keeps them in their own mappings, handed
      back to the OS on free.
    """
    if _libc is None:
        return False
    _libc.mallopt(_M_ARENA_MAX, ARENAS)
    _libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    return True


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
