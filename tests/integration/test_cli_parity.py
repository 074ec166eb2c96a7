"""Headscale's CLI integration tests (cli_users/apikeys/preauthkeys/auth/oauth_clients/
server_test.go and their 0.29.2 forms in cli_test.go), assertion for assertion, against one
live `pyheadscale serve` shared by the module. Headscale runs these with no client, so none
runs here either. Each test makes its own users/keys and judges only what it made (tests
may run in any order), where Headscale's fresh server lets it compare whole lists."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.cli_server import Server, auth_id, now, running_server, when

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with running_server() as s:
        yield s





def user(srv: Server, name: str, **fields: str) -> dict[str, Any]:
    args = ["users", "create", name]
    for k, v in fields.items():
        args += [f"--{k.replace('_', '-')}", v]
    return dict(srv.json(*args))


def without_created(u: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in u.items() if k != "createdAt"}


def blank_user(id_: str, name: str, email: str) -> dict[str, Any]:
    """A v1 User with only ID, name and email set (Headscale's cmp of the whole struct)."""
    return {"id": id_, "name": name, "email": email, "displayName": "", "providerId": "",
            "provider": "", "profilePicUrl": ""}


# -- users ---------------------------------------------------------------------------------


def test_user_command(srv: Server) -> None:
    u1 = user(srv, "user1", email="user1@test.no")
    u2 = user(srv, "user2", email="user2@test.no")
    mine = {u1["id"], u2["id"]}

    def listed() -> list[dict[str, Any]]:
        return sorted((u for u in srv.json("users", "list") if u["id"] in mine),
                      key=lambda u: int(u["id"]))

    assert [u["name"] for u in listed()] == ["user1", "user2"]
    srv.ok("users", "rename", "--output=json", f"--identifier={u2['id']}", "--new-name=newname")
    assert [u["name"] for u in listed()] == ["user1", "newname"]
    by_name = srv.json("users", "list", "--name=user1")
    assert [without_created(u) for u in by_name] == [blank_user(u1["id"], "user1",
                                                                "user1@test.no")]
    by_id = srv.json("users", "list", f"--identifier={u1['id']}")
    assert [without_created(u) for u in by_id] == [blank_user(u1["id"], "user1",
                                                              "user1@test.no")]
    assert "User destroyed" in srv.ok("users", "destroy", "--force", f"--identifier={u1['id']}")
    assert [without_created(u) for u in listed()] == [blank_user(u2["id"], "newname",
                                                                 "user2@test.no")]
    assert "User destroyed" in srv.ok("users", "destroy", "--force", "--name=newname")
    assert listed() == []


def test_user_create_command(srv: Server) -> None:
    created = user(srv, "cli-created", display_name="CLI Created",
                   email="cli-created@example.com", picture_url="https://example.com/avatar.png")
    assert created["name"] == "cli-created"
    assert created["displayName"] == "CLI Created"
    assert created["email"] == "cli-created@example.com"
    assert created["profilePicUrl"] == "https://example.com/avatar.png"
    by_email = srv.json("users", "list", "--email", "cli-created@example.com")
    assert len(by_email) == 1
    assert by_email[0]["name"] == "cli-created" and by_email[0]["displayName"] == "CLI Created"


def test_user_command_validation(srv: Server) -> None:
    existing = user(srv, "val-user1")
    srv.fails("users", "create", expect="missing parameters")
    srv.fails("users", "create", "val-user1", expect="Error:")
    srv.fails("users", "rename", "--identifier", existing["id"], expect="new-name")
    srv.fails("users", "rename", "--new-name", "x", expect="--name or --identifier")
    srv.fails("users", "destroy", "--force", expect="--name or --identifier")
    srv.fails("users", "destroy", "--force", "--identifier", "99999", expect="Error:")
    assert srv.json("users", "list", "--name", "ghost") == []
    # Nothing refused above changed the user.
    assert [without_created(u) for u in srv.json("users", "list", "-i", existing["id"])] == \
        [blank_user(existing["id"], "val-user1", "")]


# -- API keys ------------------------------------------------------------------------------


def api_keys(srv: Server, ids: set[str] | None = None) -> list[dict[str, Any]]:
    keys = srv.json("apikeys", "list")
    return [k for k in keys if ids is None or k["id"] in ids]


def test_api_key_command(srv: Server) -> None:
    before = {k["id"] for k in api_keys(srv)}
    keys = [srv.json("apikeys", "create", "--expiration", "24h") for _ in range(5)]
    assert all(isinstance(k, str) and k for k in keys) and len(set(keys)) == 5
    listed = [k for k in api_keys(srv) if k["id"] not in before]
    assert len(listed) == 5
    ids = [int(k["id"]) for k in listed]
    assert ids == list(range(ids[0], ids[0] + 5)), "listed by ID, one per key made"
    t0 = now()
    for k in listed:
        assert k["prefix"]
        exp = when(k["expiration"])
        assert exp is not None and t0 < exp < t0 + dt.timedelta(hours=26)
    mine = {k["id"] for k in listed}

    expired = {k["prefix"] for k in listed[:3]}
    for p in expired:
        srv.ok("apikeys", "expire", "--prefix", p)
    t1 = now()
    for k in api_keys(srv, mine):
        exp = when(k["expiration"])
        assert exp is not None and ((exp < t1) if k["prefix"] in expired else (exp > t1))

    srv.ok("apikeys", "delete", "--prefix", listed[0]["prefix"])
    after_delete = api_keys(srv, mine)
    assert len(after_delete) == 4 and listed[0]["id"] not in {k["id"] for k in after_delete}

    srv.ok("apikeys", "expire", "--id", after_delete[0]["id"])
    after_expire = api_keys(srv, mine)
    hit = next(k for k in after_expire if k["id"] == after_delete[0]["id"])
    assert when(hit["expiration"]) is not None and when(hit["expiration"]) < now()  # type: ignore[operator]

    deleted = after_expire[1]["id"]
    srv.ok("apikeys", "delete", "--id", deleted)
    final = api_keys(srv, mine)
    assert len(final) == 3 and deleted not in {k["id"] for k in final}


def test_api_key_command_validation(srv: Server) -> None:
    before = {k["id"] for k in api_keys(srv)}
    srv.ok("apikeys", "create", "--output", "json")
    listed = [k for k in api_keys(srv) if k["id"] not in before]
    assert len(listed) == 1
    prefix, id_ = listed[0]["prefix"], listed[0]["id"]
    srv.fails("apikeys", "create", "--expiration", "not-a-duration", expect="Error:")
    srv.fails("apikeys", "expire", expect="either --id or --prefix must be provided")
    srv.fails("apikeys", "expire", "--id", id_, "--prefix", prefix,
              expect="only one of --id or --prefix can be provided")
    srv.fails("apikeys", "expire", "--prefix", "nonexistent", expect="Error:")
    srv.fails("apikeys", "delete", expect="either --id or --prefix must be provided")
    srv.fails("apikeys", "delete", "--id", id_, "--prefix", prefix,
              expect="only one of --id or --prefix can be provided")
    srv.fails("apikeys", "delete", "--id", "99999", expect="Error:")
    # None of the refused commands touched the key.
    still = api_keys(srv, {id_})
    assert len(still) == 1 and when(still[0]["expiration"]) > now()  # type: ignore[operator]


# -- pre-auth keys -------------------------------------------------------------------------


def pre_auth_keys(srv: Server, uid: str) -> list[dict[str, Any]]:
    """The keys of user `uid`, as listed (Headscale's scenario has only that user)."""
    return [k for k in srv.json("preauthkeys", "list")
            if (k.get("user") or {}).get("id") == uid]


def scenario_user(srv: Server, name: str) -> str:
    """A user as Headscale's scenario makes it: with one pre-auth key of its own (the key
    listed first in Headscale's assertions)."""
    uid = str(user(srv, name)["id"])
    srv.json("preauthkeys", "create", "-u", uid, "--reusable", "--expiration", "1h")
    return uid


def test_pre_auth_key_command(srv: Server) -> None:
    uid = scenario_user(srv, "preauthkeyspace")
    # `--user` before the subcommand, as Headscale's test writes it (cobra takes it there).
    keys = [srv.json("preauthkeys", "--user", uid, "create", "--reusable", "--expiration",
                     "24h", "--tags", "tag:test1,tag:test2") for _ in range(3)]
    listed = pre_auth_keys(srv, uid)
    assert len(listed) == 4
    assert [k["id"] for k in keys] == [k["id"] for k in listed[1:]]
    assert all(k["key"] for k in keys)
    t0 = now()
    for k in listed[1:]:
        exp = when(k["expiration"])
        assert exp is not None and t0 < exp < t0 + dt.timedelta(hours=26)
        assert k["aclTags"] == ["tag:test1", "tag:test2"]
    srv.ok("preauthkeys", "expire", "--id", keys[0]["id"])
    after = pre_auth_keys(srv, uid)
    t1 = now()
    assert when(after[1]["expiration"]) < t1  # type: ignore[operator]
    assert when(after[2]["expiration"]) > t1  # type: ignore[operator]
    assert when(after[3]["expiration"]) > t1  # type: ignore[operator]


def test_pre_auth_key_command_without_expiry(srv: Server) -> None:
    uid = scenario_user(srv, "pre-auth-key-without-exp-user")
    srv.json("preauthkeys", "--user", uid, "create", "--reusable")
    listed = pre_auth_keys(srv, uid)
    assert len(listed) == 2
    t0 = now()
    exp = when(listed[1]["expiration"])
    assert exp is not None and t0 < exp < t0 + dt.timedelta(minutes=70)


def test_pre_auth_key_command_reusable_ephemeral(srv: Server) -> None:
    uid = scenario_user(srv, "pre-auth-key-reus-ephm-user")
    reusable = srv.json("preauthkeys", "--user", uid, "create", "--reusable=true")
    assert reusable["reusable"] is True
    ephemeral = srv.json("preauthkeys", "--user", uid, "create", "--ephemeral=true")
    assert ephemeral["ephemeral"] is True and ephemeral["reusable"] is False
    assert len(pre_auth_keys(srv, uid)) == 3


def test_pre_auth_key_delete_command(srv: Server) -> None:
    uid = str(user(srv, "pakdelete-user1")["id"])
    created = srv.json("preauthkeys", "--user", uid, "create", "--reusable")
    assert created["id"]
    srv.fails("preauthkeys", "delete", expect="missing --id parameter")
    assert created["id"] in {k["id"] for k in pre_auth_keys(srv, uid)}
    srv.ok("preauthkeys", "delete", "--id", created["id"])
    assert created["id"] not in {k["id"] for k in srv.json("preauthkeys", "list")}


def test_pre_auth_key_command_validation(srv: Server) -> None:
    uid = str(user(srv, "pakval-user1")["id"])
    srv.fails("preauthkeys", "--user", uid, "create", "--tags", "notatag", "--output", "json",
              expect="error")
    srv.fails("preauthkeys", "--user", "99999", "create", "--output", "json", expect="error")
    srv.fails("preauthkeys", "expire", expect="missing --id parameter")
    srv.fails("preauthkeys", "delete", expect="missing --id parameter")
    assert pre_auth_keys(srv, uid) == []


# -- auth, oauth clients, server info ------------------------------------------------------


def test_auth_command_validation(srv: Server) -> None:
    user(srv, "authval-user1")
    unknown = auth_id()
    srv.fails("auth", "register", "--user", "authval-user1", "--auth-id", "not-valid",
              expect="invalid")
    srv.fails("auth", "register", "--user", "ghost", "--auth-id", unknown,
              expect="looking up user")
    for verb in ("approve", "reject"):
        srv.fails("auth", verb, "--auth-id", "not-valid", expect="invalid auth_id")
        srv.fails("auth", verb, "--auth-id", unknown, expect="no pending auth session")


def test_oauth_client_command(srv: Server) -> None:
    created = srv.json("oauth-clients", "create", "--scope", "auth_keys", "--scope",
                       "devices:core", "--tag", "tag:k8s-operator", "--description", "operator")
    assert created["keyType"] == "client"
    assert created["id"] and created["key"]
    assert sorted(created["scopes"]) == ["auth_keys", "devices:core"]
    assert created["tags"] == ["tag:k8s-operator"]
    listed = srv.json("oauth-clients", "list")
    assert len(listed) == 1 and listed[0]["id"] == created["id"]
    assert not listed[0].get("key"), "the secret is never listed"
    assert sorted(listed[0]["scopes"]) == ["auth_keys", "devices:core"]
    assert listed[0]["description"] == "operator"
    srv.ok("oauth-clients", "delete", "--id", created["id"])
    assert srv.json("oauth-clients", "list") == []


def test_oauth_client_command_validation(srv: Server) -> None:
    srv.fails("oauth-clients", "create", expect="at least one --scope is required")
    srv.fails("oauth-clients", "create", "--scope", "devices:core", expect="tags are required")
    srv.fails("oauth-clients", "delete", expect="--id is required")
    srv.fails("oauth-clients", "delete", "--id", "doesnotexist", expect="404")


def test_server_info_commands(srv: Server) -> None:
    assert srv.json("health")["databaseConnectivity"] is True
    info = srv.json("version")
    assert info["version"] and info["go"]["version"]
    key = srv.json("generate", "private-key")
    assert "privkey:" in key["private_key"]
