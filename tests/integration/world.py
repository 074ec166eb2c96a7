"""What integration tests share: a seeded server with official clients joining it, and waits.

`world` (a fixture in conftest.py) gives each test a server host in its own topology.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.integration.netns import Host, Namespace, Topology
from tests.integration.seed import seed
from tests.integration.server import REPO, PyHeadscale
from tests.integration.tailscale import Tailscaled

BASE_DOMAIN = "tailnet.test"
DNSQ = str(REPO / "tests" / "integration" / "dnsq.py")


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


class World:
    """A server host, a seeded pyheadscale and official clients joining it."""

    def __init__(self, topology: Topology, workdir: Path,
                 tailscaled_factory: Callable[..., Tailscaled]) -> None:
        self.topology = topology
        self.workdir = workdir
        self.make_tailscaled = tailscaled_factory
        self.server_host = topology.add_server_host()
        self.server: PyHeadscale | None = None
        self.keys: dict[str, str] = {}
        self.nodes: dict[str, Tailscaled] = {}

    def start_server(self, overrides: dict[str, Any] | None = None,
                     keys: dict[str, dict[str, Any]] | None = None,
                     users: list[str] | None = None,
                     policy: dict[str, Any] | None = None) -> PyHeadscale:
        """Seeds user alice with a reusable key unless `users` (then `keys` or none) is given;
        `policy` runs in file mode."""
        over = dict(overrides or {})
        if policy is not None:
            path = self.workdir / "policy.json"
            path.write_text(json.dumps(policy))
            over["policy"] = {"mode": "file", "path": str(path)}
        srv = PyHeadscale(self.server_host, self.workdir / "server", over, start=False)
        self.server = srv
        if users is None:
            users, keys = ["alice"], keys or {"reusable": {"user": "alice", "reusable": True}}
        seeded = seed(srv, users, keys or {})
        self.keys = seeded["keys"]
        srv.start()
        return srv

    def add_client(self, name: str, version: str, host: Host | None = None) -> Tailscaled:
        """A tailscaled on a new internet host `name`, or on `host` (e.g. a NAT router)."""
        assert self.server is not None
        host = host or self.topology.add_host(name)
        ts = self.make_tailscaled(host, version, ssl_cert_file=self.server.ca_file)
        self.nodes[name] = ts
        return ts

    def join(self, name: str, version: str, key: str = "reusable", args: tuple[str, ...] = (),
             host: Host | None = None) -> Tailscaled:
        ts = self.add_client(name, version, host)
        r = ts.up(self.server.url, authkey=self.keys[key], hostname=name, timeout=60,  # type: ignore[union-attr]
                  extra_args=args)
        assert r.returncode == 0, f"{name} ({version}) did not join: {r.stdout}{r.stderr}"
        return ts

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


W = TypeVar("W", bound="World")


def world_fixture(cls: type[W]) -> Callable[..., Iterator[W]]:
    """A pytest fixture that makes a `cls` (World or a lab built on it) and closes it."""

    @pytest.fixture
    def fixture(topology: Topology, workdir: Path,
                tailscaled_factory: Callable[..., Tailscaled]) -> Iterator[W]:
        world = cls(topology, workdir, tailscaled_factory)
        yield world
        world.close()

    return fixture


ECHO_HTTP = Path(__file__).with_name("echo_http.py")


def serve_echo(ns: Namespace, addr: str, ports: Iterable[int],
               label: str = "") -> subprocess.Popen[Any]:
    """A web server in `ns` bound to `addr` on each port, answering every GET with
    "<label> <peer address>" ("{port}" in the label is the port asked); see echo_http.py."""
    return ns.popen([sys.executable, str(ECHO_HTTP), addr, label, *map(str, ports)])


def peers_by_name(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["HostName"]: p for p in (st.get("Peer") or {}).values()}


def dns(host: Host, name: str, qtype: str = "A") -> list[str]:
    r = host.run(["python3", DNSQ, name, qtype], timeout=15)
    return [line.strip() for line in r.stdout.splitlines() if line.strip()]
