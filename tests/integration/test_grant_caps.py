"""Headscale's grant_cap_test.go with official clients: app-cap grants that clients act on.

TestGrantCapDrive: `nodeAttrs` give every node drive:share and drive:access; a `cap/drive`
grant lets the rw client read and write the sharer's Taildrive shares, another the ro client
only read; the fourth node has no grant. What each node's netmap carries is checked first (self
CapMap, the cap entries of its packet filter, the companion `cap/drive-sharer` on the
sources), then the WebDAV answers the sharer gives through each client's Taildrive proxy.
TestGrantCapRelay: a `cap/relay` grant makes a third node the peer relay of two clients that
cannot reach each other directly.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.tailscale import Tailscaled
from tests.integration.versions import MIDDLE, NEWEST, OLDEST
from tests.integration.world import World, wait_for, wait_mesh

pytestmark = pytest.mark.integration

CAP_DRIVE = "tailscale.com/cap/drive"
CAP_DRIVE_SHARER = "tailscale.com/cap/drive-sharer"
ROLES = {"sharer": NEWEST, "rwclient": OLDEST, "roclient": MIDDLE, "noaccess": NEWEST}
TAGS = {"sharer": "tag:sharer", "rwclient": "tag:rw-client", "roclient": "tag:ro-client",
        "noaccess": "tag:no-access"}
ALL = [TAGS[r] for r in ROLES]


def drive_policy() -> dict[str, Any]:
    return {
        "tagOwners": {tag: [f"{role}@"] for role, tag in TAGS.items()},
        "nodeAttrs": [{"target": ["*"], "attr": ["drive:share", "drive:access"]}],
        "grants": [
            {"src": ALL, "dst": ALL, "ip": ["*"]},
            {"src": [TAGS["rwclient"]], "dst": [TAGS["sharer"]],
             "app": {CAP_DRIVE: [{"shares": ["*"], "access": "rw"}]}},
            {"src": [TAGS["roclient"]], "dst": [TAGS["sharer"]],
             "app": {CAP_DRIVE: [{"shares": ["*"], "access": "ro"}]}},
        ],
    }


def cap_dsts(ts: Tailscaled, cap: str) -> set[str]:
    """The destination prefixes of `cap` entries in the packet filter control sent `ts`."""
    out: set[str] = set()
    for m in ts.netmap().get("PacketFilter") or ():
        for c in m.get("Caps") or ():
            if c.get("Cap") == cap:
                out.add(str(c.get("Dst")))
    return out


# One WebDAV request from inside a namespace: prints the status, then the body.
_DAV = r"""
import http.client, sys
method, path, body = sys.argv[1], sys.argv[2], sys.argv[3].encode()
c = http.client.HTTPConnection("100.100.100.100", 8080, timeout=10)
headers = {"Depth": "1"} if method == "PROPFIND" else {}
c.request(method, path, body=body if method == "PUT" else None, headers=headers)
r = c.getresponse()
print(r.status)
sys.stdout.write(r.read().decode(errors="replace"))
"""


def dav(ts: Tailscaled, method: str, path: str, body: str = "") -> tuple[int, str]:
    r = ts.host.run([sys.executable, "-c", _DAV, method, path, body], timeout=30)
    status, _, text = r.stdout.partition("\n")
    return (int(status) if status.strip().isdigit() else -1), text + r.stderr[-300:]


def test_grant_cap_drive(world: World) -> None:
    keys = {role: {"user": role, "reusable": True, "tags": [tag]} for role, tag in TAGS.items()}
    world.start_server(users=list(ROLES), keys=keys, policy=drive_policy())
    nodes = {role: world.join(role, version, key=role) for role, version in ROLES.items()}
    wait_mesh(list(nodes.values()))
    own = {role: {f"{a}/32" if "." in a else f"{a}/128" for a in ts.ip()}
           for role, ts in nodes.items()}

    # Node attributes: every node may share and access.
    for role, ts in nodes.items():
        wait_for(f"{role}'s CapMap to carry the drive attributes", lambda ts=ts: {
            "drive:share", "drive:access"} <= set((ts.netmap().get("SelfNode") or {})
                                                  .get("CapMap") or {}), 30)
    # The packet filters: cap/drive on the sharer for its own address, the companion
    # cap/drive-sharer on each granted client for its own (v4 and v6); nothing else.
    assert cap_dsts(nodes["sharer"], CAP_DRIVE) == own["sharer"]
    for role in ("rwclient", "roclient"):
        assert cap_dsts(nodes[role], CAP_DRIVE_SHARER) == own[role], role
        assert cap_dsts(nodes[role], CAP_DRIVE) == set(), role
    assert cap_dsts(nodes["sharer"], CAP_DRIVE_SHARER) == set()
    assert cap_dsts(nodes["noaccess"], CAP_DRIVE) | cap_dsts(nodes["noaccess"],
                                                             CAP_DRIVE_SHARER) == set()

    # A share on the sharer.
    share = Path(world.workdir) / "testshare"
    share.mkdir()
    (share / "testfile.txt").write_text("hello-taildrive\n")
    r = nodes["sharer"].cli("drive", "share", "testshare", str(share))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "testshare" in nodes["sharer"].cli("drive", "list").stdout
    tailnet = nodes["rwclient"].status_json()["CurrentTailnet"]["Name"]
    base = f"/{tailnet}/sharer/testshare"

    def reads(role: str) -> bool:
        status, body = dav(nodes[role], "GET", f"{base}/testfile.txt")
        return status == 200 and body.strip() == "hello-taildrive"

    for role in ("rwclient", "roclient"):
        wait_for(f"{role} to read the sharer's file", lambda role=role: reads(role), 60)

    # rw writes, lists and deletes.
    status, body = dav(nodes["rwclient"], "PUT", f"{base}/rw-wrote.txt", "written-by-rw")
    assert 200 <= status < 300, (status, body)
    assert (share / "rw-wrote.txt").read_text().strip() == "written-by-rw"
    status, body = dav(nodes["rwclient"], "PROPFIND", f"{base}/")
    assert status == 207 and "testfile.txt" in body and "rw-wrote.txt" in body, (status, body)
    status, body = dav(nodes["rwclient"], "DELETE", f"{base}/rw-wrote.txt")
    assert 200 <= status < 300 and not (share / "rw-wrote.txt").exists(), (status, body)

    # ro reads (above) but may neither write nor delete.
    status, body = dav(nodes["roclient"], "PUT", f"{base}/ro-wrote.txt", "should-not-work")
    assert status == 403 and not (share / "ro-wrote.txt").exists(), (status, body)
    status, body = dav(nodes["roclient"], "DELETE", f"{base}/testfile.txt")
    assert status == 403 and (share / "testfile.txt").exists(), (status, body)

    # No grant: neither read nor write.
    status, body = dav(nodes["noaccess"], "GET", f"{base}/testfile.txt")
    assert status != 200, (status, body)
    status, body = dav(nodes["noaccess"], "PUT", f"{base}/no-access.txt", "should-not-work")
    assert status not in (200, 201, 204) and not (share / "no-access.txt").exists(), (status,
                                                                                     body)


CAP_RELAY = "tailscale.com/cap/relay"
CAP_RELAY_TARGET = "tailscale.com/cap/relay-target"
RELAY_TAGS = {"relay": "tag:relay", "clienta": "tag:client-a", "clientb": "tag:client-b"}


def relay_policy() -> dict[str, Any]:
    tags = list(RELAY_TAGS.values())
    return {
        "tagOwners": {tag: [f"{role}@"] for role, tag in RELAY_TAGS.items()},
        "grants": [
            {"src": tags, "dst": tags, "ip": ["*"]},
            {"src": [RELAY_TAGS["clienta"], RELAY_TAGS["clientb"]], "dst": [RELAY_TAGS["relay"]],
             "app": {CAP_RELAY: [{}]}},
        ],
    }


def peer_status(ts: Tailscaled, ip: str) -> dict[str, Any]:
    for p in (ts.status_json().get("Peer") or {}).values():
        if ip in (p.get("TailscaleIPs") or []):
            return dict(p)
    raise AssertionError(f"{ts.host.name} does not list {ip}")


def relayed(ts: Tailscaled, ip: str) -> dict[str, Any] | None:
    """A ping (relay paths are set up on traffic), then the peer if it goes via a peer
    relay (`ip:port:vni:N`) and not directly."""
    ts.ping(ip, count=1, timeout=1, until_direct=False)
    p = peer_status(ts, ip)
    addr, sep, vni = str(p.get("PeerRelay") or "").partition(":vni:")
    return p if sep and vni and addr.rpartition(":")[2].isdigit() and not p.get("CurAddr") \
        else None


def test_grant_cap_relay(world: World) -> None:
    """Headscale's TestGrantCapRelay: two clients that cannot reach each other directly use
    a third node as their peer relay once a cap/relay grant lets them; with the relay down
    they fall back to DERP, and with it back they use it again."""
    keys = {role: {"user": role, "reusable": True, "tags": [tag]}
            for role, tag in RELAY_TAGS.items()}
    srv = world.start_server(users=list(RELAY_TAGS), keys=keys, policy=relay_policy())
    hosts = {n: world.topology.add_host(n) for n in ("clienta", "clientb")}
    # No direct path between the two clients: each drops the other's underlay address.
    for me, other in (("clienta", "clientb"), ("clientb", "clienta")):
        for rule in (["OUTPUT", "-d"], ["INPUT", "-s"]):
            r = hosts[me].run(["iptables", "-I", rule[0], "1", rule[1], hosts[other].ip,
                               "-j", "DROP"])
            assert r.returncode == 0, r.stderr
    relay = world.join("relay", NEWEST, key="relay")
    r = relay.cli("set", "--relay-server-port=0")
    assert r.returncode == 0, r.stdout + r.stderr
    a = world.join("clienta", MIDDLE, key="clienta", host=hosts["clienta"])
    b = world.join("clientb", NEWEST, key="clientb", host=hosts["clientb"])
    own = {n: {f"{x}/32" if "." in x else f"{x}/128" for x in ts.ip()}
           for n, ts in (("relay", relay), ("clienta", a), ("clientb", b))}
    a_ip, b_ip = a.ip("4")[0], b.ip("4")[0]

    # The grant in the packet filters: cap/relay on the relay for its own addresses, the
    # companion cap/relay-target on each client for its own; not the other way round.
    assert cap_dsts(relay, CAP_RELAY) == own["relay"]
    assert cap_dsts(relay, CAP_RELAY_TARGET) == set()
    for n, ts in (("clienta", a), ("clientb", b)):
        assert cap_dsts(ts, CAP_RELAY_TARGET) == own[n], n
        assert cap_dsts(ts, CAP_RELAY) == set(), n

    # Through the peer relay, in both directions, never directly.
    for ts, ip in ((a, b_ip), (b, a_ip)):
        wait_for(f"{ts.host.name} to reach {ip} through the peer relay",
                 lambda ts=ts, ip=ip: relayed(ts, ip), 120, interval=2)

    # Relay down: DERP carries the traffic.
    relay.stop()
    for ts, ip in ((a, b_ip), (b, a_ip)):
        wait_for(f"{ts.host.name} to drop the peer relay to {ip}", lambda ts=ts, ip=ip: (
            not peer_status(ts, ip).get("PeerRelay") and peer_status(ts, ip).get("Relay")), 120)
    wait_for("clienta to ping clientb over DERP", lambda: a.ping(
        b_ip, count=1, timeout=2, until_direct=False).returncode == 0, 60)
    assert not peer_status(a, b_ip).get("CurAddr")

    # Relay back: the peer relay is used again.
    relay.start()
    relay.wait_state("Running", timeout=60)
    for ts, ip in ((a, b_ip), (b, a_ip)):
        wait_for(f"{ts.host.name} to use the peer relay to {ip} again",
                 lambda ts=ts, ip=ip: relayed(ts, ip), 120, interval=2)
    assert srv.running
