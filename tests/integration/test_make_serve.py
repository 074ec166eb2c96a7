"""`make serve` on a fresh copy of the repository: installs, answers /health within 60 s, is
found by Headplane's discovery rule and reloads on SIGHUP, serves the CLI from any directory,
stops cleanly on Ctrl-C, and a second start reuses the Noise key and the database.

The embedded default listens on fixed loopback ports (8080, 8443, 9090, 3478), so the server
runs in a network namespace of its own: parallel test workers and anything else on the
machine keep their ports. The install step (`make`'s venv target) runs first in the root
namespace, because pip needs the package index and a namespace has no route out."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.headplane import headscale_serve_pids
from tests.integration.netns import Host, Topology
from tests.integration.server import REPO, http_get_from
from tests.netutil import short_dir

pytestmark = pytest.mark.integration

URL = "http://127.0.0.1:8080"


def fresh_copy(dest: Path) -> Path:
    """The tracked files as they are on disk: what a clone of this commit holds."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.split(b"\0")
    for f in filter(None, files):
        src = REPO / f.decode()
        if src.is_file():
            (dest / f.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f.decode())
    return dest


def clean_env(home: Path) -> dict[str, str]:
    """No HEADSCALE_*/PYHEADSCALE_*/XDG_* nor make's own variables from the caller, and a HOME
    of the test's own: the embedded default's data directory is ~/.local/share/pyheadscale."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HEADSCALE_", "PYHEADSCALE_", "XDG_", "MAKE", "MFLAGS"))}
    env["HOME"] = str(home)
    return env


def get(host: Host, path: str) -> tuple[int, bytes]:
    return http_get_from(host, URL + path, timeout=2)


def install(repo: Path, home: Path, log: Path) -> None:
    """What `make serve` does first on a fresh copy: create the venv and install."""
    with log.open("ab") as out:
        r = subprocess.run(["make", ".venv/.installed"], cwd=repo, env=clean_env(home),
                           stdout=out, stderr=subprocess.STDOUT, timeout=900, check=False)
    assert r.returncode == 0, f"install failed:\n{log.read_text()[-3000:]}"


def start(host: Host, repo: Path, home: Path, log: Path) -> subprocess.Popen[bytes]:
    # Not host.popen: that adds this process's environment back. `ip netns exec` execs in
    # place, so the process is make itself; the topology's teardown ends anything left.
    with log.open("ab") as out:
        return subprocess.Popen(host.exec_argv(["make", "serve"]), cwd=repo,
                                env=clean_env(home), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def headscale(host: Host, repo: Path, home: Path, cwd: Path,
              *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(host.exec_argv([str(repo / ".venv" / "bin" / "headscale"), *args]),
                          cwd=cwd, env=clean_env(home), capture_output=True, text=True,
                          timeout=60, check=False)


def wait_healthy(host: Host, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"make serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        if get(host, "/health")[0] == 200:
            return time.monotonic() - t0
        time.sleep(0.5)
    raise AssertionError(f"no healthy /health within {timeout}s:\n{log.read_text()[-3000:]}")


def ctrl_c(proc: subprocess.Popen[bytes], log: Path) -> None:
    if proc.poll() is not None:
        return  # already gone: the assertion that noticed it says why
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the foreground group
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(
            f"make serve did not stop on Ctrl-C:\n{log.read_text()[-3000:]}") from None
    assert "pyheadscale: shutting down" in log.read_text()


def our_server(make: subprocess.Popen[bytes]) -> int:
    """The pid Headplane's rule finds among make's children (other servers may run too)."""
    def parent(pid: int) -> int:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("PPid:")))

    found = [pid for pid in headscale_serve_pids() if parent(pid) == make.pid]
    assert len(found) == 1, headscale_serve_pids()
    return found[0]


def test_make_serve_fresh_copy(tmp_path: Path, topology: Topology) -> None:
    with short_dir("ph-home-") as home:  # the CLI socket lives under HOME
        _make_serve_fresh_copy(tmp_path, topology, home)


def _make_serve_fresh_copy(tmp_path: Path, topology: Topology, home: Path) -> None:
    host = topology.add_host("serve")
    repo = fresh_copy(tmp_path / "repo")
    data = home / ".local" / "share" / "pyheadscale"
    log = tmp_path / "serve.log"
    install(repo, home, log)
    installed = log.read_text()
    assert "pip install" in installed, installed[-3000:]
    proc = start(host, repo, home, log)
    try:
        took = wait_healthy(host, proc, 60, log)
        # `make serve` found the install up to date and went straight to serving.
        assert "pip install" not in log.read_text()[len(installed):]
        key1 = json.loads(get(host, "/key?v=113")[1])["publicKey"]
        # From another directory: the CLI resolves the same data directory and socket.
        r = headscale(host, repo, home, tmp_path, "users", "create", "keepme")
        assert r.returncode == 0, r.stderr
        os.kill(our_server(proc), signal.SIGHUP)  # what Headplane sends after a config edit
        deadline = time.monotonic() + 20
        while "configuration reloaded" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        ctrl_c(proc, log)
    assert took < 60
    assert (data / "noise_private.key").stat().st_mode & 0o777 == 0o600
    assert not (repo / "data").exists()

    proc = start(host, repo, home, log)
    try:
        wait_healthy(host, proc, 30, log)
        assert json.loads(get(host, "/key?v=113")[1])["publicKey"] == key1
        r = headscale(host, repo, home, repo, "users", "list", "-o", "json")
        assert r.returncode == 0, r.stderr
        assert "keepme" in [u["name"] for u in json.loads(r.stdout)]
    finally:
        ctrl_c(proc, log)
