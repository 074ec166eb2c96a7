"""Headscale's general scenarios (integration/general_test.go) on one tailnet of official
clients: ping every node by address and by name, Taildrop within a user (and not across users
or to/from tagged devices), and a hostname changed on the client followed by the server and
the peers.

Nodes: three per user (user1, user2), one per pinned version, joined with pre-auth keys, plus
`tagged` (tag:server, a key of user1's). Addresses are allocated at random, as Headscale's
ping-all does, so nothing may depend on 100.64.0.1 being the first node.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.integration import hsapi
from tests.integration.server import http_get_from
from tests.integration.tailscale import Tailscaled
from tests.integration.versions import PINNED
from tests.integration.world import (
    BASE_DOMAIN,
    World,
    peers_by_name,
    shared_world_fixture,
    wait_for,
)

pytestmark = pytest.mark.integration

METRICS = "http://127.0.0.1:9090"  # the harness's metrics listener, in the server's netns
USER1 = [f"u1-{i}" for i in range(len(PINNED))]
USER2 = [f"u2-{i}" for i in range(len(PINNED))]
TAGGED = "tagged"
POLICY = {"tagOwners": {"tag:server": ["user1@"]},
          "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}


def _boot(world: World) -> None:
    world.start_server({"prefixes": {"allocation": "random"}}, keys={
        "user1": {"user": "user1", "reusable": True},
        "user2": {"user": "user2", "reusable": True},
        "server": {"user": "user1", "reusable": True, "tags": ["tag:server"]},
    }, users=["user1", "user2"], policy=POLICY)
    for names, key in ((USER1, "user1"), (USER2, "user2")):
        for name, version in zip(names, PINNED, strict=True):
            world.join(name, version, key)
    world.join(TAGGED, PINNED[-1], "server")


lab = shared_world_fixture(World, _boot)
ALL = [*USER1, *USER2, TAGGED]


def _ping_all(world: World, targets: dict[str, list[str]]) -> None:
    """Every node `tailscale ping`s every other node at each of its targets (Headscale's
    assertPingAll: every ordered pair); the senders work in parallel."""
    def from_one(a: str) -> None:
        for b in ALL:
            for dst in targets[b] if b != a else ():
                wait_for(f"{a} to ping {b} at {dst}",
                         lambda dst=dst: world.nodes[a].ping(dst, count=1, until_direct=False)
                         .returncode == 0, 30)
    with ThreadPoolExecutor(len(ALL)) as pool:
        list(pool.map(from_one, ALL))


def _server_online(world: World) -> dict[str, bool]:
    assert world.server is not None
    return {n["name"]: bool(n.get("online")) for n in hsapi.nodes(world.server)}


def test_ping_all_by_ip(lab: World) -> None:
    """TestPingAllByIP: every node is online at the server and at every peer, and every node
    pings every other at each of its addresses (IPv4 and IPv6)."""
    assert lab.server is not None
    status, body = http_get_from(lab.server.host, METRICS + "/debug/batcher", timeout=10)
    assert status == 200 and f"Summary: {len(ALL)} connected, {len(ALL)} total".encode() in body
    addrs = {n: lab.nodes[n].ip() for n in ALL}
    assert all(len(a) == 2 for a in addrs.values()), addrs
    for name in ALL:
        others = {o for o in ALL if o != name}
        wait_for(f"{name} to see every peer online",
                 lambda name=name, others=others: all(
                     p.get("Online") for n, p in peers_by_name(lab.nodes[name].status_json())
                     .items() if n in others) and others <= set(
                         peers_by_name(lab.nodes[name].status_json())), 30)
    _ping_all(lab, addrs)


def test_ping_all_by_hostname(lab: World) -> None:
    """TestPingAllByHostname: every node pings every other by its MagicDNS name."""
    _ping_all(lab, {n: [f"{n}.{BASE_DOMAIN}."] for n in ALL})  # FQDNs, as DNSName shows


def test_ping_all_by_ip_many_up_down(lab: World) -> None:
    """TestPingAllByIPManyUpDown: three rounds of every node going down at once (the server
    shows them all offline) and up again (all online), each followed by a ping of every
    address of every other node."""
    assert lab.server is not None
    url = lab.server.url
    addrs = {n: lab.nodes[n].ip() for n in ALL}
    with ThreadPoolExecutor(len(ALL)) as pool:
        for _ in range(3):
            for r in pool.map(lambda n: lab.nodes[n].down(), ALL):
                assert r.returncode == 0, r.stderr
            wait_for("the server to show every node offline",
                     lambda: not any(_server_online(lab).values()), 60)
            for r in pool.map(lambda n: lab.nodes[n].cli(
                    "up", f"--login-server={url}", f"--hostname={n}", "--accept-dns=false"),
                    ALL):
                assert r.returncode == 0, r.stderr
            wait_for("the server to show every node online",
                     lambda: all(_server_online(lab).values()), 60)
            _ping_all(lab, addrs)


def _targets(ts: Tailscaled) -> set[str] | None:
    """The host names `tailscale file cp --targets` lists (None when the command fails)."""
    r = ts.cli("file", "cp", "--targets")
    if r.returncode != 0:
        return None
    return {line.split("\t")[1].split(".")[0] for line in r.stdout.splitlines() if "\t" in line}


def _send(src: Tailscaled, dst: str, path: Path) -> bool:
    r = src.cli("file", "cp", str(path), f"{dst}.{BASE_DOMAIN}.:", timeout=60)
    return r.returncode == 0


def _receive(ts: Tailscaled, into: Path) -> set[str]:
    """Empty the node's Taildrop inbox into `into` (`tailscale file get`); the names there."""
    into.mkdir(parents=True, exist_ok=True)
    ts.cli("file", "get", "--conflict=overwrite", str(into), timeout=60)
    return {p.name for p in into.iterdir()}


def test_taildrop_within_a_user_only(lab: World) -> None:
    """TestTaildrop: each user's nodes list exactly their own user's other nodes as targets;
    the tagged node lists none; files go between every ordered pair of user1's nodes (all
    three versions), and neither across users nor to or from the tagged node."""
    for group in (USER1, USER2):
        for name in group:
            want = set(group) - {name}
            wait_for(f"{name}'s file targets to be {sorted(want)}",
                     lambda name=name, want=want: _targets(lab.nodes[name]) == want, 30)
    assert _targets(lab.nodes[TAGGED]) in (set(), None)

    outbox = lab.workdir / "taildrop-out"
    outbox.mkdir(exist_ok=True)
    for src, dst in itertools.permutations(USER1, 2):
        f = outbox / f"from-{src}-to-{dst}.txt"
        f.write_text(f"{src} -> {dst}\n")
        wait_for(f"{src} to send a file to {dst}", lambda src=src, dst=dst, f=f:
                 _send(lab.nodes[src], dst, f), 30)
    for dst in USER1:
        got = wait_for(f"{dst} to receive a file from each other user1 node", lambda dst=dst: (
            names if len(names := _receive(lab.nodes[dst], lab.workdir / "in" / dst)) == 2
            else None), 30)
        assert got == {f"from-{s}-to-{dst}.txt" for s in USER1 if s != dst}
        for s in USER1:
            if s != dst:
                body = (lab.workdir / "in" / dst / f"from-{s}-to-{dst}.txt").read_text()
                assert body == f"{s} -> {dst}\n"

    # The refused transfers: the same sender/receiver machinery just worked.
    for src, dst in ((USER1[0], USER2[0]), (TAGGED, USER1[0]), (USER1[0], TAGGED)):
        f = outbox / f"refused-{src}-to-{dst}.txt"
        f.write_text("no\n")
        assert not _send(lab.nodes[src], dst, f), f"{src} sent a file to {dst}"
        assert f.name not in _receive(lab.nodes[dst], lab.workdir / "in" / dst)


def test_update_hostname_from_client(lab: World) -> None:
    """TestUpdateHostnameFromClient: `tailscale set --hostname` with awkward names is kept raw
    as the node's name and sanitised (Tailscale's dnsname.SanitizeHostname) into its given
    name; an admin rename changes the DNS name every client shows while the host name stays;
    a later client rename changes the host name and keeps the admin's given name. Runs last:
    it renames user2's nodes."""
    srv = lab.server
    assert srv is not None
    # Tailscale's SanitizeHostname: lower case, ' ', '.', '@', '_' become '-', others dropped.
    wanted = {USER2[0]: ("Joe's Mac mini", "joes-mac-mini"),
              USER2[1]: ("Test@Host", "test-host"),
              USER2[2]: ("mail.server", "mail-server")}
    ids: dict[str, str] = {}
    for name in USER2:
        ids[name] = str(lab.nodes[name].status_json()["Self"]["ID"])
        r = lab.nodes[name].cli("set", f"--hostname={wanted[name][0]}")
        assert r.returncode == 0, r.stderr

    def server_names() -> dict[str, tuple[str, str]]:
        return {str(n["id"]): (n["name"], n["givenName"])
                for n in srv.cli_json("nodes", "list") or []}

    wait_for("the server to take the new host names", lambda: all(
        server_names().get(ids[n]) == wanted[n] for n in USER2), 20)

    for name in USER2:
        r = srv.cli("nodes", "rename", f"{ids[name]}-givenname", "--identifier", ids[name])
        assert r.returncode == 0, r.stdout + r.stderr

    def everyone_sees_renames() -> bool:
        for viewer in ALL:
            st = lab.nodes[viewer].status_json()
            seen = {str(p["ID"]): p for p in (st.get("Peer") or {}).values()}
            seen[str(st["Self"]["ID"])] = st["Self"]
            for name in USER2:
                p = seen.get(ids[name])
                if p is None or p["DNSName"] != f"{ids[name]}-givenname.{BASE_DOMAIN}." \
                        or p["HostName"] != wanted[name][0]:
                    return False
        return True

    wait_for("every client to show the admin's names and the raw host names",
             everyone_sees_renames, 40)

    for name in USER2:
        r = lab.nodes[name].cli("set", f"--hostname={wanted[name][0]}NEW")
        assert r.returncode == 0, r.stderr
    wait_for("the server to take the second host names and keep the given names", lambda: all(
        server_names().get(ids[n]) == (wanted[n][0] + "NEW", f"{ids[n]}-givenname")
        for n in USER2), 20)
    wait_for("the peers to show the second host names", lambda: all(
        {str(p["ID"]): p["HostName"] for p in
         (lab.nodes[USER1[0]].status_json().get("Peer") or {}).values()}.get(ids[n])
        == wanted[n][0] + "NEW" for n in USER2), 30)


def test_disable_node_expiry(lab: World) -> None:
    """TestDisableNodeExpiry: an expiry an hour ahead is set, then disabled; the CLI answers
    with the expiry and then without one, and every peer shows the node not expired."""
    srv = lab.server
    assert srv is not None
    name = USER1[0]
    at = (datetime.now(UTC) + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    assert hsapi.expire(srv, name, expiry=at).get("expiry")
    node = hsapi.expire(srv, name, disable=True)
    assert node.get("expiry") in (None, "", "0001-01-01T00:00:00Z"), node
    key = node["nodeKey"]
    for viewer in ALL:
        if viewer == name:
            continue
        wait_for(f"{viewer} to show {name} present and not expired", lambda viewer=viewer: (
            (p := (lab.nodes[viewer].status_json().get("Peer") or {}).get(key)) is not None
            and not p.get("Expired") and not p.get("KeyExpiry")), 30)


def test_deleting_an_online_node(lab: World) -> None:
    """Test2118DeletingOnlineNodePanics: an admin deletes a node that is online; the server
    lists every other node, still online, the peers drop it, and the tailnet goes on."""
    srv = lab.server
    assert srv is not None
    victim = lab.nodes[USER2[0]]
    vid, vip = str(victim.status_json()["Self"]["ID"]), victim.ip("4")[0]
    before = {str(n["id"]): n for n in hsapi.nodes(srv)}
    assert before[vid]["online"] is True and len(before) == len(ALL)
    r = srv.cli("nodes", "delete", "--identifier", vid, "--output", "json", "--force")
    assert r.returncode == 0, r.stdout + r.stderr
    after = wait_for("the node to be gone from the list", lambda: (
        a if vid not in (a := {str(n["id"]): n for n in hsapi.nodes(srv)}) else None), 10)
    assert set(after) == set(before) - {vid}
    assert all(n["online"] for n in after.values()), after
    wait_for("the peers to drop the deleted node", lambda: all(
        vip not in {a for p in (lab.nodes[n].status_json().get("Peer") or {}).values()
                    for a in p.get("TailscaleIPs") or []} for n in USER1), 30)
    a, b = lab.nodes[USER1[0]], lab.nodes[USER1[1]]
    assert a.ping(b.ip("4")[0], count=1, until_direct=False).returncode == 0
