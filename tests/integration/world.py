"""What integration tests share: a seeded server with official clients joining it, and waits.

`world` (a fixture in conftest.py) gives each test a server host in its own topology.
"""

from __future__ import annotations

import enum
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
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
                     policy: dict[str, Any] | None = None, *, tls: bool = True) -> PyHeadscale:
        """Seeds user alice with a reusable key unless `users` (then `keys` or none) is given;
        `policy` runs in file mode; `tls=False` serves plain HTTP on port 8080."""
        over = dict(overrides or {})
        if policy is not None:
            path = self.workdir / "policy.json"
            path.write_text(json.dumps(policy))
            over["policy"] = {"mode": "file", "path": str(path)}
        srv = PyHeadscale(self.server_host, self.workdir / "server", over, start=False, tls=tls)
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


def shared_world_fixture(cls: type[W], setup: Callable[[W], None] | None = None
                         ) -> Callable[..., Iterator[W]]:
    """A module-scoped fixture: one `cls` built (and `setup` run) once for all the tests of
    a file, which run one after another on one worker (`--dist loadfile`). Its tests must
    leave the tailnet usable for the next one."""

    @pytest.fixture(scope="module")
    def fixture(module_topology: Topology, module_workdir: Path,
                module_tailscaled_factory: Callable[..., Tailscaled]) -> Iterator[W]:
        world = cls(module_topology, module_workdir, module_tailscaled_factory)
        try:
            if setup is not None:
                setup(world)
            yield world
        finally:
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


class Reach(enum.Enum):
    """How an HTTP request from a namespace ended."""

    ANSWERED = "answered"  # a response came back
    REFUSED = "refused"  # delivered, nothing listening (RST)
    DROPPED = "dropped"  # no answer within the timeout: a packet filter (or a dead path) ate it
    UNREACHABLE = "unreachable"  # no route there (ICMP unreachable / no local route)
    ERROR = "error"  # anything else (reset mid-response, bad HTTP, ...)


@dataclass(frozen=True)
class Probe:
    reach: Reach
    body: str = ""  # the response body, or the error for the other outcomes

    @property
    def answer(self) -> str | None:
        return self.body if self.reach is Reach.ANSWERED else None


# Classifies by exception, not by message text: refused, timed out and unreachable are the
# outcomes a policy test must tell apart ("blocked by policy" is DROPPED, never REFUSED).
_PROBE = r"""
import errno, http.client, socket, sys
ip, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    c = http.client.HTTPConnection(ip, port, timeout=timeout)
    c.request("GET", "/")
    r = c.getresponse()
    print("answered")
    sys.stdout.write(r.read().decode(errors="replace"))
except ConnectionRefusedError as e:
    print("refused"); print(e)
except (TimeoutError, socket.timeout) as e:
    print("dropped"); print(e)
except OSError as e:
    unreach = (errno.ENETUNREACH, errno.EHOSTUNREACH)
    print("unreachable" if e.errno in unreach else "error"); print(e)
except Exception as e:
    print("error"); print(repr(e))
"""


def probe(ns: Namespace, ip: str, port: int, timeout: float = 3) -> Probe:
    """GET http://ip:port/ from inside `ns` and say how it ended."""
    try:
        r = ns.run([sys.executable, "-c", _PROBE, ip, str(port), str(timeout)],
                   timeout=timeout + 15)
    except subprocess.TimeoutExpired:
        return Probe(Reach.DROPPED, "probe process timed out")
    kind, _, rest = r.stdout.partition("\n")
    try:
        return Probe(Reach(kind.strip()), rest.strip() if kind != "answered" else rest)
    except ValueError:
        return Probe(Reach.ERROR, (r.stdout + r.stderr)[-300:])


def interactive_up(ts: Tailscaled, server: PyHeadscale,
                    *args: str) -> tuple[subprocess.Popen[str], str]:
    """`tailscale up` without a key: returns the waiting process and the printed auth ID."""
    up = ts.host.popen([str(ts.tailscale), f"--socket={ts.socket}", "up",
                        f"--login-server={server.url}", f"--hostname={ts.host.name}",
                        "--accept-dns=false", "--timeout=90s", *args],
                       env=ts.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url_re = re.compile(re.escape(server.url) + r"/register/(hskey-authreq-[0-9a-f]+)")
    out = ""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = up.stdout.readline()  # type: ignore[union-attr]
        out += line
        if m := url_re.search(line):
            return up, m.group(1)
        if not line and up.poll() is not None:
            break
    up.kill()
    raise AssertionError(f"no register URL printed: {out}")


def metric(srv: PyHeadscale, name: str) -> float:
    """A counter or gauge from the server's /metrics (listening on its loopback)."""
    r = srv.host.run(["python3", "-c", "import urllib.request; print(urllib.request.urlopen("
                      "'http://127.0.0.1:9090/metrics', timeout=5).read().decode())"], timeout=15)
    for line in r.stdout.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics: {r.stdout[-500:]}{r.stderr[-500:]}")


def online_peers(ts: Tailscaled) -> set[str]:
    """The tailnet addresses of the peers `ts` shows online (by address, not host name: a
    client that changed owner leaves its old, logged-out node behind under the same name)."""
    peers = (ts.status_json().get("Peer") or {}).values()
    return {a for p in peers if p.get("Online") for a in p.get("TailscaleIPs") or []}


def login_name(ts: Tailscaled) -> str:
    """The login name `ts` shows for its own user profile."""
    st = ts.status_json()
    return str(st["User"][str(st["Self"]["UserID"])]["LoginName"])


def wait_mesh(nodes: list[Tailscaled], timeout: float = 60) -> None:
    """Each node lists every other online and gets a `tailscale ping` answer from each
    (every ordered pair, as Headscale's ping-all does)."""
    addrs = [ts.ip("4")[0] for ts in nodes]
    for ts, mine in zip(nodes, addrs, strict=True):
        want = set(addrs) - {mine}
        wait_for(f"{ts.host.name} to see {sorted(want)} online",
                 lambda ts=ts, want=want: want <= online_peers(ts), timeout)
    for ts, mine in zip(nodes, addrs, strict=True):
        for dst in addrs:
            if dst != mine:
                wait_for(f"{ts.host.name} to ping {dst}",
                         lambda ts=ts, dst=dst: ts.ping(dst, count=1, until_direct=False)
                         .returncode == 0, 30)
