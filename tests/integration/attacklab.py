"""The lab the attack tests share: one server process, an attacker host, official clients.

What every attack test checks comes from here: the server's RSS sampled through the attack
(`measure`), `GET /key` answering, official clients of the oldest and newest pinned versions
registering (with a key or through the web flow), seeing the anchor peer and pinging it, and
the database agreeing with what the server reports.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.integration.netns import Host, Topology
from tests.integration.seed import seed
from tests.integration.server import REPO, PyHeadscale
from tests.integration.tailscale import Tailscaled
from tests.integration.versions import NEWEST
from tests.integration.world import World, interactive_up, peers_by_name, wait_for


@dataclass
class RssSamples:
    baseline: float
    peak: float = 0.0
    samples: list[float] = field(default_factory=list)

    @property
    def growth(self) -> float:
        return self.peak - self.baseline


class Attack:
    """A running attacker process (tests/integration/attacker.py)."""

    def __init__(self, proc: subprocess.Popen[str], name: str) -> None:
        self.proc = proc
        self.name = name
        self.ready: dict[str, Any] = {}
        self.done: dict[str, Any] = {}
        self.started = time.monotonic()

    def _line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        result: list[str] = []
        t = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()),  # type: ignore[union-attr]
                             daemon=True)
        t.start()
        t.join(timeout)
        if not result or not result[0]:
            err = self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr else ""
            raise AssertionError(f"attack {self.name}: no report within {timeout}s; {err[-3000:]}")
        return dict(json.loads(result[0]))

    def wait_ready(self, timeout: float = 180) -> dict[str, Any]:
        self.ready = self._line(timeout)
        return self.ready

    def finish(self, timeout: float = 60) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.done = self._line(timeout)
        self.proc.wait(timeout=timeout)
        return self.done


class AttackLab:
    def __init__(self, workdir: Path, overrides: dict[str, Any]) -> None:
        self.workdir = workdir
        self.topo = Topology()
        self._made: list[Tailscaled] = []
        self.world = World(self.topo, workdir, self._tailscaled)
        # Start with the open-files soft limit systemd gives services; the server raises it.
        wrapper = workdir / "python-lowfd"
        self.hard_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        wrapper.write_text(f"#!/bin/sh\nexec prlimit --nofile=256:{self.hard_nofile} "
                           f"{REPO / '.venv' / 'bin' / 'python'} \"$@\"\n")
        wrapper.chmod(0o755)
        srv = PyHeadscale(self.world.server_host, workdir / "server", overrides, start=False,
                          python=wrapper)
        self.world.server = srv
        self.world.keys = seed(srv, ["alice"], {"reusable": {"user": "alice",
                                                             "reusable": True}})["keys"]
        srv.start()
        self.server = srv
        self.attacker = self.topo.add_host("attacker")
        self.anchor = self.world.join("anchor", NEWEST)
        self.anchor_ip = self.anchor.ip("4")[0]
        self.joined: list[str] = ["anchor"]
        self._n = 0

    def _tailscaled(self, host: Host, version: str, **kw: Any) -> Tailscaled:
        d = self.workdir / f"tailscaled-{host.name}-{version}"
        ts = Tailscaled(host, version, d, start=False, **kw)
        self._made.append(ts)
        ts.start()
        return ts

    def close(self) -> None:
        for ts in reversed(self._made):
            with contextlib.suppress(Exception):
                ts.close()
        self.world.close()
        self.topo.close()

    # -- the server process ----------------------------------------------------------------

    @property
    def pid(self) -> int:
        proc = self.server.proc
        assert proc is not None and proc.poll() is None, "server is not running"
        return proc.pid

    def rss_mib(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def open_files_limit(self) -> int:
        with open(f"/proc/{self.pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
        raise AssertionError("no open files limit")

    @contextlib.contextmanager
    def measure(self) -> Iterator[RssSamples]:
        """RSS sampled every 0.2 s while the block runs."""
        m = RssSamples(baseline=self.rss_mib())
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError, AssertionError):
                    m.samples.append(self.rss_mib())
                stop.wait(0.2)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            yield m
        finally:
            stop.set()
            t.join()
            m.peak = max([m.baseline, *m.samples])

    @contextlib.contextmanager
    def attack(self, name: str, *args: str) -> Iterator[Attack]:
        argv = [sys.executable, "-m", "tests.integration.attacker", name,
                "--url", self.server.url, *args]
        proc = self.attacker.popen(argv, cwd=str(REPO), stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={"SSL_CERT_FILE": str(self.server.ca_file),
                                        "PYTHONPATH": str(REPO)})
        a = Attack(proc, name)
        try:
            yield a
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)

    # -- what must keep working ------------------------------------------------------------

    def key_answers(self, timeout: float = 10) -> None:
        started = time.monotonic()
        status, body = self.server.http_get("/key?v=113", timeout=timeout)
        assert status == 200 and b"publicKey" in body, (status, body[:200])
        assert time.monotonic() - started < timeout

    def _host(self, prefix: str) -> Host:
        self._n += 1
        return self.topo.add_host(f"{prefix}{self._n}")

    def _sees_anchor_and_pings(self, ts: Tailscaled, name: str) -> None:
        wait_for(f"{name} to list the anchor",
                 lambda: "anchor" in peers_by_name(ts.status_json()), timeout=20)
        wait_for(f"the anchor to list {name}",
                 lambda: name in peers_by_name(self.anchor.status_json()), timeout=20)
        r = ts.ping(self.anchor_ip, count=10, until_direct=False)
        assert r.returncode == 0 and "pong from" in r.stdout, f"{name}: {r.stdout}{r.stderr}"
        self.joined.append(name)

    def official_joins(self, version: str) -> Tailscaled:
        """A new official client registers with the pre-auth key, sees peers and pings."""
        host = self._host("ok")
        ts = self.world.join(host.name, version, host=host)
        self._sees_anchor_and_pings(ts, host.name)
        return ts

    def web_registers(self, version: str) -> Tailscaled:
        """A user's web registration: `tailscale up` without a key, then the admin runs
        `headscale auth register` with the ID from the register URL."""
        host = self._host("web")
        ts = self.world.add_client(host.name, version, host=host)
        srv = self.server
        up, auth_id = interactive_up(ts, srv)
        time.sleep(1.0)  # the client is now waiting on its Followup
        r = srv.cli("auth", "register", "--auth-id", auth_id, "--user", "alice")
        assert r.returncode == 0, f"auth register: {r.stdout}{r.stderr}"
        assert up.wait(timeout=90) == 0, up.stdout.read() if up.stdout else ""
        ts.wait_state("Running", timeout=30)
        ts.wait_tun_address()
        self._sees_anchor_and_pings(ts, host.name)
        return ts

    def stored_hostinfo(self, node_id: int) -> Any:
        db_path = self.server.config["database"]["sqlite"]["path"]
        with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT host_info FROM nodes WHERE id = ?", (node_id,)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def db_agrees(self) -> None:
        db_agrees(self.server, self.joined)


def db_agrees(server: PyHeadscale, joined: list[str]) -> None:
    """What the server reports (memory) is what its database holds, and every node whose
    registration was acknowledged (`joined`, by given name) is in both."""
    listed = server.cli_json("nodes", "list")
    db_path = server.config["database"]["sqlite"]["path"]
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT id, given_name, ipv4, ipv6, hostname FROM nodes").fetchall()
    memory = sorted((int(n["id"]), n["givenName"], sorted(n["ipAddresses"])) for n in listed)
    stored = sorted((int(r[0]), r[1], sorted(a for a in (r[2], r[3]) if a)) for r in rows)
    assert memory == stored, f"memory {memory}\n!= database {stored}"
    names = {n["givenName"] for n in listed}
    missing = [n for n in joined if n not in names]
    assert not missing, f"acknowledged registrations missing: {missing}"
