"""Shared helpers for the side-by-side benchmarks: processes, /proc figures, stats, output.

Everything here targets 127.0.0.1 only. Servers run as child processes with their output in a
log file; they are stopped (SIGTERM, then SIGKILL) by pid when the benchmark ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.netutil import LOOPBACK

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A benchmark could not run (a server did not start, a client failed, ...)."""


# -- event loop ----------------------------------------------------------------------------


def install_uvloop() -> bool:
    """Use uvloop for new event loops when it is installed; True if it is."""
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return False
    uvloop.install()
    return True


# -- ports and processes -------------------------------------------------------------------


def wait_tcp(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    """Wait until 127.0.0.1:port accepts connections; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{proc.args!r} exited with {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.5):
            return
        time.sleep(0.1)
    raise BenchError(f"nothing listening on {LOOPBACK}:{port} after {timeout}s:\n{tail(log)}")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


@contextlib.contextmanager
def server_process(
    argv: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None, cpu: int | None = None, nice: int = 0,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `argv` with output to `log` (optionally pinned to one CPU, with a niceness);
    stop it on exit."""
    full_env = dict(os.environ)
    full_env.update(env or {})

    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            list(argv), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=full_env, cwd=str(cwd) if cwd else None,
            preexec_fn=child_setup(cpu, nice),
        )
    try:
        yield proc
    finally:
        stop_process(proc)


def child_setup(cpu: int | None, nice: int = 0) -> Callable[[], None] | None:
    """A preexec_fn pinning the child to `cpu` and adding `nice`: it runs in the child before
    exec, so every thread the program starts inherits both."""
    if cpu is None and not nice:
        return None

    def setup() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        if nice:
            os.nice(nice)

    return setup


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=10)


# -- /proc figures -------------------------------------------------------------------------


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (all its threads), or of one of its threads, in seconds."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as fh:
        stat = fh.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # fields 14 and 15 of stat(5)


def main_thread_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process's main thread (a Python server's event loop)."""
    return cpu_seconds(pid, pid)


def _status_kib(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def peak_rss_mib(pid: int) -> float:
    """High-water mark of the resident set (VmHWM), in MiB."""
    return _status_kib(pid, "VmHWM") / 1024


def rss_mib(pid: int) -> float:
    return _status_kib(pid, "VmRSS") / 1024


# -- statistics and output -----------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b rounded to 3 digits; None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def rnd(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def machine_info() -> dict[str, Any]:
    """What makes numbers comparable: CPU, cores, kernel, Python, uvloop."""
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import uvloop  # type: ignore[import-not-found]

        uv = str(uvloop.__version__)
    except ImportError:
        uv = None
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": uv,
        "loadavg_at_start": os.getloadavg()[0],
    }


@dataclass
class Table:
    """A small aligned text table for the human part of the report."""

    header: Sequence[str]
    rows: list[Sequence[Any]]

    def render(self) -> str:
        cells = [[str(h) for h in self.header]]
        cells += [[_fmt(c) for c in r] for r in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.header))]
        lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                           enumerate(zip(r, widths, strict=True))) for r in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)


def emit_json(obj: Mapping[str, Any]) -> None:
    """The last line of every benchmark: one JSON object."""
    sys.stdout.flush()
    print(json.dumps(obj, separators=(",", ":"), sort_keys=False), flush=True)


def pipe_commands(pipe: Any) -> asyncio.Queue[Any]:
    """Messages from the parent's multiprocessing pipe, delivered on the running loop; EOF
    arrives as ("stop",). A worker's commands, read by a thread so the loop never blocks."""
    loop = asyncio.get_running_loop()
    cmds: asyncio.Queue[Any] = asyncio.Queue()

    def reader() -> None:
        while True:
            try:
                msg = pipe.recv()
            except EOFError:
                msg = ("stop",)
            loop.call_soon_threadsafe(cmds.put_nowait, msg)
            if msg[0] == "stop":
                return

    threading.Thread(target=reader, daemon=True).start()
    return cmds
