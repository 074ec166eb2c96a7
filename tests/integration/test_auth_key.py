"""Headscale's pre-auth-key scenarios (integration/auth_key_test.go, and cli_nodes_test.go's
TestPreAuthKeyCorrectUserLoggedInCommand) on one tailnet of official clients: user1 and user2
own one node per pinned version each. The tests run in order on that tailnet; each logs
clients out and back in and leaves every node of the tailnet running again.

What is judged is what the clients show (`tailscale status --json`: backend state, own
addresses, login name, peers) and what the admin CLI lists (`nodes list`: owner, online,
routes); the keys are made with the admin CLI as an operator would.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration import hsapi
from tests.integration.relogin_lab import USERS, ReloginLab, identity
from tests.integration.versions import PINNED
from tests.integration.world import (
    login_name,
    peers_by_name,
    shared_world_fixture,
    wait_for,
)

pytestmark = pytest.mark.integration

# Headscale's test route is 10.55.0.0/24; a documentation prefix keeps it off real networks.
ROUTE = "203.0.113.0/26"
POLICY = {
    "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
    "autoApprovers": {"routes": {ROUTE: ["user1@"]}},
}


class KeyLab(ReloginLab):
    """Nodes that join with pre-auth keys."""

    def boot(self) -> None:
        keys = {u: {"user": u, "reusable": True} for u in USERS}
        self.start_server(keys=keys, users=list(USERS), policy=POLICY)
        self.by_user = {u: [] for u in USERS}
        for u in USERS:
            for i, version in enumerate(PINNED):
                name = f"{u[-1]}n{i}"
                self.join(name, version, u)
                self.by_user[u].append(name)
        wait_for("every node to list the others",
                 lambda: all(len(peers_by_name(self.nodes[n].status_json()))
                             == len(self.members) - 1 for n in self.members), 60)

    def cli_json(self, *args: str) -> Any:
        assert self.server is not None
        return self.server.cli_json(*args)

    def user_id(self, user: str) -> str:
        return str(self.cli_json("users", "list", "-n", user)[0]["id"])

    def new_key(self, user: str, *flags: str) -> dict[str, Any]:
        """`headscale preauthkeys create -u ID -e 24h FLAGS` as JSON."""
        return dict(self.cli_json("preauthkeys", "create", "-u", self.user_id(user),
                                  "-e", "24h", *flags))

    def log_in(self, name: str, key: str, *args: str) -> None:
        """`tailscale up --authkey ... --reset` (after a logout a client may ask for
        every non-default setting to be named again, or --reset)."""
        assert self.server is not None
        r = self.nodes[name].up(self.server.url, authkey=key, hostname=name,
                                extra_args=("--reset", *args))
        assert r.returncode == 0, f"{name} did not log in again: {r.stdout}{r.stderr}"


def _boot(lab: KeyLab) -> None:
    lab.boot()


lab = shared_world_fixture(KeyLab, _boot)


def test_auth_key_logout_and_relogin_same_user(lab: KeyLab) -> None:
    """Every node logs out and back in with a new key of its own user: the server keeps
    the same nodes (now offline, then online), the clients keep their IDs and addresses
    and reach each other again."""
    before = {n: identity(lab.nodes[n]) for n in lab.members}
    count = len(lab.listed())
    assert count == len(lab.members)
    lab.log_out(lab.members)
    assert len(lab.listed()) == count, "logging out must not delete the node"
    for user in USERS:
        key = lab.new_key(user, "--reusable")["key"]
        for name in lab.by_user[user]:
            lab.log_in(name, key)
    lab.wait_online(lab.members)
    for name in lab.members:
        assert identity(lab.nodes[name]) == before[name], f"{name} changed identity"
    assert len(lab.listed()) == count
    lab.wait_mesh(lab.members)


def test_auth_key_logout_and_relogin_same_user_expired_key(lab: KeyLab) -> None:
    """After a logout, a key the admin has expired is refused with "authkey expired"; the
    client stays logged out, then the user's valid key brings it back."""
    names = [lab.by_user[u][0] for u in USERS]
    lab.log_out(names)
    for user, name in zip(USERS, names, strict=True):
        key = lab.new_key(user, "--reusable")
        r = lab.cli_json("preauthkeys", "expire", "-i", str(key["id"]))
        assert r == {}, r
        r2 = lab.nodes[name].up(lab.server.url, authkey=key["key"], hostname=name,  # type: ignore[union-attr]
                                extra_args=("--reset",), timeout=30)
        assert r2.returncode != 0 and "authkey expired" in r2.stdout + r2.stderr, r2
        assert lab.nodes[name].backend_state() == "NeedsLogin"
        assert lab.online(name) is False
        lab.log_in(name, lab.keys[user])
    lab.wait_mesh(lab.members)


def test_auth_key_delete_key(lab: KeyLab) -> None:
    """A node joins with a single-use key, the admin deletes that key, the node goes down
    and up again: it comes back as the same node (its machine key is its identity, the
    key is not asked again)."""
    key = lab.new_key("user1")
    assert lab.server is not None
    ts = lab.add_client("head", PINNED[-1])
    lab.log_in("head", key["key"])
    node = hsapi.node_by_name(lab.server, "head")
    assert node is not None and node["user"]["name"] == "user1"
    wait_for("the server to show head online", lambda: lab.online("head"), 30)

    out = lab.server.cli("preauthkeys", "delete", "-i", str(key["id"]))
    assert out.returncode == 0, out.stdout + out.stderr
    assert str(key["id"]) not in {str(k["id"]) for k in lab.cli_json("preauthkeys", "list")}

    assert ts.down().returncode == 0
    wait_for("head to stop", lambda: ts.backend_state() == "Stopped", 15)
    wait_for("the server to show head offline", lambda: lab.online("head") is False, 30)
    r = ts.cli("up")
    assert r.returncode == 0, r.stdout + r.stderr
    ts.wait_state("Running", 60)
    wait_for("the server to show head online again", lambda: lab.online("head"), 60)
    again = hsapi.node_by_name(lab.server, "head")
    assert again is not None and again["id"] == node["id"]
    assert [n["name"] for n in lab.listed("user1")].count("head") == 1
    lab.wait_mesh([*lab.members, "head"])
    lab.cli_json("nodes", "delete", "-i", str(node["id"]), "--force")
    lab.nodes.pop("head").close()


def test_auth_key_logout_and_relogin_routes_preserved(lab: KeyLab) -> None:
    """A node advertising an auto-approved route logs out and back in with a new key of
    the same user: the route stays available, approved and served (primary), and a peer
    still shows it."""
    assert lab.server is not None
    viewer = lab.nodes[lab.by_user["user2"][0]]
    ts = lab.join("router", PINNED[-1], "user1", args=(f"--advertise-routes={ROUTE}",))

    def serving() -> dict[str, Any] | None:
        n = hsapi.node_by_name(lab.server, "router")  # type: ignore[arg-type]
        ok = n is not None and n["availableRoutes"] == n["approvedRoutes"] == \
            n["subnetRoutes"] == [ROUTE]
        seen = ROUTE in (peers_by_name(viewer.status_json()).get("router", {})
                         .get("PrimaryRoutes") or [])
        return n if ok and seen else None

    node = wait_for("router's route to be approved and served", serving, 30)
    lab.log_out(["router"])
    assert len([n for n in lab.listed("user1") if n["name"] == "router"]) == 1
    lab.log_in("router", lab.new_key("user1", "--reusable")["key"],
               f"--advertise-routes={ROUTE}")
    ts.wait_state("Running", 30)
    again = wait_for("router's route to be served again after the relogin", serving, 60)
    assert again["id"] == node["id"]
    lab.cli_json("nodes", "delete", "-i", str(node["id"]), "--force")
    lab.nodes.pop("router").close()


def test_auth_key_logout_and_relogin_new_user(lab: KeyLab) -> None:
    """Every node logs out and logs in with one key of user1: user1 then owns a node for
    every client (user2's clients got new nodes), user2 keeps its old ones, and every
    client shows user1 as its login."""
    clients = lab.members
    lab.log_out(clients)
    key = lab.new_key("user1", "--reusable")["key"]
    for name in clients:
        lab.log_in(name, key)
    user1 = sorted(n["name"] for n in lab.listed("user1"))
    assert user1 == sorted(clients), user1
    assert sorted(n["name"] for n in lab.listed("user2")) == sorted(lab.by_user["user2"])
    for name in clients:
        assert login_name(lab.nodes[name]) == "user1", name
    lab.wait_mesh(clients)


def test_pre_auth_key_correct_user_logged_in_command(lab: KeyLab) -> None:
    """A user1 node logs out and logs in with user2's tagged key: the client now runs as
    the tagged-devices profile, and the server lists a new tagged node next to the old
    user1 node."""
    name = lab.by_user["user1"][-1]
    before = hsapi.node_by_name(lab.server, name)  # type: ignore[arg-type]
    assert before is not None and before["user"]["name"] == "user1"
    key = lab.new_key("user2", "--reusable", "--tags", "tag:test1,tag:test2")
    lab.log_out([name])
    lab.log_in(name, key["key"])
    st = lab.nodes[name].wait_state("Running", 30)
    assert st["Self"]["UserID"] == 2147455555, st["Self"]
    assert login_name(lab.nodes[name]) == "tagged-devices"
    assert sorted(st["Self"].get("Tags") or []) == ["tag:test1", "tag:test2"]
    mine = [n for n in lab.listed() if n["name"] == name]
    assert len(mine) == 2, mine
    old, new = sorted(mine, key=lambda n: int(n["id"]))
    assert old["id"] == before["id"] and old["user"]["name"] == "user1"
    assert new["user"]["name"] == "tagged-devices"
    assert sorted(new["tags"]) == ["tag:test1", "tag:test2"]


def test_tagged_nodes_cli_output(lab: KeyLab) -> None:
    """The node the test above turned into a tagged one (user2's tagged key): the admin's
    `nodes list` names its owner tagged-devices, and the client's own `tailscale status`
    shows "tagged-devices", never the raw "userid:2147455555" (Headscale issue 2970)."""
    name = lab.by_user["user1"][-1]
    tagged = [n for n in lab.listed() if n["name"] == name and n["tags"]]
    assert len(tagged) == 1 and tagged[0]["user"]["name"] == "tagged-devices", tagged
    r = lab.nodes[name].cli("status")
    assert r.returncode == 0, r.stderr
    mine = next(line for line in r.stdout.splitlines()
                if line.split()[:1] == [lab.nodes[name].ip("4")[0]])
    assert "tagged-devices" in mine, r.stdout
    assert "userid:" not in r.stdout, r.stdout
