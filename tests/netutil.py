"""Network helpers shared by every kind of test: loopback only."""

from __future__ import annotations

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
