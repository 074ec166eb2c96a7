"""`--advertise-tags` at interactive registration, checked against tagOwners."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyheadscale.control.tagowners import user_can_have_tag
from pyheadscale.policy import PolicyManager
from pyheadscale.state.errors import InvalidArgument
from pyheadscale.state.tailnet import Tailnet
from tests.unit._statefix import key, make_cfg, new_engine, open_tailnet

POLICY = {
    "groups": {"group:ops": ["bob@"]},
    "tagOwners": {"tag:web": ["alice@"], "tag:db": ["group:ops"], "tag:child": ["tag:web"]},
    "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
}


async def _tailnet(tmp_path: Path) -> tuple[Tailnet, int, int]:
    tn = await open_tailnet(new_engine(tmp_path), make_cfg(node={"expiry": "24h"}))
    alice = await tn.create_user("alice")
    bob = await tn.create_user("bob")

    def allowed(user, node, tag):  # type: ignore[no-untyped-def]
        pm = PolicyManager(json.dumps(POLICY), list(tn.users.values()), list(tn.nodes.values()))
        return user_can_have_tag(pm, user, node, tag)

    tn.tag_authorizer = allowed
    return tn, alice.id, bob.id


async def test_owned_tags_tag_the_node_and_reauth_without_returns_it(tmp_path: Path) -> None:
    tn, alice, _ = await _tailnet(tmp_path)
    n = await tn.register_for_user(key(1), key(2), alice,
                                   {"Hostname": "web", "RequestTags": ["tag:web"]})
    assert n.tags == ("tag:web",) and n.user_id is None and n.expiry is None
    # Tags may own tags: the node already carries tag:web, which owns tag:child.
    n = await tn.register_for_user(key(1), key(3), alice,
                                   {"Hostname": "web", "RequestTags": ["tag:child", "tag:web"]})
    assert n.tags == ("tag:child", "tag:web")
    back = await tn.register_for_user(key(1), key(4), alice, {"Hostname": "web"})
    assert (back.id, back.tags, back.user_id) == (n.id, (), alice)
    assert back.expiry is not None  # a user's node gets the default expiry again
    await tn.close()


async def test_unowned_tags_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    tn, alice, bob = await _tailnet(tmp_path)
    with pytest.raises(InvalidArgument) as ei:
        await tn.register_for_user(key(1), key(2), alice,
                                   {"Hostname": "x", "RequestTags": ["tag:db", "tag:web"]})
    assert str(ei.value) == "requested tags [tag:db] are invalid or not permitted"
    assert tn.nodes == {}
    with pytest.raises(InvalidArgument):
        await tn.register_for_user(key(1), key(2), bob,
                                   {"Hostname": "x", "RequestTags": ["tag:nosuch"]})
    n = await tn.register_for_user(key(1), key(2), bob,
                                   {"Hostname": "x", "RequestTags": ["tag:db"]})  # via group
    assert n.tags == ("tag:db",)
    await tn.close()


async def test_without_an_authorizer_every_tag_is_refused(tmp_path: Path) -> None:
    tn = await open_tailnet(new_engine(tmp_path), make_cfg())
    u = await tn.create_user("alice")
    with pytest.raises(InvalidArgument):
        await tn.register_for_user(key(1), key(2), u.id,
                                   {"Hostname": "x", "RequestTags": ["tag:web"]})
    await tn.close()


async def test_a_preauth_key_join_refuses_any_advertised_tag_but_a_rejoin_ignores_them(
        tmp_path: Path) -> None:
    """Headscale 0.29.2: a new node joining with a key gets the key's tags only, so every
    `--advertise-tags` (the key's own tag too) is refused, listed as sent; the same machine
    registering again keeps its tags whatever it advertises."""
    tn, alice, _ = await _tailnet(tmp_path)
    _, tagged = await tn.create_preauth_key(alice, reusable=True, ephemeral=False,
                                            expiration=None, tags=("tag:web",))
    for asked in (["tag:web"], ["tag:web", "tag:db"], ["tag:zz", "tag:db"]):
        with pytest.raises(InvalidArgument) as ei:
            await tn.register_with_authkey(key(1), key(2), None,
                                           {"Hostname": "x", "RequestTags": asked}, key=tagged)
        assert str(ei.value) == f"requested tags [{' '.join(asked)}] are invalid or not permitted"
    assert tn.nodes == {}
    n = await tn.register_with_authkey(key(1), key(2), None, {"Hostname": "x"}, key=tagged)
    assert n.tags == ("tag:web",)
    again = await tn.register_with_authkey(key(1), key(3), key(2),
                                           {"Hostname": "x", "RequestTags": ["tag:db"]},
                                           key=tagged)
    assert (again.id, again.tags) == (n.id, ("tag:web",))
    await tn.close()
