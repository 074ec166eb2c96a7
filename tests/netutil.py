"""Network helpers shared by every kind of test: loopback only."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 that was free a moment ago (TCP by default, SOCK_DGRAM for UDP)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


async def say_and_hang_up(r: asyncio.StreamReader, w: asyncio.StreamWriter, data: bytes,
                          wait: float) -> None:
    """Send `data`, read for at most `wait` seconds whatever answer comes, then close: a
    client that says one thing and leaves. No answer, or a reset, is fine."""
    try:
        w.write(data)
        await w.drain()
        await asyncio.wait_for(r.read(1 << 16), wait)
    except (TimeoutError, ConnectionError):
        pass
    finally:
        w.close()


@contextlib.contextmanager
def short_dir(prefix: str) -> Iterator[Path]:
    """A fresh directory with a short path, removed afterwards, for a HOME or data directory
    that will hold a unix socket: socket paths are limited to 107 bytes, and pytest's
    tmp_path (one level deeper per worker under xdist) can be longer."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
