"""IPv6 literals and prefixes everywhere a policy takes addresses: hosts, grant and ACL
sources and destinations (bare, bracketed with a port, as prefixes), autoApprovers, via
destinations, nodeAttrs targets and the tests block; each beside its IPv4 twin where one
exists, since a mistake usually shows as the two families behaving differently.

Expected rules are written by hand from the wire format (a bare address for one host, a
CIDR for anything wider, the canonical compressed IPv6 text).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from pyheadscale.policy import PolicyError, PolicyManager, PolicyTestError
from pyheadscale.state.model import Node, User
from tests.unit._statefix import key, make_node

_T = datetime(2025, 1, 1, tzinfo=UTC)
USERS = [User(id=1, name="alice", email="alice@example.com")]
OWNERS = {"tag:client": ["alice@example.com"], "tag:server": ["alice@example.com"],
          "tag:router": ["alice@example.com"]}
V6_LAN = "fd00:1::/64"


def node(i: int, tags: tuple[str, ...] = (), routes: tuple[str, ...] = ()) -> Node:
    return make_node(i, tags=tags, routes=routes, approved=routes, machine_key=key(i),
                     node_key=key(i), created_at=_T, updated_at=_T,
                     hostinfo={"RoutableIPs": list(routes)})


CLIENT = node(1, ("tag:client",))
SERVER = node(2, ("tag:server",))
MEMBER = node(3)
ROUTER = node(4, ("tag:router",), (V6_LAN, "10.9.0.0/24"))
NODES = [CLIENT, SERVER, MEMBER, ROUTER]
CLIENT_SRC = ["100.64.0.1", "fd7a:115c:a1e0::1"]


def manager(doc: dict[str, Any], nodes: list[Node] = NODES) -> PolicyManager:
    return PolicyManager(json.dumps({"tagOwners": OWNERS, **doc}), USERS, nodes)


def ports(ip: str, first: int = 22, last: int = 22) -> dict[str, Any]:
    return {"IP": ip, "Ports": {"First": first, "Last": last}}


@pytest.mark.parametrize("dst", ["fd7a:115c:a1e0::2", "FD7A:115C:A1E0::2",
                                 "fd7a:115c:a1e0:0:0:0:0:2", "fd7a:115c:a1e0::2/128"])
def test_grant_from_a_tag_to_an_ipv6_literal_reaches_that_node(dst: str) -> None:
    pm = manager({"grants": [{"src": ["tag:client"], "dst": [dst], "ip": ["tcp:22"]}]})
    assert pm.packet_filter(SERVER) == [
        {"SrcIPs": CLIENT_SRC, "DstPorts": [ports("fd7a:115c:a1e0::2")], "IPProto": [6]}]
    for other in (CLIENT, MEMBER, ROUTER):
        assert pm.packet_filter(other) == []
    assert pm.can_see(CLIENT, SERVER) and pm.can_see(SERVER, CLIENT)
    assert not pm.can_see(CLIENT, MEMBER)


def test_the_ipv4_twin_behaves_the_same() -> None:
    pm = manager({"grants": [{"src": ["tag:client"], "dst": ["100.64.0.2"], "ip": ["tcp:22"]}]})
    assert pm.packet_filter(SERVER) == [
        {"SrcIPs": CLIENT_SRC, "DstPorts": [ports("100.64.0.2")], "IPProto": [6]}]
    assert pm.can_see(CLIENT, SERVER)


@pytest.mark.parametrize("dst", ["[fd7a:115c:a1e0::2]:22", "fd7a:115c:a1e0::2:22"])
def test_acl_destination_ipv6_with_a_port(dst: str) -> None:
    pm = manager({"acls": [{"action": "accept", "src": ["tag:client"], "dst": [dst]}]})
    assert pm.packet_filter(SERVER) == [
        {"SrcIPs": CLIENT_SRC, "DstPorts": [ports("fd7a:115c:a1e0::2")]}]


def test_acl_destination_ipv6_prefix_with_a_port() -> None:
    pm = manager({"acls": [{"action": "accept", "src": ["tag:client"],
                            "dst": ["fd7a:115c:a1e0::/126:443"]}]})
    rule = {"SrcIPs": CLIENT_SRC, "DstPorts": [ports("fd7a:115c:a1e0::/126", 443, 443)]}
    assert pm.packet_filter(SERVER) == [rule] and pm.packet_filter(MEMBER) == [rule]
    assert pm.packet_filter(ROUTER) == []  # ::4 is outside ::/126


def test_brackets_only_around_an_address() -> None:
    with pytest.raises(PolicyError, match="square brackets"):
        manager({"acls": [{"action": "accept", "src": ["tag:client"],
                           "dst": ["[fd7a:115c:a1e0::/126]:22"]}]})


@pytest.mark.parametrize("src", ["fd7a:115c:a1e0::1", "fd7a:115c:a1e0::/127"])
def test_ipv6_sources_are_written_as_given(src: str) -> None:
    pm = manager({"grants": [{"src": [src], "dst": ["tag:server"], "ip": ["tcp:22"]}]})
    assert pm.packet_filter(SERVER) == [
        {"SrcIPs": [src], "DstPorts": [ports("100.64.0.2"), ports("fd7a:115c:a1e0::2")],
         "IPProto": [6]}]
    assert pm.can_see(SERVER, CLIENT)  # ::1 lies in both sources


def test_ipv6_host_aliases_as_source_and_destination() -> None:
    pm = manager({"hosts": {"client6": "fd7a:115c:a1e0::1", "lab6": V6_LAN},
                  "acls": [{"action": "accept", "src": ["client6"], "dst": ["lab6:80"]}]})
    assert pm.packet_filter(ROUTER) == [
        {"SrcIPs": ["fd7a:115c:a1e0::1"], "DstPorts": [ports(V6_LAN, 80, 80)]}]
    assert pm.can_see(CLIENT, ROUTER)
    assert [str(r) for r in pm.routes_for_peer(CLIENT, ROUTER, [ipaddress.ip_network(V6_LAN)])
            ] == [V6_LAN]


def test_an_address_inside_an_ipv6_subnet_route_goes_to_its_router() -> None:
    pm = manager({"grants": [{"src": ["tag:client"], "dst": ["fd00:1::5"], "ip": ["*"]}]})
    assert pm.packet_filter(ROUTER) == [
        {"SrcIPs": CLIENT_SRC, "DstPorts": [ports("fd00:1::5", 0, 65535)]}]
    lan = ipaddress.ip_network(V6_LAN)
    v4 = ipaddress.ip_network("10.9.0.0/24")
    # Only the IPv6 route carries the destination: only it is offered to the client.
    assert pm.routes_for_peer(CLIENT, ROUTER, [lan, v4]) == [lan]


def test_ipv6_auto_approvers() -> None:
    announced = replace(node(4, ("tag:router",)), hostinfo={"RoutableIPs": [
        V6_LAN, "fd00:2::/64", "::/0", "0.0.0.0/0"]})
    pm = manager({"autoApprovers": {"routes": {"fd00:1::/48": ["tag:router"],
                                               "::/0": ["tag:router"]}}}, [announced, CLIENT])
    # ::/0 in routes approves every IPv6 subnet but never the exit routes.
    assert {str(r) for r in pm.auto_approved_routes(announced)} == {V6_LAN, "fd00:2::/64"}
    pm = manager({"autoApprovers": {"exitNode": ["tag:router"]}}, [announced, CLIENT])
    assert {str(r) for r in pm.auto_approved_routes(announced)} == {"::/0", "0.0.0.0/0"}


def test_via_grant_to_an_ipv6_prefix() -> None:
    pm = manager({"grants": [{"src": ["tag:client"], "dst": [V6_LAN], "ip": ["tcp:443"],
                              "via": ["tag:router"]}]})
    assert pm.packet_filter(ROUTER) == [
        {"SrcIPs": CLIENT_SRC, "DstPorts": [ports(V6_LAN, 443, 443)], "IPProto": [6]}]
    lan = ipaddress.ip_network(V6_LAN)
    assert pm.routes_for_peer(CLIENT, ROUTER, []) == [lan]  # steered although not primary
    assert pm.routes_for_peer(MEMBER, ROUTER, [lan]) == []


def test_node_attrs_target_an_ipv6_address() -> None:
    pm = manager({"nodeAttrs": [{"target": ["fd7a:115c:a1e0::3"], "attr": ["magicdns-aaaa"]}]})
    assert "magicdns-aaaa" in pm.node_capmap(MEMBER)
    assert "magicdns-aaaa" not in pm.node_capmap(CLIENT)


@pytest.mark.parametrize("dst", ["[fd7a:115c:a1e0::2]:22", "fd7a:115c:a1e0::2:22"])
def test_policy_tests_with_ipv6_destinations(dst: str) -> None:
    grants = [{"src": ["tag:client"], "dst": ["fd7a:115c:a1e0::2"], "ip": ["tcp:22"]}]
    manager({"grants": grants, "tests": [{"src": "tag:client", "accept": [dst]}]})
    manager({"grants": grants, "tests": [{"src": "fd7a:115c:a1e0::3", "deny": [dst]}]})
    with pytest.raises(PolicyTestError):
        manager({"grants": grants, "tests": [{"src": "tag:client", "deny": [dst]}]})


def test_a_zone_is_dropped_as_netip_prefix_from_does() -> None:
    """Headscale parses a bare address with netip.ParseAddr, then Addr.Prefix/PrefixFrom,
    which drop an IPv6 zone: "%eth0" neither fails nor changes the destination."""
    for rule in ({"grants": [{"src": ["tag:client"], "dst": ["fd7a:115c:a1e0::2%eth0"],
                              "ip": ["tcp:22"]}]},
                 {"acls": [{"action": "accept", "src": ["tag:client"],
                            "dst": ["[fd7a:115c:a1e0::2%eth0]:22"]}]}):
        dst = manager(rule).packet_filter(SERVER)[0]["DstPorts"]
        assert dst == [ports("fd7a:115c:a1e0::2")]


def test_an_ipv4_mapped_ipv6_literal_is_not_the_ipv4_node() -> None:
    """::ffff:100.64.0.2 stays an IPv6 address (as in netip): no node has it, so the rule
    reaches nobody and opens nothing on the IPv4 node."""
    pm = manager({"grants": [{"src": ["tag:client"], "dst": ["::ffff:100.64.0.2"],
                              "ip": ["tcp:22"]}]})
    assert all(pm.packet_filter(n) == [] for n in NODES)
    assert not pm.can_see(CLIENT, SERVER)


def test_an_ipv6_literal_in_brackets_without_a_port_is_refused() -> None:
    with pytest.raises(PolicyError, match="invalid alias format"):
        manager({"grants": [{"src": ["tag:client"], "dst": ["[fd7a:115c:a1e0::2]"],
                             "ip": ["tcp:22"]}]})
