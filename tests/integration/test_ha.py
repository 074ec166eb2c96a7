"""High availability judged by official clients: two pyheadscale instances on one PostgreSQL
behind HAProxy (tests/integration/ha.py), clients of the oldest and newest pinned versions on
both.

One lab serves the whole module (starting PostgreSQL, two instances, HAProxy and four clients
takes a while); the tests run in file order and each leaves the lab as it found it, except
the last two, which kill an instance and add 200 nodes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.integration.conftest import _WORKDIR
from tests.integration.derp_helpers import ping_paths, wait_peer
from tests.integration.ha import API_WRITER, BASE_DOMAIN, HALab
from tests.integration.netns import Topology
from tests.integration.server import VENV_PYTHON
from tests.integration.test_policy import control_activity, fetch
from tests.integration.versions import NEWEST, OLDEST
from tests.integration.world import dns, serve_echo, wait_for

pytestmark = pytest.mark.integration

# Client host -> (version, the instance the load balancer sends it to first).
CLIENTS = {"c1": (OLDEST, "inst1"), "c2": (NEWEST, "inst1"),
           "c3": (OLDEST, "inst2"), "c4": (NEWEST, "inst2")}


@pytest.fixture(scope="module")
def lab(netns_ready: None, clients_built: dict[str, Path],
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[HALab]:
    topo = Topology()
    try:
        lab = HALab(topo, tmp_path_factory.mktemp("ha"),
                    {name: inst for name, (_, inst) in CLIENTS.items()})
        try:
            for name, (version, _) in CLIENTS.items():
                lab.join(name, version)
            yield lab
        finally:
            lab.close()
    finally:
        topo.close()


@pytest.fixture(autouse=True)
def _keep_logs(request: pytest.FixtureRequest, lab: HALab) -> None:
    # A failing test keeps the lab's logs (servers, clients, HAProxy) like other tests do.
    request.node.stash[_WORKDIR] = lab.workdir


def _users(lab: HALab, inst: str) -> set[str]:
    return {u["name"] for u in lab.cli_json(inst, "users", "list")}


def _reach(lab: HALab, src: str, dst: str, port: int = 80, timeout: float = 1) -> str | None:
    return fetch(lab.client_hosts[src], lab.ip(dst), port, timeout)


def test_clients_on_both_instances_mesh_resolve_and_obey_a_policy_set_on_the_other(
        lab: HALab) -> None:
    assert wait_for("sessions on their preferred instances", lambda: lab.holders() == {
        name: inst for name, (_, inst) in CLIENTS.items()}, 20)
    ips = {name: lab.ip(name) for name in CLIENTS}
    for src in CLIENTS:
        for dst in CLIENTS:
            if src != dst:
                wait_peer(lab.nodes[src], ips[dst], timeout=30)
    for src, dst in (("c1", "c3"), ("c4", "c2"), ("c2", "c4"), ("c3", "c1")):
        paths, out = ping_paths(lab.nodes[src], ips[dst], count=2)
        assert paths, out
    # MagicDNS names of nodes held by the other instance resolve through 100.100.100.100.
    assert dns(lab.client_hosts["c1"], f"c4.{BASE_DOMAIN}") == [ips["c4"]]
    assert dns(lab.client_hosts["c3"], f"c2.{BASE_DOMAIN}") == [ips["c2"]]

    for name in ("c1", "c4"):
        serve_echo(lab.client_hosts[name], ips[name], [80], "{port}")
    assert wait_for("c3 -> c4:80", lambda: _reach(lab, "c3", "c4"), 20) == f"80 {ips['c3']}"
    assert wait_for("c2 -> c4:80", lambda: _reach(lab, "c2", "c4"), 20) == f"80 {ips['c2']}"
    # A policy set through instance 1's CLI: only c1 and c2 (held by instance 1) may open
    # connections. c4 (on instance 2) must drop c3's within 3 s.
    policy = {"acls": [{"action": "accept", "src": [ips["c1"], ips["c2"]], "dst": ["*:*"]}]}
    path = lab.workdir / "policy-narrow.json"
    path.write_text(json.dumps(policy))
    before = {n: control_activity(lab.nodes[n]) for n in CLIENTS}
    r = lab.cli("inst1", "policy", "set", "-f", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    t0 = time.monotonic()
    wait_for("c3 -> c4:80 to be dropped", lambda: _reach(lab, "c3", "c4") is None, 3,
               interval=0.05)
    enforced = time.monotonic() - t0
    print(f"policy set on instance 1 enforced on instance 2 after {enforced:.2f} s")
    assert enforced <= 3.0
    assert _reach(lab, "c2", "c4", timeout=2) == f"80 {ips['c2']}"
    assert _reach(lab, "c4", "c1", timeout=2) is None
    # Enforced through the open map sessions: no client logged in or polled again.
    assert {n: control_activity(lab.nodes[n]) for n in CLIENTS} == before
    r = lab.cli("inst2", "policy", "get")
    assert r.returncode == 0 and json.loads(r.stdout) == policy, r.stdout + r.stderr
    allow_all = lab.workdir / "policy-open.json"
    allow_all.write_text(json.dumps({"acls": [{"action": "accept", "src": ["*"],
                                               "dst": ["*:*"]}]}))
    assert lab.cli("inst2", "policy", "set", "-f", str(allow_all)).returncode == 0
    wait_for("c3 -> c4:80 again", lambda: _reach(lab, "c3", "c4"), 10)


def test_udp_blocked_clients_on_different_instances_relay_through_the_meshed_relays(
        lab: HALab) -> None:
    # Each client's DERP home is its own instance's relay (first node of the region in
    # the map that instance sends).
    wait_for("c1 on relay 1", lambda: lab.derp_peer("c1") == {"inst1"}, 30)
    wait_for("c3 on relay 2", lambda: lab.derp_peer("c3") == {"inst2"}, 30)
    h1, h3 = lab.client_hosts["c1"], lab.client_hosts["c3"]
    lab.topology.block_udp(h1, h3)
    try:
        ip1, ip3 = lab.ip("c1"), lab.ip("c3")
        for src, dst in (("c1", ip3), ("c3", ip1)):
            paths, out = ping_paths(lab.nodes[src], dst, count=3, until_direct=False)
            assert paths and all(p.startswith("DERP(") for p in paths), out
        serve_echo(h3, ip3, [8080], "relayed")
        got = wait_for("c1 -> c3:8080 over the relays",
                         lambda: fetch(h1, ip3, 8080, timeout=3), 30)
        assert got == f"relayed {ip1}"
        # Still one relay each: packets went relay 1 -> mesh -> relay 2 and back.
        assert lab.derp_peer("c1") == {"inst1"} and lab.derp_peer("c3") == {"inst2"}
    finally:
        lab.topology.unblock_udp(h1, h3)


def test_postgres_restart_loses_no_acknowledged_write_and_refuses_writes_whole_meanwhile(
        lab: HALab) -> None:
    apikey = lab.cli("inst1", "apikeys", "create", "--expiration", "1h").stdout.strip()
    assert apikey.startswith("hskey-api-"), apikey
    writer_host = lab.client_hosts["c4"]
    writer = writer_host.popen(
        [str(VENV_PYTHON), str(API_WRITER), f"https://{lab.lb.ip}", apikey, "w", "20"],
        env={"SSL_CERT_FILE": str(lab.ca.ca_cert)}, stdout=-1, stderr=-1, text=True)
    time.sleep(4)
    lab.pg.pause("fast")
    paused = time.monotonic()
    try:
        # Tunnels keep working, and a client that restarts gets its map from memory: its
        # instance's other sessions learn its new disco key at once (the other instance
        # once the database is back).
        ip1, ip3, ip4 = lab.ip("c1"), lab.ip("c3"), lab.ip("c4")
        paths, out = ping_paths(lab.nodes["c1"], ip4, count=2, until_direct=False)
        assert paths, out
        c2 = lab.nodes["c2"]
        c2.restart()
        c2.wait_state("Running", timeout=30)
        wait_peer(c2, ip3, timeout=30)
        paths, out = ping_paths(c2, ip1, count=2, until_direct=False)
        assert paths, out
        time.sleep(max(0.0, 6 - (time.monotonic() - paused)))
    finally:
        lab.pg.resume()
    stdout, stderr = writer.communicate(timeout=60)
    results = json.loads(stdout.strip().splitlines()[-1])
    statuses = {status for _, status, _ in results}
    assert statuses <= {200, 503}, results
    acked = [name for name, status, _ in results if status == 200]
    refused = [(name, body) for name, status, body in results if status == 503]
    assert refused and acked, results
    assert all("database" in body for _, body in refused), refused
    # Both instances reconnect by themselves; every acknowledged user is there, none of the
    # refused ones is, in the database and in each instance's memory.
    with lab.engine.connect() as c:
        stored = {str(n) for (n,) in c.execute(text("SELECT name FROM users"))}
    assert set(acked) <= stored and not {n for n, _ in refused} & stored
    marker = f"after-{int(time.time())}"
    wait_for("a write through instance 2",
               lambda: lab.cli("inst2", "users", "create", marker).returncode == 0, 30)
    for inst in ("inst1", "inst2"):
        wait_for(f"{inst} to hold the marker", lambda inst=inst: marker in _users(lab, inst),
                   15)
        names = _users(lab, inst)
        assert set(acked) <= names and not {n for n, _ in refused} & names
    # What the restarted client reported meanwhile reached the other instance's clients.
    paths, out = ping_paths(lab.nodes["c3"], lab.ip("c2"), count=2, until_direct=False)
    assert paths, out


def test_sigkill_of_an_instance_moves_its_clients_to_the_other_without_reauth(
        lab: HALab) -> None:
    ips = {name: lab.ip(name) for name in CLIENTS}
    logins = {n: control_activity(lab.nodes[n])[0] for n in CLIENTS}
    wait_for("sessions back on their preferred instances", lambda: lab.holders() == {
        name: inst for name, (_, inst) in CLIENTS.items()}, 30)
    killed = time.monotonic()
    lab.servers["inst1"].kill()
    for name in CLIENTS:
        lab.nodes[name].wait_state("Running", timeout=30)
    wait_for("every session on instance 2",
               lambda: lab.holders() == {n: "inst2" for n in CLIENTS}, 30)
    failover = time.monotonic() - killed
    print(f"every client Running on instance 2, {failover:.1f} s after the SIGKILL")
    assert failover <= 30
    assert {name: lab.ip(name) for name in CLIENTS} == ips
    for src, dst in (("c1", "c3"), ("c2", "c1"), ("c4", "c2")):
        paths, out = ping_paths(lab.nodes[src], ips[dst], count=2, until_direct=False)
        assert paths, out
    # Same node keys and identities: nobody registered again.
    assert {n: control_activity(lab.nodes[n])[0] for n in CLIENTS} == logins

    # The killed instance comes back and rejoins: it sees what was written meanwhile and
    # its writes reach the other.
    lab.cli("inst2", "users", "create", "while-down")
    lab.servers["inst1"].start(timeout=60)
    wait_for("two instances", lambda: lab.instance_count() == 2, 30)
    assert "while-down" in _users(lab, "inst1")
    assert lab.cli("inst1", "users", "create", "after-rejoin").returncode == 0
    wait_for("instance 2 to see it", lambda: "after-rejoin" in _users(lab, "inst2"), 10)


def test_200_concurrent_registrations_on_two_instances_get_distinct_addresses_and_names(
        lab: HALab) -> None:
    before = len(lab.cli_json("inst1", "nodes", "list"))
    procs = [lab.register_many(lab.client_hosts["c1"], "inst1", 100, "load"),
             lab.register_many(lab.client_hosts["c3"], "inst2", 100, "load")]
    for p in procs:
        out, err = p.communicate(timeout=300)
        result = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        assert result.get("ok") == 100, (result, err[-2000:])
    for inst in ("inst1", "inst2"):
        wait_for(f"{inst} to hold every node", lambda inst=inst: len(
            lab.cli_json(inst, "nodes", "list")) == before + 200, 30)
        nodes = lab.cli_json(inst, "nodes", "list")
        assert sum(1 for n in nodes if n["name"] == "load") == 200
        v4 = [a for n in nodes for a in n["ipAddresses"] if ":" not in a]
        v6 = [a for n in nodes for a in n["ipAddresses"] if ":" in a]
        assert len(set(v4)) == len(v4) == before + 200
        assert len(set(v6)) == len(v6) == before + 200
        assert len({n["givenName"] for n in nodes}) == before + 200
    with lab.engine.connect() as c:
        rows = c.execute(text("SELECT ipv4, ipv6, given_name FROM nodes")).all()
    assert len(rows) == before + 200
    assert len({r[0] for r in rows}) == len({r[1] for r in rows}) == len(
        {r[2] for r in rows}) == len(rows)
