"""Headscale's tags scenarios with interactive login and the admin's tools
(integration/tags_test.go suites 1, 4 and 6, TestTagsIssue2978ReproTagReplacement, and
cli_nodes_test.go TestNodeTagCommand), with official clients: `tailscale up
--advertise-tags` at a login the admin completes with `headscale auth register`, re-login to
add, remove or drop tags, admin tags that the client's CLI cannot undo, and what
`headscale nodes tag` and POST /api/v1/node/{id}/tags accept and refuse. See tags_lab.py.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.integration.tags_lab import (
    NONEXISTENT,
    OWNED,
    SECOND,
    UNOWNED,
    USER,
    TagsLab,
    refusal,
    self_tags,
)
from tests.integration.tailscale import Tailscaled
from tests.integration.versions import MIDDLE, NEWEST, OLDEST
from tests.integration.world import interactive_up, shared_world_fixture

pytestmark = pytest.mark.integration

lab = shared_world_fixture(TagsLab, TagsLab.boot)


def test_owned_tag_at_registration(lab: TagsLab) -> None:
    """UserLoginOwnedTagAtRegistration: taguser owns the tag, the node joins tagged."""
    ts = lab.client("ow", MIDDLE)
    node = lab.web_login(ts, f"--advertise-tags={OWNED}")
    lab.expect_tags(ts, (OWNED,))
    assert node["expiry"] is None  # tagged nodes do not expire


@pytest.mark.parametrize(("version", "tag"), [
    pytest.param(OLDEST, NONEXISTENT, id="UserLoginNonExistentTagAtRegistration"),
    pytest.param(NEWEST, UNOWNED, id="UserLoginUnownedTagAtRegistration"),
])
def test_tag_the_user_may_not_have_at_registration(lab: TagsLab, version: str,
                                                   tag: str) -> None:
    """`headscale auth register` refuses the login with Headscale's words and registers
    nothing; the same client asking for an owned tag then joins (the refusal was the tag's)."""
    ts = lab.client("no", version)
    up, auth_id = interactive_up(ts, lab.srv, f"--advertise-tags={tag}")
    try:
        r = lab.srv.cli("auth", "register", "--auth-id", auth_id, "--user", USER)
        assert r.returncode != 0
        assert refusal(tag) in r.stdout + r.stderr
        assert lab.nodes_named(ts) == []
        assert ts.backend_state() != "Running"
    finally:
        up.kill()
        up.wait()
    lab.web_login(ts, f"--advertise-tags={OWNED}")
    lab.expect_tags(ts, (OWNED,))


@pytest.mark.parametrize(("version", "first", "then"), [
    pytest.param(OLDEST, (OWNED,), (OWNED, SECOND), id="UserLoginAddTagViaCLIReauth"),
    pytest.param(MIDDLE, (OWNED, SECOND), (OWNED,), id="UserLoginRemoveTagViaCLIReauth"),
    pytest.param(NEWEST, (OWNED, SECOND), (), id="UserLoginReauthWithEmptyTagsRemovesAllTags"),
])
def test_relogin_changes_the_tags(lab: TagsLab, version: str, first: tuple[str, ...],
                                  then: tuple[str, ...]) -> None:
    """A plain `tailscale up --advertise-tags=<new>` asks for no new login (the client only
    updates its prefs; its register request with the same node key gets the node as it is,
    as in Headscale 0.29.2, whose test logs the outcome without asserting it): the tags stay.
    With --force-reauth the client logs in again; once the admin registers that login the
    same node carries the new tags, and with none it is taguser's again with an expiry."""
    ts = lab.client("re", version)
    node = lab.web_login(ts, f"--advertise-tags={','.join(first)}")
    lab.expect_tags(ts, first)
    r = lab.up(ts, None, f"--advertise-tags={','.join(then)}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "/register/" not in r.stdout + r.stderr
    lab.expect_unchanged(ts, node, first)
    after = lab.web_login(ts, f"--advertise-tags={','.join(then)}", "--force-reauth")
    lab.expect_tags(ts, then)
    assert (after["id"], after["ipAddresses"]) == (node["id"], node["ipAddresses"])
    assert (after["expiry"] is None) == bool(then)


@pytest.mark.parametrize(("version", "admin"), [
    pytest.param(MIDDLE, (SECOND,), id="UserLoginCLINoOpAfterAdminAssignment"),
    pytest.param(OLDEST, (OWNED, SECOND), id="UserLoginCLICannotRemoveAdminTags"),
])
def test_admin_tags_make_the_client_cli_a_no_op(lab: TagsLab, version: str,
                                                admin: tuple[str, ...]) -> None:
    """Logged in with tag:valid-owned, re-tagged by the admin, then `tailscale up
    --advertise-tags=tag:valid-owned` again: no new login is asked, the admin's tags stay."""
    ts = lab.client("na", version)
    node = lab.web_login(ts, f"--advertise-tags={OWNED}")
    lab.admin_tags(ts, *admin)
    r = lab.up(ts, None, f"--advertise-tags={OWNED}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "/register/" not in r.stdout + r.stderr
    lab.expect_unchanged(ts, node, admin)


def test_issue_2978_tag_replacement_reaches_the_node_at_once(lab: TagsLab) -> None:
    """Issue2978ReproTagReplacement: each admin replacement shows in the node's own status
    and netmap after ONE call (the bug needed the same call twice), and to its peers."""
    ts = lab.client("rp", OLDEST)
    lab.web_login(ts, f"--advertise-tags={OWNED}")
    lab.expect_tags(ts, (OWNED,))
    for tags in ((SECOND,), (UNOWNED,)):
        lab.admin_tags(ts, *tags)  # waits (30 s at most) for self, netmap and the watcher


def test_convert_tags_only_node_to_user_via_cli_register(lab: TagsLab) -> None:
    """AuthKeyConvertToUserViaCLIRegister (Headscale #3038: the server crashed building the
    map of a node converted from a user-less tagged key): re-login with no tags, registered
    for taguser, gives taguser's node back, and the server keeps serving everyone."""
    ts = lab.client("cv", MIDDLE)
    node = lab.joined(ts, lab.key((OWNED,), user=None))
    lab.expect_tags(ts, (OWNED,))
    after = lab.web_login(ts, "--advertise-tags=", "--force-reauth")
    lab.expect_tags(ts, ())
    assert after["id"] == node["id"] and after["user"]["name"] == USER
    assert lab.srv.running
    assert ts.ping(lab.watcher.ip("4")[0], count=3, until_direct=False).returncode == 0
    assert lab.watcher.ping(ts.ip("4")[0], count=3, until_direct=False).returncode == 0


# -- the admin API (POST /api/v1/node/{id}/tags) and `headscale nodes tag` --------------------


def tagged_node(lab: TagsLab, prefix: str, version: str) -> tuple[Tailscaled, str]:
    ts = lab.client(prefix, version)
    node = lab.joined(ts, lab.key((OWNED,)))
    lab.expect_tags(ts, (OWNED,))
    return ts, str(node["id"])


@pytest.mark.parametrize(("version", "tags", "words"), [
    pytest.param(OLDEST, [NONEXISTENT], refusal(NONEXISTENT),
                 id="AdminAPICannotSetNonExistentTag"),
    pytest.param(MIDDLE, [], "cannot remove all tags from a node - tagged nodes must have at "
                 "least one tag", id="AdminAPICannotRemoveAllTags"),
    pytest.param(NEWEST, ["invalid-no-prefix"], "tag must start with the string 'tag:'",
                 id="AdminAPICannotSetInvalidFormat"),
])
def test_admin_api_refuses(lab: TagsLab, version: str, tags: list[str], words: str) -> None:
    """Refused by the API and by the CLI with Headscale's message; the node keeps its tags.
    The same call with a defined tag then succeeds (the refusal was the tags')."""
    ts, nid = tagged_node(lab, "ar", version)
    status, body = lab.api("POST", f"/api/v1/node/{nid}/tags", {"tags": tags})
    # Headscale answers InvalidArgument with exactly these words (400 here also for the
    # malformed tag, which Headscale's gateway turns into a 500: docs/decisions.md).
    assert (status, body["code"], body["message"]) == (400, 3, words), (status, body)
    r = lab.set_tags(nid, *tags)
    assert r.returncode != 0 and words in r.stdout + r.stderr, r.stdout + r.stderr
    lab.expect_tags(ts, (OWNED,))
    status, body = lab.api("POST", f"/api/v1/node/{nid}/tags", {"tags": [SECOND]})
    assert status == 200 and body["node"]["tags"] == [SECOND], (status, body)
    lab.expect_tags(ts, (SECOND,))


def test_admin_api_can_set_unowned_tag(lab: TagsLab) -> None:
    """AdminAPICanSetUnownedTag: tag ownership binds clients, not the admin."""
    ts, nid = tagged_node(lab, "au", NEWEST)
    status, body = lab.api("POST", f"/api/v1/node/{nid}/tags", {"tags": [UNOWNED]})
    assert status == 200 and body["node"]["tags"] == [UNOWNED], (status, body)
    lab.expect_tags(ts, (UNOWNED,))
    status, body = lab.api("GET", f"/api/v1/node/{nid}")
    assert status == 200 and body["node"]["tags"] == [UNOWNED]


def test_node_tag_command(lab: TagsLab) -> None:
    """cli_nodes_test.go TestNodeTagCommand: `headscale nodes tag --tags a,b -o json` turns a
    user's node into a tagged one (listed as tagged-devices); no tags and a malformed tag are
    refused."""
    ts = lab.client("tc", OLDEST)
    node = lab.joined(ts, lab.key())
    lab.expect_tags(ts, ())
    nid = str(node["id"])
    r = lab.set_tags(nid, OWNED, SECOND)
    assert r.returncode == 0, r.stdout + r.stderr
    assert str(json.loads(r.stdout)["id"]) == nid
    lab.expect_tags(ts, (OWNED, SECOND))
    bare: subprocess.CompletedProcess[str] = lab.srv.cli("nodes", "tag", "--identifier", nid)
    assert bare.returncode != 0 and "cannot remove all tags" in bare.stdout + bare.stderr
    bad = lab.set_tags(nid, "not-a-valid-tag")
    assert bad.returncode != 0 and "tag must start with" in bad.stdout + bad.stderr
    lab.expect_tags(ts, (OWNED, SECOND))
    assert self_tags(ts) == sorted((OWNED, SECOND))
