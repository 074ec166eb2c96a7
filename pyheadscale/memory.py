"""Keep glibc's heap small: tune it at start (mallopt), give freed memory back (malloc_trim).

A server that parses many short-lived JSON documents, map frames and TLS records churns the
C heap; glibc keeps what is freed inside its arenas, so RSS creeps up although nothing
leaks (the fuzz run shows every such MiB comes back with a trim). The server trims once a
minute; it costs a few milliseconds. `tune_malloc` says what it changes and why. ctypes,
because no library exposes mallopt/malloc_trim; without glibc both do nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("pyheadscale.memory")
TRIM_INTERVAL = 60.0

_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _libc.malloc_trim.argtypes = [ctypes.c_size_t]
    _libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _libc.mallopt.restype = ctypes.c_int  # 1: done, 0: refused
except (OSError, AttributeError):
    _libc = None

# glibc's mallopt parameters (malloc.h); other C libraries have no such calls.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
ARENAS = 2
MMAP_THRESHOLD = 1 << 20
TRIM_THRESHOLD = 4 << 20


def tune_malloc() -> bool:
    """Bound glibc's heap before any thread starts; False where mallopt does not exist or
    glibc refused a setting (it returns 0 for a value out of its range).

    * Every thread that calls malloc gets its own arena (up to 8 per core), and what one
      thread freed serves only that thread again: the database thread and the to_thread
      pool each kept tens of MiB of their own. Python serialises most allocations behind
      the GIL anyway, so two arenas cost no measurable contention.
    * Every socket read allocates max_size (256 KiB) and shrinks it to what arrived. Above
      glibc's default mmap threshold (128 KiB, raised only when a block that large is freed,
      which a shrunk one never is) that was an mmap, an mremap and later a munmap per read;
      a 1 MiB threshold serves reads from the heap (2.8 instead of 16-20 us per small read
      on this machine). Only larger buffers get mappings of their own, handed back on free.
    * The heap top is given back once 4 MiB of it is free, not at every 128 KiB (a brk per
      read otherwise); the periodic trim returns the rest.
    """
    if _libc is None:
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    ok = True
    for param, value, env, tunable in (
            (_M_ARENA_MAX, ARENAS, "MALLOC_ARENA_MAX", "arena_max"),
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", "mmap_threshold"),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", "trim_threshold")):
        # What the operator set in the environment wins (mallopt would override it).
        if env not in os.environ and f"glibc.malloc.{tunable}=" not in tunables:
            if _libc.mallopt(param, value) != 1:
                log.debug("glibc refused mallopt(%d, %d)", param, value)
                ok = False
    return ok


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
