"""The headscale-compatible CLI against a live `pyheadscale serve` on 127.0.0.1: over the unix
socket (trusted) and remotely with an API key; human tables and parsed `-o json` output;
Headscale's errors on stderr with exit code 1. Needs no namespaces or clients. Each test has
its own server, so any one runs alone (`pytest tests/integration/test_cli.py::test_policy`)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.integration.cli_server import PY, Server, running_server

POLICY = '{"tagOwners": {"tag:web": ["alice@"]}, "acls": [{"action": "accept", ' \
         '"src": ["*"], "dst": ["*:*"]}]}'
AUTH_ID = "hskey-authreq-" + "c0ffee" * 4


@pytest.fixture
def srv() -> Iterator[Server]:
    """A fresh server per test: every test runs alone, in any order or worker."""
    with running_server() as s:
        yield s


def with_alice(srv: Server) -> str:
    """Create user alice (what most commands need first); returns her ID."""
    return str(srv.json("users", "create", "alice", "-e", "a@example.com")["id"])


def test_users(srv: Server) -> None:
    assert srv.ok("users", "create", "alice", "-d", "Alice A", "-e", "a@example.com") \
        .strip() == "User created"
    u = srv.json("users", "create", "bob")
    assert u["name"] == "bob" and re.fullmatch(r"\d+", u["id"])
    users = srv.json("users", "list")
    assert [x["name"] for x in users] == ["alice", "bob"]
    assert users[0]["displayName"] == "Alice A"
    table = srv.ok("user", "ls").splitlines()
    assert re.split(r"\s*\|\s*", table[0]) == ["ID", "Name", "Username", "Email", "Created"]
    assert any("Alice A" in line and "a@example.com" in line for line in table[1:])
    assert [x["name"] for x in srv.json("users", "list", "-n", "bob")] == ["bob"]
    line = json.loads(srv.ok("users", "list", "-e", "a@example.com", "-o", "json-line"))
    assert [x["name"] for x in line] == ["alice"]
    assert yaml.safe_load(srv.ok("users", "list", "-o", "yaml"))[1]["name"] == "bob"
    srv.fails("users", "create", "alice", expect="Error: creating user: user already exists")
    srv.fails("users", "rename", "-n", "bob", expect='required flag(s) "new-name" not set')
    assert srv.json("users", "mv", "-n", "bob", "-r", "carol")["name"] == "carol"
    srv.fails("users", "destroy", "-n", "ghost",
              expect="multiple users match query, specify an ID")
    srv.fails("users", "destroy", expect="--name or --identifier flag is required")
    # The prompt: "n" keeps the user, --force removes it.
    r = srv.run("users", "destroy", "-n", "carol", stdin="n\n")
    assert r.returncode == 0 and "User not destroyed" in r.stdout
    assert "Do you want to remove the user" in r.stderr
    assert srv.ok("users", "delete", "-n", "carol", "--force").strip() == "User destroyed"
    err = srv.fails("users", "create", "alice", "-o", "json", expect='"error"')
    assert json.loads(err)["error"].startswith("creating user:")


def test_preauthkeys(srv: Server) -> None:
    uid = with_alice(srv)
    k = srv.json("preauthkeys", "create", "-u", uid, "--reusable", "-e", "24h")
    assert re.fullmatch(r"hskey-auth-[0-9a-f]{12}-[0-9a-f]{64}", k["key"])
    assert k["reusable"] is True and k["user"]["name"] == "alice"
    text = srv.ok("authkey", "create", "--tags", "tag:ci,tag:build", "--ephemeral").strip()
    assert re.fullmatch(r"hskey-auth-[0-9a-f]{12}-[0-9a-f]{64}", text)
    keys = srv.json("preauthkeys", "list")
    tagged = [x for x in keys if x["aclTags"]]
    assert tagged[0]["aclTags"] == ["tag:build", "tag:ci"] and tagged[0]["user"] is None
    table = srv.ok("pre", "ls")
    assert "Key/Prefix" in table and "tag:build" in table and "alice" in table
    srv.fails("preauthkeys", "create", "--tags", "ci", expect="invalid tag")
    srv.fails("preauthkeys", "create", "-u", uid, "-e", "soon",
              expect='parsing duration: not a valid duration string: "soon"')
    srv.fails("preauthkeys", "create", "-u", "999", expect="user not found")
    srv.fails("preauthkeys", "create", expect="auth-key must be either tagged or owned by user")
    srv.fails("preauthkeys", "expire", expect="missing --id parameter")
    srv.fails("preauthkeys", "delete", "-i", "x", expect='invalid argument "x"')
    assert srv.ok("preauthkeys", "expire", "-i", k["id"]).strip() == "Key expired"
    assert srv.json("preauthkeys", "expire", "-i", k["id"]) == {}
    srv.fails("preauthkeys", "expire", "-i", "9999", expect="not found")
    assert srv.ok("preauthkeys", "rm", "-i", k["id"]).strip() == "Key deleted"
    assert k["id"] not in [x["id"] for x in srv.json("preauthkeys", "list")]


def test_nodes_and_auth(srv: Server) -> None:
    with_alice(srv)
    srv.fails("debug", "create-node", "--name", "n1", "-u", "alice", "-k", "bad",
              expect="parsing machine key")
    echo = srv.json("debug", "create-node", "--name", "web1", "-u", "alice", "-k", AUTH_ID,
                    "-r", "10.20.0.0/16,0.0.0.0/0", "-r", "::/0")
    assert echo["availableRoutes"] == ["10.20.0.0/16", "0.0.0.0/0", "::/0"]
    srv.fails("auth", "register", "--auth-id", AUTH_ID, expect='required flag(s) "user"')
    srv.fails("auth", "register", "-u", "ghost", "--auth-id", AUTH_ID,
              expect="user not found")
    assert srv.ok("auth", "register", "-u", "alice", "--auth-id", AUTH_ID).strip() == \
        "Node web1 registered"
    nodes = srv.json("nodes", "list")
    assert len(nodes) == 1 and nodes[0]["givenName"] == "web1"
    n = nodes[0]
    nid = n["id"]
    assert n["registerMethod"] == "REGISTER_METHOD_CLI" and len(n["ipAddresses"]) == 2
    table = srv.ok("nodes", "ls").splitlines()
    assert "MachineKey" in table[0] and "Connected" in table[0]
    assert "web1" in table[1] and "alice" in table[1] and "offline" in table[1]
    assert srv.json("nodes", "list", "-u", "alice")[0]["id"] == nid
    srv.fails("nodes", "list", "-u", "ghost", expect="listing nodes: user not found")
    # approve routes, list-routes
    srv.fails("nodes", "approve-routes", "-r", "10.0.0.0/8",
              expect='required flag(s) "identifier" not set')
    srv.fails("nodes", "approve-routes", "-i", nid, "-r", "10.0.0.300/8",
              expect="parsing route")
    node = srv.json("nodes", "approve-routes", "-i", nid, "-r", "10.20.0.0/16,0.0.0.0/0")
    assert node["approvedRoutes"] == ["0.0.0.0/0", "10.20.0.0/16", "::/0"]
    routes = srv.json("nodes", "list-routes")
    assert [r["id"] for r in routes] == [nid]
    assert "Serving (Primary)" in srv.ok("nodes", "routes", "-i", nid)
    node = srv.json("nodes", "approve-routes", "-i", nid, "-r", "")
    assert node["approvedRoutes"] == []
    # tags
    srv.fails("nodes", "tag", "-i", nid, "-t", "web", expect="tag must start with")
    srv.fails("nodes", "tag", "-i", nid, "-t", "tag:web",
              expect="requested tags [tag:web] are invalid or not permitted")
    # expiry
    srv.fails("nodes", "expire", expect='required flag(s) "identifier" not set')
    srv.fails("nodes", "expire", "-i", nid, "-e", "next week", expect="parsing expiry time")
    srv.fails("nodes", "expire", "-i", "424242", expect="not found")
    assert srv.ok("nodes", "expire", "-i", nid, "-e", "2099-01-01T00:00:00Z").strip() == \
        "Node expiration updated"
    assert srv.json("nodes", "expire", "-i", nid, "-d")["expiry"] is None
    assert srv.ok("node", "logout", "-i", nid).strip() == "Node expired"
    assert "yes" in srv.ok("nodes", "list").splitlines()[1]
    # rename, delete
    assert srv.json("nodes", "rename", "-i", nid, "frontend")["givenName"] == "frontend"
    srv.fails("nodes", "rename", "-i", nid, "Not_Valid!", expect="renaming node")
    r = srv.run("nodes", "delete", "-i", nid, stdin="no\n")
    assert r.returncode == 0 and "Node not deleted" in r.stdout
    assert srv.json("nodes", "delete", "-i", nid, "--force") == {"Result": "Node deleted"}
    assert srv.json("nodes", "list") == []
    srv.fails("nodes", "delete", "-i", nid, "--force", expect="getting node: node not found")
    assert srv.json("nodes", "backfillips", "--force") == {"changes": []}


def test_policy(srv: Server, tmp_path: Path) -> None:
    srv.fails("policy", "get", expect="acl policy not found")
    bad = tmp_path / "bad.hujson"
    bad.write_text('{"acls": [')
    good = tmp_path / "good.hujson"
    good.write_text(POLICY)
    srv.fails("policy", "check", "-f", str(bad), expect="parsing HuJSON:")
    srv.fails("policy", "set", "-f", str(bad), expect="setting ACL policy")
    srv.fails("policy", "set", expect='required flag(s) "file" not set')
    srv.fails("policy", "set", "-f", str(tmp_path / "missing"), expect="reading policy file")
    assert srv.ok("policy", "check", "-f", str(good)).strip() == "Policy is valid"
    assert srv.ok("policy", "put", "-f", str(good)).strip() == "Policy updated."
    assert srv.ok("policy", "get").strip() == POLICY
    # The bypass reads the database directly (reading is safe while the server runs).
    r = srv.run("policy", "get", "--bypass-server-and-access-database-directly", stdin="n\n")
    assert r.returncode == 1 and "command aborted by user" in r.stderr
    out = srv.ok("policy", "show", "--bypass-grpc-and-access-database-directly", "--force")
    assert out.strip() == POLICY
    assert srv.ok("policy", "check", "-f", str(good), "--force",
                  "--bypass-server-and-access-database-directly").strip() == "Policy is valid"
    srv.fails("policy", "check", "-f", str(bad), "--force",
              "--bypass-server-and-access-database-directly", expect="parsing HuJSON:")


def test_apikeys_and_remote(srv: Server) -> None:
    with_alice(srv)
    key = srv.ok("apikeys", "create", "-e", "1d").strip()
    assert re.fullmatch(r"hskey-api-[0-9a-f]{12}-[0-9a-f]{64}", key)
    keys = srv.json("apikeys", "list")
    assert keys[0]["prefix"] == key[:22] + "-***" and keys[0]["lastSeen"] is None
    assert "Prefix" in srv.ok("api", "ls")
    remote = srv.env(HEADSCALE_CLI_ADDRESS=f"http://127.0.0.1:{srv.port}",
                     HEADSCALE_CLI_API_KEY=key)
    users = srv.json("users", "list", env=remote)
    assert "alice" in [u["name"] for u in users]
    assert "Username" in srv.ok("users", "list", env=remote)
    assert srv.ok("health", env=remote).strip() == ""
    assert srv.json("health", env=remote) == {"databaseConnectivity": True}
    assert srv.json("apikeys", "list", env=remote)[0]["lastSeen"] is not None
    srv.fails("users", "list", env=srv.env(HEADSCALE_CLI_ADDRESS=f"127.0.0.1:{srv.port}"),
              expect="HEADSCALE_CLI_API_KEY environment variable needs to be set")
    wrong = dict(remote, HEADSCALE_CLI_API_KEY="hskey-api-" + "0" * 12 + "-" + "1" * 64)
    srv.fails("users", "list", env=wrong, expect="Unauthorized")
    srv.fails("apikeys", "expire", expect="either --id or --prefix must be provided")
    srv.fails("apikeys", "expire", "-i", "1", "-p", "x", expect="only one of --id or --prefix")
    srv.fails("apikeys", "expire", "-p", "hskey-api-000000000000-***", expect="not found")
    assert srv.ok("apikeys", "expire", "-p", keys[0]["prefix"]).strip() == "Key expired"
    srv.fails("users", "list", env=remote, expect="Unauthorized")
    assert srv.ok("apikeys", "delete", "-i", keys[0]["id"]).strip() == "Key deleted"
    assert srv.json("apikeys", "list") == []


def test_misc(srv: Server) -> None:
    assert srv.json("version")["version"].startswith("v0.29")
    assert srv.ok("version").startswith("headscale version v0.29")
    pk = srv.json("generate", "private-key")["private_key"]
    assert re.fullmatch(r"privkey:[0-9a-f]{64}", pk)
    assert srv.json("health") == {"databaseConnectivity": True}
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/version", timeout=5) as r:
        assert json.load(r)["version"] == "v0.29.2"
    srv.fails("nodes", "frobnicate", expect="No such command")
    down = Server.env()
    r = subprocess.run([PY, "-m", "pyheadscale", "-c", str(srv.config), "users", "list"],
                       capture_output=True, text=True, timeout=60,
                       env=dict(down, HEADSCALE_UNIX_SOCKET=str(srv.dir / "nope.sock"),
                                HEADSCALE_CLI_TIMEOUT="300ms"))
    assert r.returncode == 1 and "connecting to headscale" in r.stderr


def test_oauth_clients(srv: Server) -> None:
    """`headscale oauth-clients` over the socket (v2 with local trust) and remotely; the
    secret it prints mints a token at the live server's /api/v2/oauth/token."""
    with_alice(srv)
    created = srv.json("oauth-clients", "create", "-s", "devices:core:read", "-s", "users:read",
                       "-d", "monitoring")
    cid, secret = created["id"], created["key"]
    assert re.fullmatch(r"[0-9a-f]{12}", cid) and secret.startswith(f"hskey-client-{cid}-")
    assert created["scopes"] == ["devices:core:read", "users:read"]
    human = srv.ok("oauth", "create", "-s", "auth_keys", "-t", "tag:web")
    assert "Secret (shown once, store it now): hskey-client-" in human
    listed = srv.json("oauth-clients", "list")
    assert {c["id"] for c in listed} >= {cid} and all("key" not in c for c in listed)
    table = srv.ok("oauth-clients", "ls")
    assert "Scopes" in table and "monitoring" in table and "hskey-client" not in table
    srv.fails("oauth-clients", "create", expect="at least one --scope is required")
    srv.fails("oauth-clients", "create", "-s", "auth_keys",
              expect="tags are required when scopes include devices:core or auth_keys")
    srv.fails("oauth-clients", "create", "-s", "root", expect="unknown scope")
    srv.fails("oauth-clients", "delete", expect="--id is required")
    srv.fails("oauth-clients", "delete", "-i", "0123456789ab", expect="not found")

    req = urllib.request.Request(
        f"http://127.0.0.1:{srv.port}/api/v2/oauth/token", method="POST",
        data=f"grant_type=client_credentials&client_secret={secret}".encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(req, timeout=10) as r:
        tok = json.load(r)
        assert r.headers["Cache-Control"] == "no-store"
    assert tok["token_type"] == "Bearer" and tok["expires_in"] == 3600
    users = urllib.request.Request(f"http://127.0.0.1:{srv.port}/api/v2/tailnet/-/users",
                                   headers={"Authorization": f"Bearer {tok['access_token']}"})
    with urllib.request.urlopen(users, timeout=10) as r:
        assert "users" in json.load(r)
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/api/v2/openapi.json",
                                timeout=10) as r:
        spec = json.load(r)
    assert spec["paths"]["/api/v2/tailnet/{tailnet}/users"]["get"]["x-required-scope"] == \
        "users:read"

    users = {u["name"]: u["id"] for u in srv.json("users", "list")}
    key = srv.ok("apikeys", "create", "-e", "1d", "--user", users["alice"]).strip()
    remote = srv.env(HEADSCALE_CLI_ADDRESS=f"http://127.0.0.1:{srv.port}",
                     HEADSCALE_CLI_API_KEY=key)
    # A key made for alice creates auth keys owned by her through /api/v2.
    owned = urllib.request.Request(
        f"http://127.0.0.1:{srv.port}/api/v2/tailnet/-/keys", method="POST",
        data=b'{"capabilities": {"devices": {"create": {"reusable": true}}}}',
        headers={"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode(),
                 "Content-Type": "application/json"})
    with urllib.request.urlopen(owned, timeout=10) as r:
        assert json.load(r)["userId"] == users["alice"]
    srv.fails("apikeys", "create", "--user", "424242", expect="user not found")
    assert cid in {c["id"] for c in srv.json("oauth-clients", "list", env=remote)}
    assert srv.json("oauth-clients", "delete", "-i", cid, env=remote) == {"id": cid}
    assert srv.ok("oauth-clients", "delete", "-i", listed[-1]["id"]).strip().endswith("deleted")
    assert srv.json("oauth-clients", "list") == []
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 401  # the deleted client's secret no longer works
