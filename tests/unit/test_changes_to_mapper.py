"""The changes state/ really publishes, fed to the mapper: what a viewer's stream receives.

Each test makes a write through Tailnet, takes the batch its bus delivers to a subscribed
viewer, and checks the delta the mapper builds from it (the same path a map poll takes).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pyheadscale.mapper import MapContext, delta, to_plain
from pyheadscale.mapper.full import PeerView
from pyheadscale.state.changes import Change, ChangeKind, Field, Subscription
from pyheadscale.state.model import Node
from pyheadscale.state.tailnet import Tailnet
from tests.unit._statefix import key, make_cfg, new_engine, open_tailnet

NOW = datetime(2026, 8, 22, 16, 0, tzinfo=UTC)


async def _two_users(tn: Tailnet) -> tuple[Tailnet, Node, Node, Node]:
    """alice owns a1 and a2, bob owns b1."""
    alice = await tn.create_user("alice")
    bob = await tn.create_user("bob")
    _, ka = await tn.create_preauth_key(alice.id, reusable=True)
    _, kb = await tn.create_preauth_key(bob.id)
    a1 = await tn.register_with_authkey(key(1), key(11), None, {"Hostname": "a1"}, key=ka)
    a2 = await tn.register_with_authkey(key(2), key(12), None, {"Hostname": "a2"}, key=ka)
    b1 = await tn.register_with_authkey(key(3), key(13), None, {"Hostname": "b1"}, key=kb)
    return tn, a1, a2, b1


async def _next(sub: Subscription) -> list[Change]:
    return await sub.__anext__()


def _sent(ids: set[int]) -> dict[int, PeerView]:
    """What the viewer's stream holds: these peers, sent without routes (none has any)."""
    return {i: PeerView() for i in ids}


def _delta(tn: Tailnet, batch: list[Change], viewer: Node, known: set[int]) -> dict[str, Any]:
    resp, _ = delta(batch, tn.nodes, tn.users, tn.nodes[viewer.id], MapContext(), NOW,
                    _sent(known))
    assert resp is not None
    out: dict[str, Any] = to_plain(resp)
    return out


async def test_user_change_resends_only_that_users_profile(tailnet: Tailnet) -> None:
    tn, a1, a2, b1 = await _two_users(tailnet)
    sub = tn.bus.subscribe(a1.id)
    assert b1.user_id is not None
    await tn.update_user(b1.user_id, display_name="Bobby")
    batch = await _next(sub)
    assert batch == [Change(ChangeKind.USER, user_id=b1.user_id)]
    got = _delta(tn, batch, a1, {a2.id, b1.id})
    assert got["UserProfiles"] == [{"ID": b1.user_id, "LoginName": "bob",
                                    "DisplayName": "Bobby"}]
    assert "PeersChanged" not in got and "Node" not in got


async def test_user_without_visible_nodes_changes_nothing_for_the_viewer(
        tailnet: Tailnet) -> None:
    tn, a1, a2, _ = await _two_users(tailnet)
    sub = tn.bus.subscribe(a1.id)
    carol = await tn.create_user("carol")
    batch = await _next(sub)
    assert batch == [Change(ChangeKind.USER, user_id=carol.id)]
    resp, _ = delta(batch, tn.nodes, tn.users, tn.nodes[a1.id], MapContext(), NOW,
                    _sent({a2.id}))
    assert resp is None


async def test_endpoint_and_derp_report_is_a_patch_for_peers(tailnet: Tailnet) -> None:
    tn, a1, a2, b1 = await _two_users(tailnet)
    sub = tn.bus.subscribe(a1.id)
    await tn.update_from_map_request(a2.id, endpoints=["192.0.2.9:41641"],
                                     hostinfo={"Hostname": "a2",
                                               "NetInfo": {"PreferredDERP": 901}})
    batch = await _next(sub)
    assert [(c.kind, c.node_id, c.fields) for c in batch] == [
        (ChangeKind.NODE_PATCH, a2.id, frozenset({Field.ENDPOINTS, Field.HOME_DERP}))]
    got = _delta(tn, batch, a1, {a2.id, b1.id})
    assert got["PeersChangedPatch"] == [{"NodeID": a2.id, "Endpoints": ["192.0.2.9:41641"],
                                         "DERPRegion": 901}]
    assert "PeersChanged" not in got


async def test_tagging_the_viewer_reevaluates_its_filter(tailnet: Tailnet) -> None:
    tn, a1, a2, b1 = await _two_users(tailnet)
    sub = tn.bus.subscribe(a1.id)
    await tn.set_tags(a1.id, ["tag:server"])
    batch = await _next(sub)
    kinds = {c.kind for c in batch}
    assert kinds == {ChangeKind.NODE_CHANGED, ChangeKind.POLICY}
    got = _delta(tn, batch, a1, {a2.id, b1.id})
    assert got["Node"]["Tags"] == ["tag:server"]
    assert {"PacketFilter", "SSHPolicy", "DNSConfig"} <= set(got)


async def test_backfilled_address_of_the_viewer_reevaluates_its_filter(
        tmp_path: Path) -> None:
    """ADDRESSES is an identity field: the viewer's own filter is sent again."""
    engine = new_engine(tmp_path)
    v4_only = make_cfg(prefixes={"v4": "100.64.0.0/10"})
    tn = await open_tailnet(engine, v4_only)
    u = await tn.create_user("alice")
    _, k = await tn.create_preauth_key(u.id, reusable=True)
    a1 = await tn.register_with_authkey(key(1), key(11), None, {"Hostname": "a1"}, key=k)
    a2 = await tn.register_with_authkey(key(2), key(12), None, {"Hostname": "a2"}, key=k)
    await tn.close()
    tn = await open_tailnet(engine, make_cfg())  # IPv6 added to the configuration
    sub = tn.bus.subscribe(a1.id)
    assert len(await tn.backfill_node_ips()) == 2
    batch = await _next(sub)
    assert {(c.node_id, c.fields) for c in batch} == {
        (a1.id, frozenset({Field.ADDRESSES})), (a2.id, frozenset({Field.ADDRESSES}))}
    got = _delta(tn, batch, a1, {a2.id})
    assert got["Node"]["Addresses"][1].startswith("fd7a:115c:a1e0::")
    assert "PacketFilter" in got
    assert [p["ID"] for p in got["PeersChanged"]] == [a2.id]
    await tn.close()
