"""What the scripts that build or install test programs share (official clients, Headscale,
derper, the Go API client, the OpenID provider): one error type, a lock so parallel pytest
workers build one at a time, and the `ok <name>: <path>` command-line report."""

from __future__ import annotations

import contextlib
import fcntl
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path


class BuildError(RuntimeError):
    """A program could not be built or installed, or does not run."""


@contextlib.contextmanager
def file_lock(directory: Path, name: str = ".build.lock") -> Iterator[None]:
    """Hold an exclusive lock on `directory/name` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / name, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def report(steps: Callable[[], Iterable[tuple[str, Path]]]) -> int:
    """Run `steps`, print `ok <what>: <path>` for each result; exit code 1 on BuildError."""
    try:
        for what, path in steps():
            print(f"ok {what}: {path}")
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
