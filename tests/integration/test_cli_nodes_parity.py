"""Headscale's node CLI tests (cli_nodes_test.go and their 0.29.2 forms in cli_test.go),
assertion for assertion. Nodes are made as Headscale's tests make them, with `debug
create-node` then `auth register`: no client is involved. The tests share one server, each
judging only the nodes of its own users."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.cli_server import Server, auth_id, now, register, running_server, when

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with running_server() as s:
        yield s






def nodes_of(srv: Server, *users: str) -> list[dict[str, Any]]:
    """`nodes list`, kept to the nodes of `users` (in the order listed)."""
    return [n for n in srv.json("nodes", "list") if n["user"]["name"] in users]


def test_node_command(srv: Server) -> None:
    srv.ok("users", "create", "node-user")
    srv.ok("users", "create", "other-user")
    made = [register(srv, f"node-{i}", "node-user") for i in range(1, 6)]
    listed = nodes_of(srv, "node-user", "other-user")
    assert len(listed) == 5
    ids = [int(n["id"]) for n in listed]
    assert ids == list(range(ids[0], ids[0] + 5)) and [str(i) for i in ids] == \
        [n["id"] for n in made]
    assert [n["name"] for n in listed] == [f"node-{i}" for i in range(1, 6)]

    other = [register(srv, f"otheruser-node-{i}", "other-user") for i in range(1, 3)]
    listed = nodes_of(srv, "node-user", "other-user")
    assert len(listed) == 7
    assert [n["id"] for n in listed[5:]] == [n["id"] for n in other]
    assert [n["name"] for n in listed[5:]] == ["otheruser-node-1", "otheruser-node-2"]
    only_other = srv.json("nodes", "list", "--user", "other-user")
    assert [n["id"] for n in only_other] == [n["id"] for n in other]
    assert [n["name"] for n in only_other] == ["otheruser-node-1", "otheruser-node-2"]

    srv.ok("nodes", "delete", "--identifier", made[3]["id"], "--output", "json", "--force")
    left = srv.json("nodes", "list", "--user", "node-user")
    assert len(left) == 4 and made[3]["id"] not in {n["id"] for n in left}


def five_nodes(srv: Server, user: str) -> list[dict[str, Any]]:
    """User `user` with nodes node-1..node-5, as listed by `nodes list --user`."""
    srv.ok("users", "create", user)
    for i in range(1, 6):
        register(srv, f"node-{i}", user)
    listed = srv.json("nodes", "list", "--user", user)
    assert len(listed) == 5
    return list(listed)


def test_node_expire_command(srv: Server) -> None:
    listed = five_nodes(srv, "node-expire-user")
    assert all(when(n.get("expiry")) is None for n in listed), "no default node.expiry"
    for n in listed[:3]:
        srv.ok("nodes", "expire", "--identifier", n["id"])
    after = srv.json("nodes", "list", "--user", "node-expire-user")
    assert len(after) == 5
    t = now()
    for n in after[:3]:
        assert when(n["expiry"]) is not None and when(n["expiry"]) < t  # type: ignore[operator]
    assert when(after[3].get("expiry")) is None and when(after[4].get("expiry")) is None


def test_node_rename_command(srv: Server) -> None:
    listed = five_nodes(srv, "node-rename-command")
    for i, n in enumerate(listed, 1):
        assert f"node-{i}" in n["givenName"]
    for i, n in enumerate(listed[:3], 1):
        assert "Node renamed" in srv.ok("nodes", "rename", "--identifier", n["id"],
                                        f"newnode-{i}")

    def check() -> None:
        now_listed = srv.json("nodes", "list", "--user", "node-rename-command")
        assert len(now_listed) == 5
        assert [n["givenName"] for n in now_listed[:3]] == ["newnode-1", "newnode-2",
                                                            "newnode-3"]
        assert "node-4" in now_listed[3]["givenName"] and "node-5" in now_listed[4]["givenName"]

    check()
    srv.fails("nodes", "rename", "--identifier", listed[4]["id"], "t" * 64,
              expect="is too long, max length is 63 bytes")
    check()


def test_node_expire_flags_command(srv: Server) -> None:
    srv.ok("users", "create", "expire-flags-user")
    node = register(srv, "flagnode", "expire-flags-user")

    def listed() -> dict[str, Any]:
        return next(n for n in srv.json("nodes", "list") if n["id"] == node["id"])

    future = (now() + dt.timedelta(hours=2)).replace(microsecond=0)
    srv.ok("nodes", "expire", "--identifier", node["id"], "--expiry",
           future.strftime("%Y-%m-%dT%H:%M:%SZ"), "--output", "json")
    exp = when(listed()["expiry"])
    assert exp is not None and exp > now()
    assert exp == future, "the expiry given is the one stored"
    srv.ok("nodes", "expire", "--identifier", node["id"], "--disable", "--output", "json")
    exp = when(listed().get("expiry"))
    assert not (exp is not None and exp > now()), "a disabled node has no future expiry"


def test_node_command_validation(srv: Server) -> None:
    srv.ok("users", "create", "nodeval-user1")
    node = register(srv, "valnode", "nodeval-user1")
    id_ = node["id"]
    cases: list[tuple[list[str], str]] = [
        (["nodes", "delete", "--force"], "identifier"),
        (["nodes", "delete", "--identifier", "99999", "--force"], "node not found"),
        (["nodes", "rename", "newname"], "identifier"),
        (["nodes", "rename", "--identifier", "99999", "newname"], "Error:"),
        (["nodes", "rename", "--identifier", id_, "t" * 64], "too long"),
        (["nodes", "expire"], "identifier"),
        (["nodes", "expire", "--identifier", "99999"], "Error:"),
        (["nodes", "expire", "--identifier", id_, "--expiry", "not-a-time"], "parsing expiry"),
        (["nodes", "tag", "--tags", "tag:x"], "identifier"),
        (["nodes", "tag", "--identifier", id_], "cannot remove all tags"),
        (["nodes", "tag", "--identifier", id_, "--tags", "notatag"], "tag must start"),
        (["nodes", "tag", "--identifier", id_, "--tags", "tag:undefined"],
         "invalid or not permitted"),
        (["nodes", "approve-routes", "--routes", "10.0.0.0/24"], "identifier"),
        (["nodes", "approve-routes", "--identifier", "99999", "--routes", "10.0.0.0/24"],
         "Error:"),
        (["nodes", "approve-routes", "--identifier", id_, "--routes", "notacidr"],
         "parsing route"),
        (["nodes", "register", "--user", "ghost", "--key", auth_id()], "Error:"),
        (["nodes", "register", "--user", "nodeval-user1", "--key", "badkey"], "Error:"),
    ]
    for args, expect in cases:
        srv.fails(*args, expect=expect)
    # The refused commands left the node as it was.
    after = next(n for n in srv.json("nodes", "list") if n["id"] == id_)
    assert after["givenName"] == node["givenName"] and after["tags"] == node["tags"]
    assert after["approvedRoutes"] == [] and when(after.get("expiry")) is None
