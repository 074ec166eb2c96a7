"""Headscale's tags scenarios with pre-auth keys (integration/tags_test.go, suites 2, 3 and
5), with official clients: what a node joining with a tagged, untagged or user-less key
carries, what `tailscale up --advertise-tags` may and may not change afterwards, and that
tags an admin set survive the client's CLI. See tags_lab.py for the tailnet.

Headscale 0.29.2 rules shown here: a node joining with a key takes the key's tags and
nothing else (any `--advertise-tags` at that join is refused, listing what was asked); a
node that registers again with a key keeps its tags and owner, whatever it advertises.
"""

from __future__ import annotations

import pytest

from tests.integration.tags_lab import NONEXISTENT, OWNED, SECOND, UNOWNED, TagsLab, refusal
from tests.integration.versions import MIDDLE, NEWEST, OLDEST
from tests.integration.world import shared_world_fixture

pytestmark = pytest.mark.integration

lab = shared_world_fixture(TagsLab, TagsLab.boot)

TAGGED, PLAIN, NO_USER = "tagged", "plain", "no-user"


def make_key(lab: TagsLab, kind: str, reusable: bool = False) -> str:
    """tagged: taguser's key carrying tag:valid-owned; plain: taguser's untagged key;
    no-user: a tags-only key (tag:valid-owned, no user)."""
    if kind == TAGGED:
        return lab.key((OWNED,), reusable=reusable)
    if kind == NO_USER:
        return lab.key((OWNED,), user=None, reusable=reusable)
    return lab.key(reusable=reusable)


KEY_TAGS = {TAGGED: (OWNED,), NO_USER: (OWNED,), PLAIN: ()}


@pytest.mark.parametrize(("version", "kind", "asked"), [
    pytest.param(OLDEST, TAGGED, (SECOND,), id="WithTagRequestDifferentTag"),
    pytest.param(MIDDLE, TAGGED, (NONEXISTENT,), id="WithTagRequestNonExistentTag"),
    pytest.param(NEWEST, TAGGED, (UNOWNED,), id="WithTagRequestUnownedTag"),
    pytest.param(OLDEST, TAGGED, (OWNED,), id="WithTagRequestItsOwnTag"),
    pytest.param(MIDDLE, PLAIN, (OWNED,), id="WithoutTagCannotRequestTags"),
    pytest.param(NEWEST, PLAIN, (NONEXISTENT,), id="WithoutTagRequestNonExistentTag"),
    pytest.param(OLDEST, PLAIN, (UNOWNED,), id="WithoutTagRequestUnownedTag"),
    pytest.param(MIDDLE, NO_USER, (SECOND,), id="WithoutUserRejectsAdvertisedTags"),
])
def test_advertised_tags_at_a_key_join_are_refused(lab: TagsLab, version: str, kind: str,
                                                   asked: tuple[str, ...]) -> None:
    """`tailscale up --authkey K --advertise-tags=T` fails with Headscale's words and
    registers nothing; the same client with the same single-use key and no advertised
    tags then joins with the key's tags (the refusal spent nothing)."""
    ts = lab.client("rf", version)
    key = make_key(lab, kind)
    r = lab.up(ts, key, f"--advertise-tags={','.join(asked)}")
    assert r.returncode != 0, r.stdout
    assert refusal(*asked) in r.stdout + r.stderr
    assert lab.nodes_named(ts) == []
    assert ts.backend_state() != "Running"

    lab.joined(ts, key, "--advertise-tags=")
    lab.expect_tags(ts, KEY_TAGS[kind])


@pytest.mark.parametrize(("version", "kind"), [
    pytest.param(OLDEST, TAGGED, id="WithTagNoAdvertiseFlag"),
    pytest.param(MIDDLE, PLAIN, id="WithoutTagRegisterNoTags"),
    pytest.param(NEWEST, NO_USER, id="WithoutUserInheritsTags"),
])
def test_a_key_join_gives_the_keys_tags(lab: TagsLab, version: str, kind: str) -> None:
    """No `--advertise-tags`: a tagged key (with or without a user) makes a node tagged with
    the key's tags, owned by no user and without expiry; an untagged key a user's node."""
    ts = lab.client("jn", version)
    node = lab.joined(ts, make_key(lab, kind))
    lab.expect_tags(ts, KEY_TAGS[kind])
    assert (node["expiry"] is None) == bool(KEY_TAGS[kind]), node


@pytest.mark.parametrize(("version", "kind", "asked"), [
    pytest.param(OLDEST, TAGGED, (OWNED, SECOND), id="WithTagCannotAddViaCLI"),
    pytest.param(MIDDLE, TAGGED, (SECOND,), id="WithTagCannotChangeViaCLI"),
    pytest.param(OLDEST, PLAIN, (OWNED,), id="WithoutTagCannotAddViaCLI"),
])
def test_the_client_cli_cannot_change_a_key_nodes_tags(lab: TagsLab, version: str, kind: str,
                                                       asked: tuple[str, ...]) -> None:
    """Joined with a key, then `tailscale up --authkey K --advertise-tags=...`: the node keeps
    the tags it has (same node, still running). Depending on its version the client registers
    again with the key (v1.80.3 does: the server ignores the advertised tags then) or keeps
    its session and only changes its prefs; either way the tags stay."""
    ts = lab.client("cl", version)
    key = make_key(lab, kind, reusable=True)
    node = lab.joined(ts, key)
    lab.expect_tags(ts, KEY_TAGS[kind])
    r = lab.up(ts, key, f"--advertise-tags={','.join(asked)}")
    assert r.returncode == 0, r.stdout + r.stderr
    lab.expect_unchanged(ts, node, KEY_TAGS[kind])
    # The views checked above are live: an admin change still reaches all of them.
    lab.admin_tags(ts, UNOWNED)


@pytest.mark.parametrize(("version", "kind", "admin", "cli"), [
    pytest.param(NEWEST, TAGGED, (SECOND,), ("--force-reauth",),
                 id="WithTagAdminOverrideReauthPreserves"),
    pytest.param(OLDEST, TAGGED, (OWNED, SECOND), (f"--advertise-tags={OWNED}",),
                 id="WithTagCLICannotModifyAdminTags"),
    pytest.param(MIDDLE, PLAIN, (OWNED,), ("--reset",),
                 id="WithoutTagCLINoOpAfterAdminWithReset"),
    pytest.param(NEWEST, PLAIN, (OWNED,), ("--advertise-tags=",),
                 id="WithoutTagCLINoOpAfterAdminWithEmptyAdvertise"),
    pytest.param(OLDEST, PLAIN, (OWNED, SECOND), (f"--advertise-tags={OWNED}",),
                 id="WithoutTagCLICannotReduceAdminMultiTag"),
])
def test_admin_tags_survive_the_client_cli(lab: TagsLab, version: str, kind: str,
                                           admin: tuple[str, ...], cli: tuple[str, ...]) -> None:
    """Joined with a key, tagged by the admin (`headscale nodes tag`: the node, its own view
    and its peers follow), then `tailscale up --authkey K <flags>`: the admin's tags stay."""
    ts = lab.client("ad", version)
    key = make_key(lab, kind, reusable=True)
    node = lab.joined(ts, key)
    lab.expect_tags(ts, KEY_TAGS[kind])
    lab.admin_tags(ts, *admin)
    r = lab.up(ts, key, *cli)
    assert r.returncode == 0, r.stdout + r.stderr
    lab.expect_unchanged(ts, node, admin)
