"""Headplane's native integration: the server started as documented is found by Headplane's
rule (`comm` and the second word of `cmdline` in /proc) and reloads on its SIGHUP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from pyheadscale.proctitle import encode, new_cmdline
from tests.headplane import headscale_serve_pids, matches
from tests.netutil import free_port
from tests.unit.test_logs import write_config

BIN = Path(sys.executable).parent


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)


def filter_ports(metrics_addr: str) -> set[tuple[int, int]]:
    """The port ranges of the server's running filter (/debug/filter)."""
    with urllib.request.urlopen(f"http://{metrics_addr}/debug/filter", timeout=5) as r:
        rules = json.load(r)
    return {(p["Ports"]["First"], p["Ports"]["Last"]) for r in rules for p in r["DstPorts"]}


def wait_for(log: Path, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


@pytest.mark.parametrize("argv", [
    ["headscale", "serve", "-c", "{config}"],  # the README's and the systemd unit's way
    ["headscale", "-c", "{config}", "serve"],
    ["pyheadscale", "serve", "-c", "{config}"],
    ["{python}", "-m", "pyheadscale", "serve", "-c", "{config}"],
])
def test_found_by_headplane_rule_and_reloads_on_sighup(argv: list[str], tmp_path: Path) -> None:
    policy = tmp_path / "policy.hujson"
    policy.write_text('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}')
    metrics = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path, {"policy": {"path": str(policy)},
                                     "metrics_listen_addr": metrics})
    url = yaml.safe_load(config.read_text())["server_url"]
    cmd = [a.format(config=config, python=sys.executable) for a in argv]
    if not cmd[0].startswith("/"):
        cmd[0] = str(BIN / cmd[0])
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, url, log)
        assert matches(proc.pid), (Path(f"/proc/{proc.pid}/comm").read_text(),
                                    Path(f"/proc/{proc.pid}/cmdline").read_bytes())
        assert proc.pid in headscale_serve_pids()
        words = [w for w in Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0") if w]
        assert words == [b"headscale", b"serve", b"-c", str(config).encode()]
        assert filter_ports(metrics) == {(0, 65535)}
        # What Headplane does next: SIGHUP the pid it found. The running filter follows.
        policy.write_text('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}]}')
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(log, "configuration reloaded")
        assert filter_ports(metrics) == {(22, 22)}
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_other_processes_do_not_match(tmp_path: Path) -> None:
    """The rule needs both parts: a `headscale` CLI call is not the server."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "serve"])
    try:
        time.sleep(0.2)
        assert not matches(proc.pid)  # `serve` is an argument, but comm is python's
    finally:
        proc.kill()
        proc.wait()


def test_cmdline_rewrite_fits_the_original_block() -> None:
    assert new_cmdline(["/x/bin/headscale", "-c", "c.yaml", "serve"]) == [
        "headscale", "serve", "-c", "c.yaml"]
    assert encode(["headscale", "serve", "-c", "c.yaml"], 40) == (
        b"headscale\0serve\0-c\0c.yaml\0".ljust(40, b"\0"))
    # Arguments that do not fit are dropped; `headscale serve` itself must fit.
    assert encode(["headscale", "serve", "-c", "a-long-path.yaml"], 20) == (
        b"headscale\0serve\0".ljust(20, b"\0"))
    assert encode(["headscale", "serve"], 10) is None
