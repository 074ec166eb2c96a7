"""The control plane judged by official clients: join, peers, ping, MagicDNS,
presence, server restart, logout/login and refused keys."""

from __future__ import annotations

import itertools
import json
import time

import pytest

from tests.integration.tailscale import Tailscaled
from tests.integration.versions import PINNED
from tests.integration.world import BASE_DOMAIN, World, dns, peers_by_name, wait_for

__all__ = ["BASE_DOMAIN", "World", "dns", "peers_by_name", "wait_for"]

pytestmark = pytest.mark.integration

def test_mixed_versions_see_each_other_and_ping(world: World) -> None:
    world.start_server()
    names = [f"n{i}" for i in range(len(PINNED))]
    for name, version in zip(names, PINNED, strict=True):
        world.join(name, version)
    ips = {n: world.nodes[n].ip() for n in names}

    for name in names:
        def listed(name: str = name) -> bool:
            peers = peers_by_name(world.nodes[name].status_json())
            return all(
                o in peers and peers[o]["DNSName"] == f"{o}.{BASE_DOMAIN}."
                and sorted(peers[o]["TailscaleIPs"]) == sorted(ips[o])
                for o in names if o != name
            )
        wait_for(f"{name} to list its peers with names and IPs", listed, timeout=10)

    for a, b in itertools.permutations(names, 2):
        r = world.nodes[a].ping(ips[b][0], count=10, until_direct=False)
        assert r.returncode == 0 and "pong from" in r.stdout, f"{a} -> {b}: {r.stdout}{r.stderr}"


def test_magicdns_resolves_peers_and_extra_records(world: World) -> None:
    world.start_server({"dns": {"extra_records": [
        {"name": f"db.{BASE_DOMAIN}", "type": "A", "value": "100.64.99.1"}]}})
    a = world.join("alpha", PINNED[0])
    b = world.join("bravo", PINNED[-1])
    b_ips = b.ip()
    b_v4 = [ip for ip in b_ips if ":" not in ip]
    wait_for("bravo's name to resolve on alpha",
             lambda: dns(a.host, f"bravo.{BASE_DOMAIN}") == b_v4, timeout=10)
    wait_for("alpha's name to resolve on bravo",
             lambda: dns(b.host, f"alpha.{BASE_DOMAIN}") == [
                 ip for ip in a.ip() if ":" not in ip], timeout=10)
    assert dns(a.host, f"db.{BASE_DOMAIN}") == ["100.64.99.1"]
    # No address for a name nobody has (the client answers NXDOMAIN or SERVFAIL, depending
    # on whether it manages the OS resolver).
    assert dns(a.host, f"nosuch.{BASE_DOMAIN}") in (["NXDOMAIN"], ["RCODE 2"])


def test_extra_records_path_is_watched(world: World) -> None:
    records = world.workdir / "extra-records.json"
    records.write_text(json.dumps([{"name": f"svc.{BASE_DOMAIN}", "type": "A",
                                    "value": "100.64.50.1"}]))
    world.start_server({"dns": {"extra_records_path": str(records)}})
    a = world.join("alpha", PINNED[1])
    wait_for("the file's record to resolve",
             lambda: dns(a.host, f"svc.{BASE_DOMAIN}") == ["100.64.50.1"], timeout=10)
    records.write_text(json.dumps([{"name": f"svc.{BASE_DOMAIN}", "type": "A",
                                    "value": "100.64.50.2"}]))
    wait_for("the edited record to resolve without a restart",
             lambda: dns(a.host, f"svc.{BASE_DOMAIN}") == ["100.64.50.2"], timeout=15)
    assert world.server is not None and world.server.running


def test_presence_new_node_offline_and_back(world: World) -> None:
    world.start_server()
    a = world.join("alpha", PINNED[0])
    b = world.join("bravo", PINNED[1])
    wait_for("alpha to see bravo", lambda: "bravo" in peers_by_name(a.status_json()), 10)

    c = world.add_client("charlie", PINNED[-1])
    r = c.up(world.server.url, authkey=world.keys["reusable"], hostname="charlie")  # type: ignore[union-attr]
    assert r.returncode == 0, r.stderr
    joined = time.monotonic()
    for ts in (a, b):
        wait_for(f"{ts.host.name} to see charlie online",
                 lambda ts=ts: peers_by_name(ts.status_json()).get("charlie", {}).get("Online"),
                 timeout=3)
    assert time.monotonic() - joined < 3.5

    b.kill()
    wait_for("alpha to see bravo offline",
             lambda: peers_by_name(a.status_json()).get("bravo", {}).get("Online") is False,
             timeout=60)
    b.restart()
    wait_for("alpha to see bravo online again",
             lambda: peers_by_name(a.status_json()).get("bravo", {}).get("Online") is True,
             timeout=60)


def test_server_restart_clients_reconnect_with_same_identity(world: World) -> None:
    srv = world.start_server()
    nodes = [world.join(f"n{i}", v) for i, v in enumerate(PINNED)]
    before = {ts.host.name: ts.status_json()["Self"] for ts in nodes}

    srv.restart()

    for ts in nodes:
        def reconnected(ts: Tailscaled = ts) -> bool:
            st = ts.status_json()
            peers = peers_by_name(st)
            return (st["BackendState"] == "Running" and len(peers) == len(nodes) - 1
                    and all(p.get("Online") for p in peers.values()))
        wait_for(f"{ts.host.name} to reconnect and see its peers online", reconnected, 90)
        me = ts.status_json()["Self"]
        old = before[ts.host.name]
        assert (me["ID"], me["DNSName"], me["TailscaleIPs"]) == (
            old["ID"], old["DNSName"], old["TailscaleIPs"])
        assert not ts.status_json().get("AuthURL")
    r = nodes[0].ping(nodes[-1].ip()[0], count=10, until_direct=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_logout_login_keeps_identity_and_bad_keys_are_refused(world: World) -> None:
    world.start_server(keys={
        "reusable": {"user": "alice", "reusable": True},
        "expired": {"user": "alice", "reusable": True, "expires_in": -60},
        "single": {"user": "alice"},
    })
    a = world.join("alpha", PINNED[0])
    me = a.status_json()["Self"]
    r = a.logout()
    assert r.returncode == 0, r.stderr
    r = a.up(world.server.url, authkey=world.keys["reusable"], hostname="alpha",  # type: ignore[union-attr]
             extra_args=("--reset",))
    assert r.returncode == 0, r.stderr
    again = a.status_json()["Self"]
    assert (again["ID"], again["DNSName"], again["TailscaleIPs"]) == (
        me["ID"], me["DNSName"], me["TailscaleIPs"])

    # The single-use key is spent by one machine; another machine presenting it is refused.
    world.join("bravo", PINNED[1], key="single")
    refused = {
        "expired": "authkey expired",
        "single": "authkey already used",
    }
    for i, (label, reason) in enumerate(refused.items()):
        c = world.add_client(f"bad{i}", PINNED[-1])
        r = c.up(world.server.url, authkey=world.keys[label], hostname=f"bad{i}", timeout=30)  # type: ignore[union-attr]
        assert r.returncode != 0 and reason in r.stdout + r.stderr, (label, r.stdout, r.stderr)
    c = world.add_client("bad9", PINNED[-1])
    bogus = "hskey-auth-000000000000-" + "0" * 64
    r = c.up(world.server.url, authkey=bogus, hostname="bad9", timeout=30)  # type: ignore[union-attr]
    assert r.returncode != 0 and "invalid pre auth key" in r.stdout + r.stderr, r.stderr
