"""Full maps, deltas, the peer cache and map frames.

Expected values are written by hand from docs/protocol.md ("Map streaming"), the client's rules and
Headscale's TailNode/builder field choices, not copied from this code's output.
"""

import ipaddress
import struct
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import zstandard

from pyheadscale.mapper import (
    KEEPALIVE,
    AllowAllPolicy,
    DNSSettings,
    MapContext,
    PeerCache,
    decode_frame,
    delta,
    encode_frame,
    full_map,
    full_map_and_peers,
    to_plain,
)
from pyheadscale.mapper.derpmap import embedded_region, merge_derp_maps
from pyheadscale.mapper.full import PeerView
from pyheadscale.state.changes import Change, ChangeKind, Field
from pyheadscale.state.model import TAGGED_DEVICES_USER_ID, Node, User
from tests.unit._statefix import key, make_node

NOW = datetime(2026, 8, 22, 16, 0, tzinfo=UTC)
ZERO = "0" * 64


def hexk(b: int) -> str:
    return f"{b:02x}" * 32


def mknode(i: int, **kw: Any) -> Node:
    """Node i as the expected maps below spell it: keys 0x1i/0x2i/0x3i, name node<i>, online."""
    fields: dict[str, Any] = dict(
        machine_key=key(0x10 + i), node_key=key(0x20 + i), disco_key=key(0x30 + i),
        hostname=f"node{i}", given_name=f"node{i}",
        hostinfo={"Hostname": f"node{i}", "OS": "linux"}, online=True, capver=145, version=1)
    return make_node(i, **(fields | kw))


KNOWN_2 = {2: PeerView()}  # the stream has sent peer 2, with no routes

USERS = {
    1: User(id=1, name="alice", display_name="Alice", email="alice@example.com"),
    2: User(id=2, name="bob"),
}

DERP = merge_derp_maps(
    (),
    (),
    embedded_region(
        host="127.0.0.1",
        derp_port=3340,
        stun_port=3478,
        region_id=900,
        region_code="test",
        region_name="Test",
        ipv4="127.0.0.1",
        ipv6="none",
        insecure_for_tests=True,
    ),
)


def ctx(**kw) -> MapContext:
    base = dict(
        base_domain="tail.example.com",
        dns=DNSSettings(magic_dns=True, override_local_dns=True, nameservers_global=("1.1.1.1",)),
        derp_map=DERP,
    )
    base.update(kw)
    return MapContext(**base)


def plain(resp):
    return None if resp is None else to_plain(resp)


def peer_delta(change: Change, viewer: Node, peer: Node) -> dict[str, Any]:
    """The delta `viewer` gets for `change` about `peer`, which it already knows."""
    resp, _ = delta([change], {viewer.id: viewer, peer.id: peer}, USERS, viewer, ctx(), NOW,
                    {peer.id: PeerView()})
    out: dict[str, Any] = plain(resp)
    return out


# ---------------------------------------------------------------------------------------------
# Full map


def test_golden_first_map_single_node_matches_appendix_b():
    n1 = mknode(1, endpoints=(), hostinfo={"Hostname": "node1", "OS": "linux"})
    got = plain(full_map({1: n1}, USERS, n1, ctx(), NOW))
    expected = {
        "ControlTime": "2026-08-22T16:00:00Z",
        "Node": {
            "ID": 1,
            "StableID": "1",  # Headscale: decimal node ID
            "Name": "node1.tail.example.com.",
            "User": 1,
            "Key": "nodekey:" + hexk(0x21),
            "KeyExpiry": "0001-01-01T00:00:00Z",  # Go zero time = never expires
            "Machine": "mkey:" + hexk(0x11),
            "DiscoKey": "discokey:" + hexk(0x31),
            "Addresses": ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"],
            "AllowedIPs": ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"],
            "Hostinfo": {"Hostname": "node1", "OS": "linux"},
            "Created": "2026-08-22T15:59:58Z",
            "Cap": 145,
            "Online": True,
            "MachineAuthorized": True,
            "CapMap": {
                "https://tailscale.com/cap/is-admin": [],
                "https://tailscale.com/cap/ssh": [],
                "https://tailscale.com/cap/file-sharing": [],
                "default-auto-update": [False],
            },
        },
        "DERPMap": {
            "Regions": {
                "900": {
                    "RegionID": 900,
                    "RegionCode": "test",
                    "RegionName": "Test",
                    "Nodes": [
                        {
                            "Name": "900",
                            "RegionID": 900,
                            "HostName": "127.0.0.1",
                            "IPv4": "127.0.0.1",
                            "IPv6": "none",
                            "STUNPort": 3478,
                            "DERPPort": 3340,
                            "InsecureForTests": True,
                        }
                    ],
                }
            }
        },
        "Domain": "tail.example.com",
        "DNSConfig": {
            "Resolvers": [{"Addr": "1.1.1.1"}],
            "Domains": ["tail.example.com"],
            "Proxied": True,
        },
        "PacketFilter": [
            {"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}
        ],
        "UserProfiles": [{"ID": 1, "LoginName": "alice@example.com", "DisplayName": "Alice"}],
        "CollectServices": False,
        "Debug": {"DisableLogTail": True},
    }
    assert got == expected  # no "Peers" key at all: an empty Peers would mean "unchanged"


def test_full_map_peers_and_profiles():
    n1 = mknode(1)
    n3 = mknode(
        3,
        user_id=2,
        online=False,
        last_seen=datetime(2026, 8, 22, 15, 0, tzinfo=UTC),
        endpoints=("192.0.2.3:41641",),
        hostinfo={"Hostname": "node3", "NetInfo": {"PreferredDERP": 900}},
    )
    n2 = mknode(2, user_id=None, tags=("tag:server",))
    nodes = {3: n3, 1: n1, 2: n2}
    resp, peers = full_map_and_peers(nodes, USERS, n1, ctx(), NOW)
    got = to_plain(resp)
    assert set(peers) == {2, 3}
    assert [p["ID"] for p in got["Peers"]] == [2, 3]  # sorted, never self
    assert all(p["ID"] != 1 for p in got["Peers"])
    p2, p3 = got["Peers"]
    assert p2["User"] == TAGGED_DEVICES_USER_ID and p2["Tags"] == ["tag:server"]
    assert "CapMap" not in p2  # peers carry no self capabilities
    assert p3["Name"] == "node3.tail.example.com."
    assert p3["HomeDERP"] == 900 and "DERP" not in p3  # capver 145 >= 111
    assert p3["Endpoints"] == ["192.0.2.3:41641"]
    assert p3["Online"] is False and p3["LastSeen"] == "2026-08-22T15:00:00Z"
    assert "LastSeen" not in p2  # online peers never carry LastSeen
    assert p3["AllowedIPs"] == ["100.64.0.3/32", "fd7a:115c:a1e0::3/128"]
    for p in got["Peers"]:
        for k in ("Key", "Machine", "DiscoKey"):
            assert p[k] and p[k] != "" and ":" in p[k]
    assert got["UserProfiles"] == [
        {"ID": 1, "LoginName": "alice@example.com", "DisplayName": "Alice"},
        {"ID": 2, "LoginName": "bob", "DisplayName": "bob"},
        {
            "ID": TAGGED_DEVICES_USER_ID,
            "LoginName": "tagged-devices",
            "DisplayName": "Tagged Devices",
        },
    ]


def test_missing_disco_key_is_zero_key_not_empty():
    n1, n2 = mknode(1), mknode(2, disco_key=None)
    got = plain(full_map([n1, n2], USERS.values(), n1, ctx(), NOW))
    assert got["Peers"][0]["DiscoKey"] == "discokey:" + ZERO


def test_allowed_ips_include_primary_and_exit_routes():
    exit4, exit6 = ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")
    lan = ipaddress.ip_network("192.168.1.0/24")
    n1 = mknode(1)
    n2 = mknode(
        2,
        approved_routes=(lan, exit4, exit6),
        hostinfo={"RoutableIPs": ["192.168.1.0/24", "0.0.0.0/0", "::/0"]},
    )
    c = ctx(primary_routes={2: [lan]})
    peer = plain(full_map({1: n1, 2: n2}, USERS, n1, c, NOW))["Peers"][0]
    assert peer["AllowedIPs"] == [
        "0.0.0.0/0",
        "100.64.0.2/32",
        "192.168.1.0/24",
        "::/0",
        "fd7a:115c:a1e0::2/128",
    ]
    assert peer["PrimaryRoutes"] == ["192.168.1.0/24"]  # exit routes are not primary routes
    # approved but not announced exit route: not routed
    n2b = replace(n2, hostinfo={"RoutableIPs": ["192.168.1.0/24"]}, version=2)
    peer = plain(full_map({1: n1, 2: n2b}, USERS, n1, c, NOW))["Peers"][0]
    assert "0.0.0.0/0" not in peer["AllowedIPs"]


def test_legacy_derp_string_only_for_old_clients():
    hi = {"Hostname": "node2", "NetInfo": {"PreferredDERP": 900}}
    old = mknode(1, capver=110)
    new = mknode(3, capver=111)
    n2 = mknode(2, hostinfo=hi)
    nodes = {1: old, 2: n2, 3: new}
    cache = PeerCache()
    p_old = {p["ID"]: p for p in plain(full_map(nodes, USERS, old, ctx(), NOW, cache))["Peers"]}
    p_new = {p["ID"]: p for p in plain(full_map(nodes, USERS, new, ctx(), NOW, cache))["Peers"]}
    assert p_old[2]["DERP"] == "127.3.3.40:900"
    assert p_old[2]["HomeDERP"] == 900
    assert "DERP" not in p_new[2] and p_new[2]["HomeDERP"] == 900


def test_expired_peer_kept_and_flagged_self_expiry():
    n1 = mknode(1, expiry=NOW + timedelta(days=1))
    n2 = mknode(2, expiry=NOW - timedelta(seconds=1))
    got = plain(full_map({1: n1, 2: n2}, USERS, n1, ctx(), NOW))
    assert got["Peers"][0]["Expired"] is True  # Headscale keeps expired peers
    assert got["Node"]["KeyExpiry"] == "2026-08-23T16:00:00Z"
    assert got["Node"]["MachineAuthorized"] is True
    assert "Expired" not in got["Node"]


class DenyPolicy(AllowAllPolicy):
    def __init__(self, hidden=(), ssh=None, caps=None, rules=None):
        self.hidden, self.ssh, self.caps, self.rules = set(hidden), ssh, caps or {}, rules

    def can_see(self, viewer, peer):
        return peer.id not in self.hidden

    def ssh_policy(self, viewer):
        return self.ssh

    def node_capmap(self, viewer):
        return self.caps

    def packet_filter(self, viewer):
        return super().packet_filter(viewer) if self.rules is None else self.rules


def test_policy_visibility_ssh_capmap_and_empty_filter():
    n1, n2, n3 = mknode(1), mknode(2), mknode(3)
    # tailcfg.SSHPolicy's JSON names are lower camel case ("rules", "principals", ...).
    ssh = {
        "rules": [
            {"principals": [{"any": True}], "sshUsers": {"*": "="}, "action": {"accept": True}}
        ]
    }
    pol = DenyPolicy(hidden={3}, ssh=ssh, caps={"magicdns-aaaa": []}, rules=[])
    got = plain(full_map({1: n1, 2: n2, 3: n3}, USERS, n1, ctx(policy=pol), NOW))
    assert [p["ID"] for p in got["Peers"]] == [2]
    assert got["SSHPolicy"] == ssh
    assert got["Node"]["CapMap"]["magicdns-aaaa"] == []
    assert got["PacketFilter"] == []  # deny-all must be sent as [], not omitted
    no_ssh = plain(full_map({1: n1}, USERS, n1, ctx(policy=DenyPolicy(ssh={"rules": []})), NOW))
    assert "SSHPolicy" not in no_ssh


def test_empty_base_domain_name_is_bare_label():
    n1 = mknode(1)
    got = plain(full_map({1: n1}, USERS, n1, ctx(base_domain="", domain="hs.example.com"), NOW))
    assert got["Node"]["Name"] == "node1"
    assert got["Domain"] == "hs.example.com"


# ---------------------------------------------------------------------------------------------
# Peer cache


def test_peer_cache_shared_across_viewers_and_invalidated_on_version_bump():
    nodes = {i: mknode(i) for i in range(1, 5)}
    cache = PeerCache()
    c = ctx()
    maps = [full_map(nodes, USERS, nodes[v], c, NOW, cache) for v in nodes]
    assert cache.misses == 4 and cache.hits == 8  # 4 viewers x 3 peers, each encoded once
    # the very same encoded object is reused for node 4 in viewers 1..3
    frags = [m["Peers"][-1] for m in maps[:3]]
    assert [to_plain(f)["ID"] for f in frags] == [4, 4, 4]
    assert frags[0] is frags[1] is frags[2]

    nodes[4] = replace(nodes[4], endpoints=("192.0.2.4:1",), version=2)
    m = plain(full_map(nodes, USERS, nodes[1], c, NOW, cache))
    assert cache.misses == 5
    assert m["Peers"][-1]["Endpoints"] == ["192.0.2.4:1"]

    # a new context generation invalidates too
    full_map(nodes, USERS, nodes[1], replace(c, generation=1), NOW, cache)
    assert cache.misses == 8


def test_peer_cache_notices_expiry_crossing_without_version_bump():
    n1, n2 = mknode(1), mknode(2, expiry=NOW + timedelta(minutes=1))
    cache = PeerCache()
    assert (
        "Expired" not in plain(full_map({1: n1, 2: n2}, USERS, n1, ctx(), NOW, cache))["Peers"][0]
    )
    later = NOW + timedelta(minutes=2)
    assert plain(full_map({1: n1, 2: n2}, USERS, n1, ctx(), later, cache))["Peers"][0]["Expired"]


# ---------------------------------------------------------------------------------------------
# Deltas


def test_nothing_for_viewer_returns_none():
    nodes = {1: mknode(1), 2: mknode(2)}
    resp, known = delta([Change(ChangeKind.NODE_ONLINE, 1)], nodes, USERS, nodes[1], ctx(), NOW, KNOWN_2)
    assert resp is None and set(known) == {2}
    resp, known = delta([], nodes, USERS, nodes[1], ctx(), NOW, KNOWN_2)
    assert resp is None


def test_online_and_offline_patches():
    n1 = mknode(1)
    n2 = mknode(2, online=False, last_seen=datetime(2026, 8, 22, 15, 30, tzinfo=UTC), version=2)
    resp, known = delta([Change(ChangeKind.NODE_ONLINE, 2)], {1: n1, 2: n2}, USERS, n1, ctx(), NOW, KNOWN_2)
    assert plain(resp) == {
        "PeersChangedPatch": [{"NodeID": 2, "Online": False, "LastSeen": "2026-08-22T15:30:00Z"}],
        "ControlTime": "2026-08-22T16:00:00Z",
    }
    n2on = replace(n2, online=True)
    resp, _ = delta([Change(ChangeKind.NODE_ONLINE, 2)], {1: n1, 2: n2on}, USERS, n1, ctx(), NOW, KNOWN_2)
    assert plain(resp)["PeersChangedPatch"] == [{"NodeID": 2, "Online": True}]


def test_disco_endpoint_derp_patch_matches_appendix_b():
    n1 = mknode(1)
    n2 = mknode(
        2,
        disco_key=key(0x99),
        endpoints=("192.168.1.20:41641",),
        hostinfo={"NetInfo": {"PreferredDERP": 900}},
    )
    ch = Change(ChangeKind.NODE_PATCH, 2, frozenset({Field.DISCO_KEY, Field.ENDPOINTS, Field.HOME_DERP}))
    resp, known = delta([ch], {1: n1, 2: n2}, USERS, n1, ctx(), NOW, KNOWN_2)
    got = plain(resp)
    assert got["PeersChangedPatch"] == [
        {
            "NodeID": 2,
            "DiscoKey": "discokey:" + hexk(0x99),
            "Online": True,
            "Endpoints": ["192.168.1.20:41641"],
            "DERPRegion": 900,
        }
    ]
    assert set(got) == {"PeersChangedPatch", "ControlTime"}
    assert set(known) == {2}


def test_key_expiry_patch_and_offline_disco_change_sends_full_node():
    n1 = mknode(1)
    n2 = mknode(2, expiry=NOW + timedelta(hours=1))
    resp, _ = delta(
        [Change(ChangeKind.NODE_PATCH, 2, frozenset({Field.EXPIRY}))], {1: n1, 2: n2}, USERS, n1, ctx(), NOW, KNOWN_2
    )
    assert plain(resp)["PeersChangedPatch"] == [{"NodeID": 2, "KeyExpiry": "2026-08-22T17:00:00Z"}]
    off = replace(n2, online=False)
    got = peer_delta(Change(ChangeKind.NODE_PATCH, 2, frozenset({Field.DISCO_KEY})), n1, off)
    assert "PeersChangedPatch" not in got and got["PeersChanged"][0]["ID"] == 2


def test_other_peer_change_is_full_peers_changed():
    n1, n2 = mknode(1), mknode(2, hostinfo={"Hostname": "renamed", "OS": "linux"}, version=5)
    got = peer_delta(Change(ChangeKind.NODE_CHANGED, 2, frozenset({Field.HOSTINFO})), n1, n2)
    assert [p["ID"] for p in got["PeersChanged"]] == [2]
    assert got["PeersChanged"][0]["Hostinfo"]["Hostname"] == "renamed"
    assert "Peers" not in got and "Node" not in got


def test_new_peer_added_with_profile_and_known_updated():
    n1, n5 = mknode(1), mknode(5, user_id=2)
    resp, known = delta([Change(ChangeKind.NODE_ADDED, 5)], {1: n1, 5: n5}, USERS, n1, ctx(), NOW, {})
    got = plain(resp)
    assert [p["ID"] for p in got["PeersChanged"]] == [5]
    assert got["UserProfiles"] == [{"ID": 2, "LoginName": "bob", "DisplayName": "bob"}]
    assert set(known) == {5}


def test_last_peer_removed_uses_peers_removed_not_empty_peers():
    n1 = mknode(1)
    known_in = dict(KNOWN_2)
    resp, known = delta([Change(ChangeKind.NODE_REMOVED, 2)], {1: n1}, USERS, n1, ctx(), NOW, known_in)
    got = plain(resp)
    assert got["PeersRemoved"] == [2]
    assert "Peers" not in got  # an empty Peers would mean "unchanged"
    assert known == {} and set(known_in) == {2}  # input untouched


def test_patch_for_unknown_peer_not_visible_is_dropped():
    n1, n3 = mknode(1), mknode(3)
    pol = DenyPolicy(hidden={3})
    resp, known = delta(
        [Change(ChangeKind.NODE_ONLINE, 3)], {1: n1, 3: n3}, USERS, n1, ctx(policy=pol), NOW, {}
    )
    assert resp is None and known == {}


def test_policy_change_reconciles_visibility_and_resends_filter():
    n1, n2, n3 = mknode(1), mknode(2), mknode(3, user_id=2)
    pol = DenyPolicy(
        hidden={2},
        rules=[
            {
                "SrcIPs": ["100.64.0.3/32"],
                "DstPorts": [{"IP": "*", "Ports": {"First": 22, "Last": 22}}],
            }
        ],
    )
    resp, known = delta(
        [Change(ChangeKind.POLICY)], {1: n1, 2: n2, 3: n3}, USERS, n1, ctx(policy=pol), NOW, KNOWN_2
    )
    got = plain(resp)
    assert got["PeersRemoved"] == [2]
    assert [p["ID"] for p in got["PeersChanged"]] == [3]
    assert got["PacketFilter"][0]["SrcIPs"] == ["100.64.0.3/32"]
    assert got["SSHPolicy"] == {"rules": []}  # explicit empty clears an earlier policy
    assert "Node" in got and "DNSConfig" in got
    assert {"ID": 2, "LoginName": "bob", "DisplayName": "bob"} in got["UserProfiles"]
    assert set(known) == {3}


def test_self_change_sends_node_and_peer_change_does_not():
    n1 = mknode(1, expiry=NOW + timedelta(days=2), version=3)
    resp, _ = delta(
        [Change(ChangeKind.NODE_PATCH, 1, frozenset({Field.EXPIRY}))], {1: n1}, USERS, n1, ctx(), NOW, {}
    )
    got = plain(resp)
    assert got["Node"]["KeyExpiry"] == "2026-08-24T16:00:00Z"
    assert "PacketFilter" not in got
    # the viewer's own endpoint churn is not echoed back
    resp, _ = delta(
        [Change(ChangeKind.NODE_PATCH, 1, frozenset({Field.ENDPOINTS}))], {1: n1}, USERS, n1, ctx(), NOW, {}
    )
    assert resp is None
    # a tag change on self re-evaluates filter and visibility
    resp, _ = delta(
        [Change(ChangeKind.NODE_CHANGED, 1, frozenset({Field.TAGS}))], {1: n1}, USERS, n1, ctx(), NOW, {}
    )
    assert set(plain(resp)) >= {"Node", "PacketFilter", "SSHPolicy"}


def test_dns_derp_user_changes():
    n1, n2 = mknode(1), mknode(2, user_id=2)
    nodes = {1: n1, 2: n2}
    resp, _ = delta([Change(ChangeKind.DNS), Change(ChangeKind.DERP)], nodes, USERS, n1, ctx(), NOW, KNOWN_2)
    got = plain(resp)
    assert got["DNSConfig"]["Proxied"] is True
    assert "900" in got["DERPMap"]["Regions"]
    resp, _ = delta([Change(ChangeKind.USER)], nodes, USERS, n1, ctx(), NOW, KNOWN_2)
    assert [p["ID"] for p in plain(resp)["UserProfiles"]] == [1, 2]


def test_full_change_gives_full_map():
    nodes = {1: mknode(1), 2: mknode(2)}
    resp, known = delta([Change(ChangeKind.FULL)], nodes, USERS, nodes[1], ctx(), NOW, {})
    got = plain(resp)
    assert "Node" in got and [p["ID"] for p in got["Peers"]] == [2]
    assert set(known) == {2}


# ---------------------------------------------------------------------------------------------
# Frames


def test_frame_is_le_length_plus_zstd_json():
    obj = {"KeepAlive": True}
    frame = encode_frame(obj)
    (n,) = struct.unpack("<I", frame[:4])
    assert n == len(frame) - 4
    assert frame[4:8] == b"\x28\xb5\x2f\xfd"  # zstd magic
    assert orjson.loads(zstandard.ZstdDecompressor().decompress(frame[4:])) == obj
    assert KEEPALIVE == frame


def test_frame_round_trip_of_full_map_with_fragments():
    nodes = {i: mknode(i) for i in range(1, 40)}
    resp = full_map(nodes, USERS, nodes[1], ctx(), NOW)
    frame = encode_frame(resp) + encode_frame(b'{"KeepAlive":true}')
    first, rest = decode_frame(frame)
    assert first == to_plain(resp)
    assert len(first["Peers"]) == 38
    second, rest = decode_frame(rest)
    assert second == {"KeepAlive": True} and rest == b""
    assert struct.unpack("<I", frame[:4])[0] < 1 << 16  # LE: small length in the low bytes


def test_decode_frame_errors():
    from pyheadscale.mapper.encode import FrameError

    with pytest.raises(FrameError):
        decode_frame(b"\x05\x00")
    with pytest.raises(FrameError):
        decode_frame(struct.pack("<I", 10) + b"short")
    with pytest.raises(FrameError):
        decode_frame(struct.pack("<I", 4) + b"{}{}")
