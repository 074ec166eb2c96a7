"""What the harness's long-running processes (pyheadscale, tailscaled, relays, HAProxy)
share: a namespace to run in, a log file, waiting until ready, a unix socket path short enough
for AF_UNIX, stop/kill/restart/close."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Self

from tests.integration.netns import Host

SOCK_MAX = 100  # sun_path is 108 bytes; keep a margin


def terminate(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float) -> None:
    """SIGTERM, then SIGKILL if `proc` is still running after `grace` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)


class NamespacedProcess:
    """One process in `host`'s namespace, logging to `log_path`. Subclasses start it (with
    `spawn`) and say when it is ready."""

    stop_timeout = 10.0  # seconds between SIGTERM and SIGKILL

    def __init__(self, host: Host, log_path: Path) -> None:
        self.host = host
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._sockdir: str | None = None

    def short_socket(self, path: Path, prefix: str) -> Path:
        """`path`, or the same file name in a fresh short directory when `path` is too long
        for a unix socket (removed again by close())."""
        if len(str(path)) <= SOCK_MAX:
            return path
        self._sockdir = tempfile.mkdtemp(prefix=prefix)
        return Path(self._sockdir) / path.name

    def start(self, timeout: float = 30) -> None:
        raise NotImplementedError

    def spawn(self, argv: Sequence[str], *, env: Mapping[str, str],
              cwd: str | os.PathLike[str] | None = None) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"=== harness: starting {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = self.host.popen(list(argv), env=dict(env), cwd=cwd, stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, ready: Callable[[], bool], timeout: float, error: type[Exception],
                   not_yet: Callable[[], str], interval: float = 0.2) -> None:
        """Poll `ready` until it holds. Raise `error` with the log's tail when the process
        exits first, or when `timeout` passes (saying `not_yet()`: what is still missing)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise error(f"{self!r} exited with {self.proc.returncode if self.proc else None}"
                            f"; log tail:\n{self.log_tail()}")
            if ready():
                return
            time.sleep(interval)
        raise error(f"{self!r}: {not_yet()} after {timeout}s; log tail:\n{self.log_tail()}")

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self, timeout: float = 30) -> None:
        self.stop()
        self.start(timeout=timeout)

    def close(self) -> None:
        self.stop()
        if self._sockdir is not None:
            shutil.rmtree(self._sockdir, ignore_errors=True)
            self._sockdir = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])
