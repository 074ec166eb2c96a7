"""apply_map_request: what a MapRequest changes about its node, without a tailnet."""

from __future__ import annotations

import ipaddress

from pyheadscale.state.changes import Field
from pyheadscale.state.mapreq import apply_map_request, merge_hostinfo
from pyheadscale.state.model import Node
from tests.unit._statefix import make_node

NETINFO = {"PreferredDERP": 900, "WorkingUDP": True}


def node(**kw: object) -> Node:
    fields: dict[str, object] = dict(
        disco_key=b"\x03" * 32, hostname="laptop", given_name="laptop",
        endpoints=("192.0.2.1:41641",), version=3,
        hostinfo={"Hostname": "laptop", "OS": "linux", "NetInfo": NETINFO})
    return make_node(1, **(fields | kw))


def test_nothing_reported_is_the_same_object() -> None:
    old = node()
    assert apply_map_request(old) == (old, frozenset())
    new, fields = apply_map_request(old, endpoints=old.endpoints, disco_key=old.disco_key,
                                    hostinfo=dict(old.hostinfo))
    assert new is old and fields == frozenset()


def test_empty_values_never_overwrite_known_ones() -> None:
    old = node()
    new, fields = apply_map_request(old, endpoints=(), disco_key=bytes(32), hostinfo={})
    assert new is old and not fields


def test_endpoints_and_disco_key_are_patch_fields() -> None:
    new, fields = apply_map_request(node(), endpoints=["198.51.100.7:41641"],
                                    disco_key=b"\x09" * 32)
    assert fields == {Field.ENDPOINTS, Field.DISCO_KEY}
    assert new.endpoints == ("198.51.100.7:41641",) and new.disco_key == b"\x09" * 32
    assert new.version == 3  # versions and timestamps are the caller's


def test_omitted_netinfo_is_kept_and_a_new_home_derp_is_its_own_field() -> None:
    old = node()
    new, fields = apply_map_request(old, hostinfo={"Hostname": "laptop", "OS": "linux"})
    assert new is old and not fields  # clients omit NetInfo when it did not change
    moved = {**NETINFO, "PreferredDERP": 901}
    new, fields = apply_map_request(old, hostinfo={"Hostname": "laptop", "OS": "linux",
                                                   "NetInfo": moved})
    assert fields == {Field.HOME_DERP} and new.hostinfo["NetInfo"] == moved
    new, fields = apply_map_request(old, hostinfo={"Hostname": "laptop", "OS": "linux",
                                                   "NetInfo": {**NETINFO, "WorkingUDP": False}})
    assert fields == {Field.HOSTINFO}


def test_announced_routes_are_their_own_field() -> None:
    hi = {"Hostname": "laptop", "OS": "linux", "RoutableIPs": ["10.1.0.0/24"]}
    new, fields = apply_map_request(node(), hostinfo=hi)
    assert fields == {Field.ROUTES, Field.HOSTINFO}
    assert new.announced_routes == (ipaddress.ip_network("10.1.0.0/24"),)


def test_new_hostname_renames_a_derived_name_to_a_free_one() -> None:
    new, fields = apply_map_request(node(), hostinfo={"Hostname": "Work Laptop", "OS": "linux"},
                                    taken_names={"work-laptop"})
    assert fields == {Field.HOSTINFO, Field.HOSTNAME, Field.GIVEN_NAME}
    assert (new.hostname, new.given_name) == ("Work Laptop", "work-laptop-1")
    assert new.hostinfo["NetInfo"] == NETINFO


def test_an_admin_rename_sticks() -> None:
    new, fields = apply_map_request(node(given_name="build-box"),
                                    hostinfo={"Hostname": "other", "OS": "linux"})
    assert fields == {Field.HOSTINFO, Field.HOSTNAME}
    assert new.given_name == "build-box"


def test_merge_hostinfo_keeps_netinfo_only_when_omitted() -> None:
    assert merge_hostinfo({"NetInfo": NETINFO}, {"OS": "linux"}) == {"OS": "linux",
                                                                     "NetInfo": NETINFO}
    assert merge_hostinfo({"NetInfo": NETINFO}, {"NetInfo": {}}) == {"NetInfo": {}}
