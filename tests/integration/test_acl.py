"""Headscale's ACL scenarios (integration/acl_test.go) on one tailnet of official clients:
user1 owns a1 (oldest client) and a2 (middle), user2 owns b1 (newest) and b2 (oldest). Each
test sets its policy live (`headscale policy set`, database mode) and checks what the clients
do: who lists whom as a peer, and who reaches whose ports 80/22 over IPv4 and IPv6.

Headscale starts a fresh tailnet per test with the policy in a file; here one tailnet moves
from policy to policy, so every check also proves the change reached running clients. See
acl_lab.py for the witness node and the revision port that make refusals trustworthy.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from tests.integration.acl_lab import ALLOW_ALL, AclLab, acl
from tests.integration.versions import MIDDLE, NEWEST, OLDEST
from tests.integration.world import shared_world_fixture

pytestmark = pytest.mark.integration

USER1, USER2 = ("a1", "a2"), ("b1", "b2")
ALL = USER1 + USER2


def _boot(lab: AclLab) -> None:
    lab.boot(["user1", "user2"], [("a1", "user1", OLDEST), ("a2", "user1", MIDDLE),
                                  ("b1", "user2", NEWEST), ("b2", "user2", OLDEST)])


lab = shared_world_fixture(AclLab, _boot)


def pairs(srcs: tuple[str, ...], dsts: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(s, d) for s, d in itertools.product(srcs, dsts) if s != d]


# -- TestACLHostsInNetMapTable: who is in whose netmap -------------------------------------

# Headscale's "veryLargeDestination": 0.0.0.0/0 minus the private and CGNAT ranges, as
# 30 prefixes (issue 1372: a policy this large must not drop peers).
LARGE = ["0.0.0.0/5", "8.0.0.0/7", "11.0.0.0/8", "12.0.0.0/6", "16.0.0.0/4", "32.0.0.0/3",
         "64.0.0.0/2", "128.0.0.0/3", "160.0.0.0/5", "168.0.0.0/6", "172.0.0.0/12",
         "172.32.0.0/11", "172.64.0.0/10", "172.128.0.0/9", "173.0.0.0/8", "174.0.0.0/7",
         "176.0.0.0/4", "192.0.0.0/9", "192.128.0.0/11", "192.160.0.0/13", "192.169.0.0/16",
         "192.170.0.0/15", "192.172.0.0/14", "192.176.0.0/12", "192.192.0.0/10",
         "193.0.0.0/8", "194.0.0.0/7", "196.0.0.0/6", "200.0.0.0/5", "208.0.0.0/4"]
LARGE_DST = [f"{p}:*" for p in LARGE]

# case -> (policy, peers each user1 node lists, peers each user2 node lists)
NETMAP_CASES: dict[str, tuple[dict[str, Any], int, int]] = {
    "base-acls": (ALLOW_ALL, 3, 3),
    "two-isolated-users": ({"acls": [acl(["user1@"], ["user1@:*"]),
                                     acl(["user2@"], ["user2@:*"])]}, 1, 1),
    "two-restricted-present-in-netmap": ({"acls": [
        acl(["user1@"], ["user1@:22"]), acl(["user2@"], ["user2@:22"]),
        acl(["user1@"], ["user2@:22"]), acl(["user2@"], ["user1@:22"])]}, 3, 3),
    # user2 lists user1's nodes too: they need each other for the return path.
    "two-ns-one-isolated": ({"acls": [acl(["user1@"], ["user1@:*"]),
                                      acl(["user2@"], ["user2@:*"]),
                                      acl(["user1@"], ["user2@:*"])]}, 3, 3),
    "very-large-destination-prefix-1372": ({"acls": [
        acl(["user1@"], ["user1@:*", *LARGE_DST]), acl(["user2@"], ["user2@:*", *LARGE_DST]),
        acl(["user1@"], ["user2@:*", *LARGE_DST])]}, 3, 3),
    "ipv6-acls-1470": ({"acls": [acl(["*"], ["0.0.0.0/0:*", "::/0:*"])]}, 3, 3),
}


@pytest.mark.parametrize("case", list(NETMAP_CASES))
def test_hosts_in_netmap_table(lab: AclLab, case: str) -> None:
    policy, user1_peers, user2_peers = NETMAP_CASES[case]
    lab.set_policy(policy)
    for name in USER1:
        lab.wait_peer_count(name, user1_peers)
    for name in USER2:
        lab.wait_peer_count(name, user2_peers)


def expect_user1_to_user2_only(lab: AclLab) -> None:
    """Every user1 node reaches every user2 node; no user2 node reaches a user1 node."""
    for src, dst in pairs(USER1, USER2):
        lab.expect_reach(src, dst)
    for src, dst in pairs(USER2, USER1):
        lab.expect_denied(src, dst)


# -- single-policy reachability ------------------------------------------------------------


def test_allow_user80_dst(lab: AclLab) -> None:
    """user1 -> user2:80 only: user1 reaches user2 on 80, user2 reaches nobody in user1 (and
    user1 not even its own nodes)."""
    lab.set_policy({"acls": [acl(["user1@"], ["user2@:80"])]})
    for src, dst in pairs(USER1, USER2):
        lab.expect_reach(src, dst, 80)
    for src, dst in pairs(USER2, USER1):
        lab.expect_denied(src, dst, 80)
    lab.expect_denied("a1", "a2", 80)
    lab.expect_denied("a1", "b1", 22)


def test_deny_all_port80(lab: AclLab) -> None:
    """A group of both users may reach everything on port 22 only: port 80 is refused for
    every pair while 22 answers."""
    lab.set_policy({"groups": {"group:integration-acl-test": ["user1@", "user2@"]},
                    "acls": [acl(["group:integration-acl-test"], ["*:22"])]})
    for src, dst in pairs(ALL, ALL):
        lab.expect_denied(src, dst, 80)
    for src, dst in (("a1", "b2"), ("b1", "a2")):
        lab.expect_reach(src, dst, 22)


def test_allow_user_dst(lab: AclLab) -> None:
    lab.set_policy({"acls": [acl(["user1@"], ["user2@:*"])]})
    expect_user1_to_user2_only(lab)


def test_allow_star_dst(lab: AclLab) -> None:
    lab.set_policy({"acls": [acl(["user1@"], ["*:*"])]})
    expect_user1_to_user2_only(lab)


def test_named_hosts_can_reach_by_subnet(lab: AclLab) -> None:
    """A named host covering the whole tailnet's first /24 as the destination of `*`."""
    lab.set_policy({"hosts": {"all": "100.64.0.0/24"}, "acls": [acl(["*"], ["all:*"])]})
    for src, dst in pairs(USER1, USER2) + pairs(USER2, USER1):
        lab.expect_reach(src, dst)


@pytest.mark.parametrize("family", ["4", "6"], ids=["ipv4", "ipv6"])
def test_named_hosts_can_reach(lab: AclLab, family: str) -> None:
    """hosts test1..3 = the first three nodes' addresses: everyone may reach test3, test1
    may reach test2; nothing else, checked over the addresses of `family`."""
    t1, t2, t3 = "a1", "a2", "b1"
    bits = "/32" if family == "4" else "/128"
    lab.set_policy({
        "hosts": {f"test{i}": lab.addr(n, family) + bits for i, n in enumerate((t1, t2, t3), 1)},
        "acls": [acl(["*"], ["test3:*"]), acl(["test1"], ["test2:*"])],
    })
    lab.expect_reach(t1, t3, family=family)
    lab.expect_reach(t2, t3, family=family)
    lab.expect_denied(t3, t1, family=family)
    lab.expect_denied(t3, t2, family=family)
    lab.expect_reach(t1, t2, family=family)
    lab.expect_denied(t2, t1, family=family)


DEVICE_CASES = ["ipv4", "ipv6", "hostv4cidr", "hostv6cidr", "group"]


@pytest.mark.parametrize("case", DEVICE_CASES)
def test_device1_can_access_device2(lab: AclLab, case: str) -> None:
    """One device (a1, user1) may reach another (b1, user2), named by address, by a named
    host or by group; the reverse is refused."""
    d1, d2 = "a1", "b1"
    family = "6" if "6" in case else "4"
    bits = "/128" if family == "6" else "/32"
    p1, p2 = lab.addr(d1, family) + bits, lab.addr(d2, family) + bits
    policy: dict[str, Any]
    if case in ("ipv4", "ipv6"):
        policy = {"acls": [acl([p1], [f"{p2}:*"])]}
    elif case.startswith("host"):
        policy = {"hosts": {"test1": p1, "test2": p2}, "acls": [acl(["test1"], ["test2:*"])]}
    else:
        policy = {"groups": {"group:one": ["user1@"], "group:two": ["user2@"]},
                  "acls": [acl(["group:one"], ["group:two:*"])]}
    lab.set_policy(policy)
    lab.expect_reach(d1, d2, family=family)
    lab.expect_denied(d2, d1, family=family)


# -- policy changes on a running tailnet ---------------------------------------------------


def test_policy_update_while_running_with_cli_in_database(lab: AclLab) -> None:
    lab.set_policy(ALLOW_ALL)
    for src, dst in pairs(ALL, ALL):
        lab.expect_reach(src, dst)
    sent = lab.set_policy({"acls": [acl(["user1@"], ["user2@:*"])], "hosts": {}})
    r = lab.cli("policy", "get", "--output", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == sent
    expect_user1_to_user2_only(lab)


def test_autogroup_member(lab: AclLab) -> None:
    lab.set_policy({"acls": [acl(["autogroup:member"], ["autogroup:member:*"])]})
    for name in ALL:
        assert not lab.nodes[name].status_json()["Self"].get("Tags"), f"{name} is tagged"
    for src, dst in pairs(ALL, ALL):
        lab.expect_reach(src, dst)


ITERATIONS = 3  # Headscale runs 5; each round here is the same four phases


@pytest.mark.parametrize("i", range(ITERATIONS), ids=lambda i: f"round{i}")
def test_policy_propagation_over_time(lab: AclLab, i: int) -> None:
    """Allow-all, then autogroup:self (a node joins user1 and is deleted again), then
    user1 -> user2 only; round after round (one test each, in order, on the same running
    clients), each phase takes effect."""
    self_policy = {"acls": [acl(["autogroup:member"], ["autogroup:self:*"])]}
    lab.set_policy(ALLOW_ALL)
    for name in ALL:
        lab.wait_peer_count(name, 3)
    for src, dst in pairs(ALL, ALL):
        lab.expect_reach(src, dst)

    lab.set_policy(self_policy)
    for group in (USER1, USER2):
        for name in group:
            lab.wait_peers(name, set(group) - {name})
        for src, dst in pairs(group, group):
            lab.expect_reach(src, dst)
    for src, dst in pairs(USER1, USER2) + pairs(USER2, USER1):
        lab.expect_denied(src, dst)

    extra = f"a3i{i}"
    lab.add_node(extra, "user1", NEWEST)
    lab.wait_rev()
    grown = (*USER1, extra)
    for name in grown:
        lab.wait_peers(name, set(grown) - {name})
    for src, dst in pairs(grown, grown):
        lab.expect_reach(src, dst)
    for src, dst in pairs((extra,), USER2):
        lab.expect_denied(src, dst)
    assert lab.server is not None
    user1_nodes = lab.server.cli_json("nodes", "list", "--user", "user1")
    assert sorted(n["name"] for n in user1_nodes) == sorted(grown)
    lab.remove_node(extra)
    for name in USER1:
        lab.wait_peers(name, set(USER1) - {name})
    assert len(lab.server.cli_json("nodes", "list", "--user", "user1")) == 2

    lab.set_policy({"acls": [acl(["user1@"], ["user2@:*"])]})
    expect_user1_to_user2_only(lab)


# -- groups naming users that do not exist (Headscale issue 2967) --------------------------


def both_ways(lab: AclLab, x: str, y: str) -> None:
    lab.expect_reach(x, y)
    lab.expect_reach(y, x)


def group_policy(*members: str, dst: str = "group:test:*") -> dict[str, Any]:
    return {"groups": {"group:test": [f"{m}@" for m in members]},
            "acls": [acl(["group:test"], [dst])]}


def add_user_with_node(lab: AclLab, user: str, node: str) -> None:
    """`headscale users create`, a key from `preauthkeys create`, and an official client."""
    assert lab.server is not None
    r = lab.cli("users", "create", user)
    assert r.returncode == 0, r.stdout + r.stderr
    uid = lab.server.cli_json("users", "list", "-n", user)[0]["id"]
    lab.keys[user] = lab.server.cli_json("preauthkeys", "create", "-u", str(uid),
                                         "-e", "1h")["key"]
    lab.add_node(node, user, NEWEST)
    lab.wait_rev()


def delete_user(lab: AclLab, user: str) -> None:
    r = lab.cli("users", "delete", "-n", user, "--force")
    assert r.returncode == 0, r.stdout + r.stderr


def test_group_with_unknown_user(lab: AclLab) -> None:
    """A group naming a user who does not exist still works for the users who do (the
    group's rule is the only one between them)."""
    lab.set_policy(group_policy("user1", "user2", "nonexistent"))
    both_ways(lab, "a1", "b1")
    both_ways(lab, "a2", "b2")


def test_dynamic_unknown_user_addition(lab: AclLab) -> None:
    """An unknown user added to a working group (live) keeps the group working."""
    lab.set_policy(group_policy("user1", "user2"))
    both_ways(lab, "a1", "b1")
    lab.set_policy(group_policy("user1", "user2", "nonexistent"))
    both_ways(lab, "a1", "b1")


def test_dynamic_unknown_user_removal(lab: AclLab) -> None:
    """A group with an unknown user works, and still does once the unknown user is
    removed (live)."""
    lab.set_policy(group_policy("user1", "user2", "invaliduser"))
    both_ways(lab, "a1", "b1")
    lab.set_policy(group_policy("user1", "user2"))
    both_ways(lab, "a1", "b1")


@pytest.mark.parametrize("case", ["after-user-deletion", "exact-reproduction"])
def test_group_survives_user_deletion(lab: AclLab, case: str) -> None:
    """Headscale's TestACLGroupAfterUserDeletion / ...ExactReproduction: a group names
    three users; the third user's node and then the user are deleted while the policy
    still names them; the others keep reaching each other, also after a new user is
    created (the moment the server re-resolves the policy's users)."""
    gone, node, newcomer = f"gone-{case[:5]}", f"c-{case[:5]}", f"new-{case[:5]}"
    dst = "group:test:*" if case == "after-user-deletion" else "*:*"
    add_user_with_node(lab, gone, node)
    lab.set_policy(group_policy("user1", "user2", gone, dst=dst))
    both_ways(lab, "a1", "b1")
    both_ways(lab, "a1", node)
    lab.remove_node(node)
    delete_user(lab, gone)
    both_ways(lab, "a1", "b1")
    r = lab.cli("users", "create", newcomer)
    assert r.returncode == 0, r.stdout + r.stderr
    both_ways(lab, "a1", "b1")
    # The server re-resolves its users here; a revision of the same policy proves every
    # node holds what the server computes now.
    lab.set_policy(group_policy("user1", "user2", gone, dst=dst))
    both_ways(lab, "a1", "b1")
    both_ways(lab, "a2", "b2")


# -- cli_policy_test.go ---------------------------------------------------------------------


def test_ssh_tests_reject_failing_policy(lab: AclLab) -> None:
    """`headscale policy set` refuses a policy whose sshTests fail ("test(s) failed") and
    leaves the stored policy as it was."""
    ssh = [{"action": "accept", "src": ["user1@"], "dst": ["autogroup:member"],
            "users": ["root"]}]
    good = lab.set_policy({"acls": [acl(["user1@"], ["user2@:*"])], "ssh": ssh,
                           "sshTests": [{"src": "user1@", "dst": ["autogroup:member"],
                                         "accept": ["root"]}]})
    r = lab.cli("policy", "get", "--output", "json")
    assert r.returncode == 0 and json.loads(r.stdout) == good, r.stdout + r.stderr
    bad = dict(good, sshTests=[{"src": "user2@", "dst": ["autogroup:member"],
                                "accept": ["root"]}])
    r = lab.cli("policy", "set", "-f", str(lab.policy_file(bad)))
    assert r.returncode != 0 and "test(s) failed" in r.stdout + r.stderr, r
    r = lab.cli("policy", "get", "--output", "json")
    assert r.returncode == 0 and json.loads(r.stdout) == good, r.stdout + r.stderr
