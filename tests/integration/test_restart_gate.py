"""Official clients answered 503 by the map-session gate during a server restart come back
on their own: a map from the new process, the mesh, the same nodes, no login.

The claim (pyheadscale/control/admission.py): tailscaled takes any non-200 answer to its map
poll as a failed poll. Its map loop (Tailscale's control/controlclient, auto.go and
direct.go, the same in every pinned version) ends that poll with the error "initial fetch
failed <status>: <body>", waits its backoff (10 ms x consecutive failures squared, at most
30 s, with ±50 % jitter; a map resets it) and polls again through the same Noise client,
whose HTTP/2 connection stays open after a complete answer. The error is reported to the
local backend, which logs "Received error: ..." and carries on: nothing in that path
registers again or asks for a login. Until now only our Python client had shown the server
side of this; here every pinned official client is refused and recovers.

How the refusal is made real and certain with a handful of clients. The server runs with
`tuning.node_mapsession_open_limit: 1` and `node_mapsession_open_timeout: 1s` (the minimum).
A flood of simulated nodes alone cannot make it certain: a first map on a small tailnet is
built in about a millisecond and endpoints and host info are written later in batches, so a
poll waits a second only behind a line of thousands of requests, and whether a given
official poll waits long enough would depend on the machine's load. Instead one simulated
node (the Python test client, map_holder.py) takes the only place and keeps it the way a
real node does when the database is slow: its first poll after the restart renames it, a
write the server makes while the request holds its place, and the test holds SQLite's write
lock meanwhile (as a backup or an admin's sqlite3 would); two renames sent just before the
poll keep it waiting up to 30 s in all (map_holder.py). The official clients' connections
are reset, as by a server that is down, from before the restart until that place is taken,
so none of them can slip in first; then every poll of theirs waits 1 s and is answered 503.
Once all are refused, the test lets go of the lock. (A v1.80.3 client whose port-443 dial
fails right after another dial waits for its 10 s dial deadline before trying again: its
dialer also waits for a port-80 attempt it never started. Newer ones retry at once.)

Proved, or the test fails: for each official node, the new process logs "map request
refused" (node ID, Noise connection, reason=timeout, status=503) and its tailscaled logs the
503 it got. After the lock is released each one is admitted on a connection it was refused
on, sees the holder's new name (a map from the new process: the rename exists nowhere else),
and pings every other; the node list holds the same nodes with the same IDs and keys, no
request reached /machine/register in the new process, and no client shows a login URL.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest

from tests.integration import hsapi
from tests.integration.netns import Host
from tests.integration.server import REPO, PyHeadscale
from tests.integration.tailscale import Tailscaled
from tests.integration.versions import PINNED
from tests.integration.world import World, peers_by_name, wait_for, wait_mesh

pytestmark = pytest.mark.integration

TUNING = {"node_mapsession_open_limit": 1, "node_mapsession_open_timeout": "1s"}
# What tailscaled logs for the gate's 503 (its error text, then our answer's body).
CLIENT_SAW_503 = "initial fetch failed 503: busy opening other map sessions"
# Seconds the refusals may take once the clients reach the server: the holder keeps its place
# up to 30 s (map_holder.py), and a v1.80.3 client may wait 10 s before it dials again.
REFUSALS_WITHIN = 25.0
_GATE_LINE = re.compile(r"map request (refused|admitted)((?: \w+=\S+)*)$", re.M)


def gate_log(text: str) -> list[tuple[str, dict[str, str]]]:
    """("refused" | "admitted", fields) of each gate line of a server log."""
    return [(m[1], dict(kv.split("=", 1) for kv in m[2].split()))
            for m in _GATE_LINE.finditer(text)]


class Holder:
    """map_holder.py on its own host: it reports in JSON lines and moves on when told."""

    def __init__(self, host: Host, srv: PyHeadscale, authkey: str) -> None:
        # Its stderr goes to a file: a pipe nobody reads while it runs could fill and stall it.
        self.err_path = srv.workdir / "map_holder.err"
        with open(self.err_path, "w") as err:
            self.proc = host.popen(
                [sys.executable, "-m", "tests.integration.map_holder", srv.url, authkey],
                cwd=str(REPO), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=err, text=True, env={"SSL_CERT_FILE": str(srv.ca_file)})
        self.reports: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.reports.append(json.loads(line))

    def reported(self, key: str) -> bool:
        return any(key in r for r in self.reports)

    def report(self, key: str, timeout: float) -> Any:
        def got() -> Any:
            if self.proc.poll() is not None and not self.reported(key):
                err = self.err_path.read_text(errors="replace")
                raise AssertionError(f"map_holder exited: {err[-2000:]}")
            return next((r[key] for r in self.reports if key in r), None)
        return wait_for(f"map_holder to report {key}", got, timeout)

    def tell(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@contextmanager
def cut_off(server_host: Host, clients: list[Tailscaled]) -> Iterator[None]:
    """The clients' TCP to the server answered with a reset, as by a server that is down."""
    rules = [("-s", ts.host.ip, "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset")
             for ts in clients]
    for rule in rules:
        server_host.iptables("-I", "INPUT", *rule)
    try:
        yield
    finally:
        for rule in rules:
            server_host.iptables("-D", "INPUT", *rule)


@contextmanager
def write_locked(srv: PyHeadscale) -> Iterator[None]:
    """SQLite's write lock on the server's database, held by this process."""
    db = sqlite3.connect(srv.workdir / "db.sqlite", timeout=10, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield
    finally:
        db.close()  # rolls back: nothing was written


def requests_by_status(srv: PyHeadscale) -> dict[tuple[str, str], float]:
    """(endpoint, status) -> requests this server process has answered, from /metrics."""
    r = srv.host.run(["python3", "-c", "import urllib.request; print(urllib.request.urlopen("
                      "'http://127.0.0.1:9090/metrics', timeout=5).read().decode())"], timeout=15)
    assert r.returncode == 0, r.stderr
    out: dict[tuple[str, str], float] = {}
    for m in re.finditer(r'^http_requests_total\{(.*)\} (\S+)$', r.stdout, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m[1]))
        key = (labels["endpoint"], labels["status"])
        out[key] = out.get(key, 0.0) + float(m[2])
    return out


def identity(srv: PyHeadscale) -> dict[str, tuple[str, str]]:
    """Node ID -> (node key, machine key) of every node the server has."""
    return {str(n["id"]): (n["nodeKey"], n["machineKey"]) for n in hsapi.nodes(srv)}


def node_id(srv: PyHeadscale, name: str) -> str:
    n = hsapi.node_by_name(srv, name)
    assert n is not None, name
    return str(n["id"])


def test_official_clients_refused_by_the_gate_after_a_restart_come_back_without_login(
        world: World) -> None:
    srv = world.start_server({"tuning": TUNING, "log": {"level": "debug"}})
    nodes = [world.join(f"n{i}", v) for i, v in enumerate(PINNED)]
    wait_mesh(nodes)
    holder = Holder(world.topology.add_host("holder"), srv, world.keys["reusable"])
    try:
        holder.report("registered", 60)
        before = identity(srv)
        selves = {ts.host.name: ts.status_json()["Self"] for ts in nodes}
        ids = {node_id(srv, ts.host.name) for ts in nodes}
        holder_id = node_id(srv, "holder")
        client_mark = {ts.host.name: len(ts.log_text()) for ts in nodes}
        server_mark = 0

        def new_gate_lines() -> list[tuple[str, dict[str, str]]]:
            return gate_log(srv.log_text()[server_mark:])

        refused: dict[str, set[str]] = {}

        def all_refused() -> bool:
            refused.clear()
            for kind, f in new_gate_lines():
                if kind == "refused" and f["node"] in ids:
                    # "displaced": the client gave up on a waiting poll and sent another,
                    # which took its turn; a 503 of the gate as well.
                    assert f["reason"] in ("timeout", "displaced") and f["status"] == "503", f
                    refused.setdefault(f["node"], set()).add(f["conn"])
            return refused.keys() == ids

        with ExitStack() as locked:
            with cut_off(srv.host, nodes):
                srv.restart()
                server_mark = len(srv.log_text())
                locked.enter_context(write_locked(srv))
                holder.tell()
                holder.report("sent", 30)
                wait_for("the holder's poll to take the only place", lambda: any(
                    k == "admitted" and f["node"] == holder_id for k, f in new_gate_lines()),
                    10)
            # The clients reach the server again; the only place stays taken.
            wait_for("every official client's poll to be refused", all_refused, REFUSALS_WITHIN)
            assert not holder.reported("status"), \
                "the holder was answered before every client was refused"
        # The lock is released: the holder's rename goes through and the line moves on.
        assert holder.report("status", 30) == 200

        def admitted_where_refused() -> bool:
            first: dict[str, str] = {}  # node -> connection of its first admission
            for k, f in new_gate_lines():
                if k == "admitted":
                    first.setdefault(f["node"], f["conn"])
            return all(first.get(n) in conns for n, conns in refused.items())

        wait_for("each client to be admitted on a connection it was refused on",
                 admitted_where_refused, 60)
        for ts in nodes:
            wait_for(f"{ts.host.name} to get a map of the new process (the holder renamed)",
                     lambda ts=ts: "holder-renamed" in peers_by_name(ts.status_json()), 30)
            assert CLIENT_SAW_503 in ts.log_text()[client_mark[ts.host.name]:], ts.host.name
        wait_mesh(nodes)

        assert identity(srv) == before, "a node was added or changed its ID or keys"
        answered = requests_by_status(srv)
        refusals = sum(k == "refused" and f["node"] in ids for k, f in new_gate_lines())
        assert answered.get(("POST /machine/map", "503"), 0) >= refusals, answered
        assert not [k for k in answered if k[0] == "POST /machine/register"], answered
        for ts in nodes:
            st = ts.status_json()
            old = selves[ts.host.name]
            assert (st["Self"]["ID"], st["Self"]["PublicKey"]) == (old["ID"], old["PublicKey"])
            assert st["BackendState"] == "Running" and not st.get("AuthURL"), st
    finally:
        holder.close()
