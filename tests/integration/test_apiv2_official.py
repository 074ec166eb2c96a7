"""An auth key minted through OAuth registers an official Tailscale client with its tags, and
a token cannot mint a tag it neither holds nor owns (policy tagOwners decide ownership)."""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

import pytest

from tests.integration.server import PyHeadscale
from tests.integration.versions import PINNED
from tests.integration.world import World, peers_by_name, wait_for

pytestmark = pytest.mark.integration

POLICY = {
    "tagOwners": {"tag:k8s-operator": [], "tag:k8s": ["tag:k8s-operator"],
                  "tag:server": ["alice@"]},
    "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
}

_REQUEST = """
import base64, json, ssl, sys, urllib.request, urllib.error
url, ca, method, headers, body = sys.argv[1:6]
req = urllib.request.Request(url, method=method, data=base64.b64decode(body) or None,
                             headers=json.loads(headers))
try:
    with urllib.request.urlopen(req, timeout=20, context=ssl.create_default_context(cafile=ca)) as r:
        status, out = r.status, r.read()
except urllib.error.HTTPError as e:
    status, out = e.code, e.read()
print(status)
print(base64.b64encode(out).decode())
"""


def request(srv: PyHeadscale, method: str, path: str, body: bytes = b"",
            headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """An HTTPS request from inside the server's namespace; (status, parsed JSON body)."""
    res = srv.host.run([sys.executable, "-c", _REQUEST, srv.url + path, str(srv.ca_file),
                        method, json.dumps(headers or {}), base64.b64encode(body).decode()],
                       timeout=40)
    assert res.returncode == 0, res.stderr
    status, raw = res.stdout.splitlines()
    return int(status), json.loads(base64.b64decode(raw) or b"null")


def test_oauth_minted_tagged_key_registers_an_official_client(world: World) -> None:
    srv = world.start_server(policy=POLICY)
    client = srv.cli_json("oauth-clients", "create", "-s", "auth_keys", "-s",
                          "devices:core:read", "-t", "tag:k8s-operator", "-d", "operator")
    status, tok = request(srv, "POST", "/api/v2/oauth/token",
                          f"grant_type=client_credentials&client_secret={client['key']}".encode(),
                          {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200, tok
    bearer = {"Authorization": f"Bearer {tok['access_token']}",
              "Content-Type": "application/json"}

    def create_key(tags: list[str]) -> tuple[int, Any]:
        body = {"capabilities": {"devices": {"create": {"reusable": False, "tags": tags}}},
                "expirySeconds": 600, "description": "pod"}
        return request(srv, "POST", "/api/v2/tailnet/-/keys", json.dumps(body).encode(), bearer)

    # tag:k8s is owned by tag:k8s-operator, which the token holds.
    status, key = create_key(["tag:k8s"])
    assert status == 200 and key["tags"] == ["tag:k8s"], key
    # Neither held nor owned (tag:server belongs to alice), and untagged: refused, no key made.
    assert create_key(["tag:server"]) == (403, {
        "message": "token may not assign tag tag:server", "status": 403})
    assert create_key([])[0] == 403
    keys = srv.cli_json("preauthkeys", "list")
    assert [k["aclTags"] for k in keys if k["aclTags"]] == [["tag:k8s"]]

    pod = world.add_client("pod", PINNED[-1])
    r = pod.up(srv.url, authkey=key["key"], hostname="pod", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    me = wait_for("the node's own tags", lambda: pod.status_json().get("Self", {}), 30)
    assert me.get("Tags") == ["tag:k8s"], me

    nodes = srv.cli_json("nodes", "list")
    (node,) = [n for n in nodes if n["givenName"] == "pod"]
    assert node["tags"] == ["tag:k8s"] and node["user"]["name"] == "tagged-devices"
    status, dev = request(srv, "GET", f"/api/v2/device/{node['id']}", headers=bearer)
    assert status == 200 and dev["tags"] == ["tag:k8s"] and dev["user"] == "tagged-devices"
    # A second official client owned by alice sees the pod as a tagged peer.
    viewer = world.join("viewer", PINNED[-1])
    peer = wait_for("pod as a peer", lambda: peers_by_name(viewer.status_json()).get("pod"), 30)
    assert peer.get("Tags") == ["tag:k8s"]
    # The minted single-use key is now used up.
    status, got = request(srv, "GET", f"/api/v2/tailnet/-/keys/{key['id']}", headers=bearer)
    assert status == 200 and got["invalid"] is True and "key" not in got
