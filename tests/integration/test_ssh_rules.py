"""Headscale's accept-mode SSH scenarios (integration/ssh_test.go) on one tailnet of official
clients: two users with two `--ssh` nodes each, mixed versions, and the policy swapped live
(`headscale policy set`) between scenarios. Each scenario first waits until every node's
netmap lets in exactly the sources the scenario expects, then tries every ordered pair:
allowed pairs get a root shell on the peer, the others a policy refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.ssh_lab import (
    addr4,
    all_pairs,
    judge_pairs,
    tailscale_ssh,
    wait_ssh_policy,
    wait_ssh_ready,
)
from tests.integration.test_policy import PolicyLab, acl
from tests.integration.versions import MIDDLE, NEWEST, OLDEST
from tests.integration.world import Reach, probe, serve_echo, shared_world_fixture, wait_for

pytestmark = pytest.mark.integration

NODES = {"u1a": ("user1", OLDEST), "u1b": ("user1", NEWEST),
         "u2a": ("user2", MIDDLE), "u2b": ("user2", OLDEST)}
PAIRS = all_pairs(NODES)
ALL_TCP = [acl(["*"], ["*:*"])]


def owner(name: str) -> str:
    return NODES[name][0]


def rule(src: list[str], dst: list[str]) -> dict[str, Any]:
    return {"action": "accept", "src": src, "dst": dst, "users": ["root"]}


def setup(lab: PolicyLab) -> None:
    lab.start_server({"acls": ALL_TCP, "ssh": []})
    for name, (user, version) in NODES.items():
        lab.join(name, user, version, args=("--ssh",))
    for src, dst in PAIRS:
        wait_ssh_ready(lab.nodes[src], lab.nodes[dst])


lab = shared_world_fixture(PolicyLab, setup)


def apply(lab: PolicyLab, policy: dict[str, Any], allowed: Callable[[str, str], bool]) -> None:
    r = lab.set_policy(policy)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_ssh_policy(lab.nodes, allowed)


def same_user(src: str, dst: str) -> bool:
    return owner(src) == owner(dst)


def test_ssh_no_ssh_configured(lab: PolicyLab) -> None:
    """TestSSHNoSSHConfigured: an empty `ssh` section lets nobody in, though TCP is open."""
    apply(lab, {"acls": ALL_TCP, "ssh": []}, lambda s, d: False)
    judge_pairs(lab.nodes, PAIRS, lambda s, d: False)


def test_ssh_one_user_to_all(lab: PolicyLab) -> None:
    """TestSSHOneUserToAll: a group holding user1 reaches every member and tagged node; user2
    is refused everywhere."""
    policy = {"groups": {"group:integration-test": ["user1@"]}, "acls": ALL_TCP,
              "ssh": [rule(["group:integration-test"], ["autogroup:member", "autogroup:tagged"])]}
    allowed = lambda s, d: owner(s) == "user1"  # noqa: E731
    apply(lab, policy, allowed)
    judge_pairs(lab.nodes, PAIRS, allowed)


def test_ssh_multiple_users_all_to_all(lab: PolicyLab) -> None:
    """TestSSHMultipleUsersAllToAll: a group of both users with autogroup:self: each user
    reaches its own other node, never the other user's."""
    policy = {"groups": {"group:integration-test": ["user1@", "user2@"]}, "acls": ALL_TCP,
              "ssh": [rule(["group:integration-test"], ["autogroup:self"])]}
    apply(lab, policy, same_user)
    judge_pairs(lab.nodes, PAIRS, same_user)


def test_ssh_user_only_isolation(lab: PolicyLab) -> None:
    """TestSSHUserOnlyIsolation: one group per user, each to autogroup:self."""
    policy = {"groups": {"group:ssh1": ["user1@"], "group:ssh2": ["user2@"]}, "acls": ALL_TCP,
              "ssh": [rule(["group:ssh1"], ["autogroup:self"]),
                      rule(["group:ssh2"], ["autogroup:self"])]}
    # Start from a policy where cross-user SSH is allowed, so isolation is a change to see.
    apply(lab, {"acls": ALL_TCP,
                "ssh": [rule(["autogroup:member"], ["autogroup:member"])]}, lambda s, d: True)
    apply(lab, policy, same_user)
    judge_pairs(lab.nodes, PAIRS, same_user)


def test_ssh_autogroup_self(lab: PolicyLab) -> None:
    """TestSSHAutogroupSelf: autogroup:member -> autogroup:self."""
    policy = {"acls": ALL_TCP, "ssh": [rule(["autogroup:member"], ["autogroup:self"])]}
    apply(lab, {"acls": ALL_TCP, "ssh": []}, lambda s, d: False)
    apply(lab, policy, same_user)
    judge_pairs(lab.nodes, PAIRS, same_user)


def test_ssh_is_blocked_in_acl(lab: PolicyLab) -> None:
    """TestSSHIsBlockedInACL: the ssh section would let same-user pairs in, but the ACL opens
    only port 80, so port 22 never answers: the connection times out (port 80 answering the
    same pairs first shows the path itself works)."""
    policy = {"groups": {"group:integration-test": ["user1@"]},
              "acls": [acl(["*"], ["*:80"])],
              "ssh": [rule(["group:integration-test"], ["autogroup:self"])]}
    r = lab.set_policy(policy)
    assert r.returncode == 0, r.stdout + r.stderr
    pairs = [("u1a", "u1b"), ("u1b", "u1a"), ("u2a", "u1a"), ("u1a", "u2b")]
    echoes = {d: serve_echo(lab.nodes[d].host, addr4(lab.nodes[d]), [80], d)
              for d in {d for _, d in pairs}}
    try:
        for src, dst in pairs:
            ts, ip = lab.nodes[src], addr4(lab.nodes[dst])
            wait_for(f"{src} to reach {dst}:80", lambda ts=ts, ip=ip:
                     probe(ts.host, ip, 80).reach is Reach.ANSWERED, 30)
        # Port 22 is dropped by the new packet filter: wait until it is, then judge ssh.
        ts, ip = lab.nodes["u1a"], addr4(lab.nodes["u1b"])
        wait_for("u1a -> u1b:22 to be dropped", lambda: probe(ts.host, ip, 22, timeout=2)
                 .reach is Reach.DROPPED, 30)
        for src, dst in pairs:
            r = tailscale_ssh(lab.nodes[src], addr4(lab.nodes[dst]), "echo", "must-not-run",
                              connect_timeout=3, timeout=30)
            assert r.returncode != 0 and "must-not-run" not in r.stdout, (src, dst, r)
            assert "timed out" in r.stderr.lower(), (src, dst, r.stderr)
    finally:
        for p in echoes.values():
            p.kill()
            p.wait(10)
