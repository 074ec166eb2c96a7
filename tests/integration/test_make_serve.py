"""`make serve` on a fresh copy of the repository: installs, answers /health within 60 s, is
found by Headplane's discovery rule and reloads on SIGHUP, serves the CLI from any directory,
stops cleanly on Ctrl-C, and a second start reuses the Noise key and the database."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.headplane import headscale_serve_pids
from tests.integration.server import REPO

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


def get(path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(URL + path, timeout=2) as r:
            return r.status, r.read()
    except OSError:
        return 0, b""


def clean_env(home: Path) -> dict[str, str]:
    """No HEADSCALE_*/PYHEADSCALE_*/XDG_* from the caller, and a HOME of the test's own: the
    embedded default's data directory is ~/.local/share/pyheadscale."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HEADSCALE_", "PYHEADSCALE_", "XDG_"))}
    env["HOME"] = str(home)
    return env


def start(repo: Path, log: Path) -> subprocess.Popen[bytes]:
    env = clean_env(repo.parent / "home")
    with log.open("ab") as out:
        return subprocess.Popen(["make", "serve"], cwd=repo, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(proc: subprocess.Popen[bytes], timeout: float, log: Path) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"make serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        if get("/health")[0] == 200:
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


def test_make_serve_fresh_copy(tmp_path: Path) -> None:
    assert get("/health")[0] == 0, "something already listens on 127.0.0.1:8080"
    repo = fresh_copy(tmp_path / "repo")
    home = tmp_path / "home"
    home.mkdir()
    data = home / ".local" / "share" / "pyheadscale"
    log = tmp_path / "serve.log"
    proc = start(repo, log)
    cli = repo / ".venv" / "bin" / "headscale"
    try:
        took = wait_healthy(proc, 60, log)
        key1 = json.loads(get("/key?v=113")[1])["publicKey"]
        # From another directory: the CLI resolves the same data directory and socket.
        r = subprocess.run([str(cli), "users", "create", "keepme"], cwd=tmp_path,
                           env=clean_env(home), capture_output=True, text=True, timeout=60)
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

    proc = start(repo, log)
    try:
        wait_healthy(proc, 30, log)
        assert json.loads(get("/key?v=113")[1])["publicKey"] == key1
        r = subprocess.run([str(cli), "users", "list", "-o", "json"], cwd=repo,
                           env=clean_env(home), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "keepme" in [u["name"] for u in json.loads(r.stdout)]
    finally:
        ctrl_c(proc, log)
