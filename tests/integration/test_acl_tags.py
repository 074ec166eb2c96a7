"""Headscale's ACL scenarios with tags (integration/acl_test.go: AutogroupTagged,
AutogroupSelf, TagPropagation, TagPropagationPortSpecific) on one tailnet of official
clients. Tagged nodes join with tagged pre-auth keys (tags as identity); an admin changes
tags with `headscale nodes tag`, and the clients must follow without a restart.

Nodes: t1/t2 (tag:test, keys of user1/user2), r (tag:router-node, key of user-router),
u1/u1b (user1), u2/u2b (user2), tt (a tagged node the propagation cases re-tag), and nodes
joined by the cases that turn a user's node into a tagged one. See acl_lab.py for the
witness and the revision port.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.acl_lab import AclLab, acl
from tests.integration.versions import MIDDLE, NEWEST, OLDEST
from tests.integration.world import shared_world_fixture, wait_for

pytestmark = pytest.mark.integration

TAG_OWNERS = {t: ["user1@"] for t in (
    "tag:test", "tag:shared", "tag:other", "tag:team-a", "tag:team-b", "tag:web",
    "tag:internal", "tag:server", "tag:webserver", "tag:sshonly")}
TAG_OWNERS["tag:test"] = ["user1@", "user2@"]
TAG_OWNERS["tag:router-node"] = ["user-router@"]


def policy(*rules: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A policy with this file's tag owners (every tag a node here may carry)."""
    return {"tagOwners": TAG_OWNERS, **extra, "acls": list(rules)}


def _boot(lab: AclLab) -> None:
    keys = {
        "t1": {"user": "user1", "reusable": True, "tags": ["tag:test"]},
        "t2": {"user": "user2", "reusable": True, "tags": ["tag:test"]},
        "router": {"user": "user-router", "reusable": True, "tags": ["tag:router-node"]},
        "shared": {"user": "user1", "reusable": True, "tags": ["tag:shared"]},
    }
    lab.boot(["user1", "user2", "user-router"], [
        ("t1", "t1", NEWEST), ("t2", "t2", MIDDLE),
        ("u1", "user1", OLDEST), ("u1b", "user1", NEWEST),
        ("u2", "user2", NEWEST), ("u2b", "user2", OLDEST),
        ("r", "router", MIDDLE), ("tt", "shared", NEWEST),
    ], keys=keys, policy=policy(acl(["*"], ["*:*"])))


lab = shared_world_fixture(AclLab, _boot)


def tags_of(lab: AclLab, name: str) -> list[str]:
    return sorted(lab.nodes[name].status_json()["Self"].get("Tags") or [])


def set_tags(lab: AclLab, name: str, tags: list[str]) -> None:
    """`headscale nodes tag`, then the server lists exactly those tags."""
    assert lab.server is not None
    args = ["nodes", "tag", "-i", lab.node_id(name)]
    for t in tags:
        args += ["-t", t]
    r = lab.cli(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    node = lab.server.cli_json("nodes", "list")
    assert sorted(next(n for n in node if n["name"] == name)["tags"]) == sorted(tags)
    wait_for(f"{name} to carry {tags}", lambda: tags_of(lab, name) == sorted(tags), 30)


def test_autogroup_tagged(lab: AclLab) -> None:
    """autogroup:tagged -> autogroup:tagged: the two tagged nodes see and reach each other;
    untagged nodes see nobody and reach nobody."""
    lab.set_policy(policy(acl(["autogroup:tagged"], ["autogroup:tagged:*"])))
    assert tags_of(lab, "t1") == tags_of(lab, "t2") == ["tag:test"]
    assert tags_of(lab, "u1") == tags_of(lab, "u2") == []
    lab.wait_peers("t1", {"t2", "r", "tt"})
    lab.wait_peers("t2", {"t1", "r", "tt"})
    for name in ("u1", "u2"):
        lab.wait_peers(name, set())
    lab.expect_reach("t1", "t2")
    lab.expect_reach("t2", "t1")
    for src, dst in (("u1", "t1"), ("u1", "t2"), ("u1", "u2"), ("u2", "t1"), ("u2", "u1"),
                     ("t1", "u1"), ("t2", "u2")):
        lab.expect_denied(src, dst)


def test_autogroup_self(lab: AclLab) -> None:
    """autogroup:member -> autogroup:self next to group:home <-> tag:router-node: a user's
    devices reach each other and the router, never the other user's devices."""
    lab.set_policy(policy(
        acl(["autogroup:member"], ["autogroup:self:*"]),
        acl(["group:home"], ["tag:router-node:*"]),
        acl(["tag:router-node"], ["group:home:*"]),
        groups={"group:home": ["user1@", "user2@"]}))
    for name, mine in (("u1", "u1b"), ("u1b", "u1"), ("u2", "u2b"), ("u2b", "u2")):
        lab.wait_peers(name, {mine, "r"})
    lab.wait_peers("r", {"u1", "u1b", "u2", "u2b"})
    for src, dst in (("u1", "u1b"), ("u1b", "u1"), ("u2", "u2b"), ("u2b", "u2")):
        lab.expect_reach(src, dst)
    for src in ("u1", "u1b", "u2", "u2b"):
        lab.expect_reach(src, "r")
    for src, dst in (("u1", "u2"), ("u1", "u2b"), ("u1b", "u2"), ("u2", "u1"), ("u2", "u1b"),
                     ("u2b", "u1b")):
        lab.expect_denied(src, dst)


def visible(lab: AclLab, src: str, dst: str) -> bool:
    return dst in lab.peers(src)


def check_access(lab: AclLab, src: str, dst: str, allowed: bool) -> None:
    """What `src` sees and gets once the change is in: the peer listed and its port 80
    answering, or neither (waiting for `dst`'s own filter to drop `src` first)."""
    wait_for(f"{src} to {'list' if allowed else 'not list'} {dst}",
             lambda: visible(lab, src, dst) == allowed, 60)
    if allowed:
        lab.expect_reach(src, dst)
    else:
        wait_for(f"{dst}'s filter to refuse {src}",
                 lambda: not lab.filter_allows(dst, src, 80), 60)
        lab.expect_denied(src, dst)


def self_access() -> list[dict[str, Any]]:
    return [acl(["user1@"], ["user1@:*"]), acl(["user2@"], ["user2@:*"])]


def two_way(tag: str) -> list[dict[str, Any]]:
    return [acl(["user2@"], [f"{tag}:*"]), acl([tag], ["user2@:*"])]


@pytest.mark.parametrize("case", [
    "add-tag-grants-access", "remove-tag-revokes-access", "change-tag-changes-access",
    "multiple-tags-partial-removal", "tag-change-updates-peer-identity"])
def test_tag_propagation(lab: AclLab, case: str) -> None:
    """A tag change on the server changes, on running clients, who sees and reaches the
    node: user2's u2 probes the target before and after."""
    src = "u2"
    if case == "add-tag-grants-access":
        lab.set_policy(policy(*self_access(), *two_way("tag:shared")))
        target = "x-add"
        lab.add_node(target, "user1", OLDEST)
        lab.wait_rev()
        before, after, tags = False, True, ["tag:shared"]
    elif case == "tag-change-updates-peer-identity":
        lab.set_policy(policy(acl(["user2@"], ["user2@:*"]), *two_way("tag:server")))
        target = "x-id"
        lab.add_node(target, "user1", MIDDLE)
        lab.wait_rev()
        before, after, tags = False, True, ["tag:server"]
    else:
        target = "tt"
        start, before, tags, after, rules = {
            "remove-tag-revokes-access": (["tag:shared"], True, ["tag:other"], False,
                                          two_way("tag:shared")),
            "change-tag-changes-access": (["tag:team-a"], False, ["tag:team-b"], True,
                                          two_way("tag:team-b")),
            "multiple-tags-partial-removal": (["tag:web", "tag:internal"], True,
                                              ["tag:internal"], False, two_way("tag:web")),
        }[case]
        lab.set_policy(policy(acl(["user2@"], ["user2@:*"]), *rules))
        set_tags(lab, target, start)
    check_access(lab, src, target, before)
    set_tags(lab, target, tags)
    check_access(lab, src, target, after)


def test_tag_propagation_port_specific(lab: AclLab) -> None:
    """tag:webserver opens port 80 to user2, tag:sshonly only 22: re-tagging keeps the node
    listed (22 stays open) but closes 80."""
    lab.set_policy(policy(
        acl(["user2@"], ["tag:webserver:80"]),
        acl(["user2@"], ["tag:sshonly:22"]),
        acl(["user2@"], ["tag:webserver:*", "tag:sshonly:*"], proto="icmp"),
        acl(["tag:webserver", "tag:sshonly"], ["user2@:*"])))
    set_tags(lab, "tt", ["tag:webserver"])
    lab.expect_reach("u2", "tt", 80)
    set_tags(lab, "tt", ["tag:sshonly"])
    wait_for("tt's filter to close 80 to u2",
             lambda: not lab.filter_allows("tt", "u2", 80), 60)
    assert visible(lab, "u2", "tt"), "the peer left u2's netmap although 22 is still open"
    lab.expect_reach("u2", "tt", 22)
    lab.expect_denied("u2", "tt", 80)
