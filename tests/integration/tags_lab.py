"""The tailnet of Headscale's tags scenarios (integration/tags_test.go), shared by
test_tags_authkey.py and test_tags_login.py.

Policy as Headscale's tagsTestPolicy: taguser owns tag:valid-owned and tag:second,
other-user owns tag:valid-unowned, tag:nonexistent is defined nowhere; everyone reaches
everyone. A `watcher` (an untagged node of taguser) stays up for the whole module and is
the peer whose `tailscale status` shows each scenario's node to the rest of the tailnet.
Every scenario joins clients of its own (own host, own keys), so scenarios do not disturb
each other.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from tests.integration import hsapi
from tests.integration.tailscale import Tailscaled
from tests.integration.versions import NEWEST
from tests.integration.world import World, interactive_up, peers_by_name, wait_for

USER, OTHER = "taguser", "other-user"
OWNED, SECOND, UNOWNED, NONEXISTENT = ("tag:valid-owned", "tag:second", "tag:valid-unowned",
                                       "tag:nonexistent")
POLICY: dict[str, Any] = {
    "tagOwners": {OWNED: [f"{USER}@"], SECOND: [f"{USER}@"], UNOWNED: [f"{OTHER}@"]},
    "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
}
TAGGED_USER = "tagged-devices"  # the user Headscale lists (and shows peers) for tagged nodes


def refusal(*tags: str) -> str:
    """Headscale's (and Tailscale SaaS's) words for refused tags, Go's %v of the list."""
    return f"requested tags [{' '.join(tags)}] are invalid or not permitted"


# POST/GET /api/v1/... from inside the server's namespace with an API key; prints
# "<status>\n<body>".
_API = r"""
import json, ssl, sys, urllib.error, urllib.request
url, key, ca, method, body = sys.argv[1:6]
req = urllib.request.Request(url, method=method, data=body.encode() if body else None,
                             headers={"Authorization": "Bearer " + key,
                                      "Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=15, context=ssl.create_default_context(cafile=ca)) as r:
        print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"""


class TagsLab(World):
    """The server with the tags policy, the watcher, and what scenarios do to their nodes."""

    def boot(self) -> None:
        self.start_server(overrides={"node": {"expiry": "24h"}}, users=[USER, OTHER],
                          keys={"watcher": {"user": USER, "reusable": True}}, policy=POLICY)
        self.watcher = self.join("watcher", NEWEST, "watcher")
        users = self.srv.cli_json("users", "list")
        self.user_ids = {u["name"]: str(u["id"]) for u in users}
        self._api_key = ""
        self._n = 0

    @property
    def srv(self) -> Any:
        assert self.server is not None
        return self.server

    # -- keys, clients, nodes -----------------------------------------------------------------

    def key(self, tags: tuple[str, ...] = (), user: str | None = USER,
            reusable: bool = False) -> str:
        """A fresh pre-auth key (`headscale preauthkeys create`); user None: tags only."""
        args = ["preauthkeys", "create", "-e", "1h"]
        if user is not None:
            args += ["-u", self.user_ids[user]]
        if reusable:
            args.append("--reusable")
        if tags:
            args += ["--tags", ",".join(tags)]
        return str(self.srv.cli_json(*args)["key"])

    def client(self, prefix: str, version: str) -> Tailscaled:
        """A new client named prefixN (short: namespace names are bounded)."""
        self._n += 1
        return self.add_client(f"{prefix}{self._n}", version)

    def up(self, ts: Tailscaled, key: str | None, *args: str) -> subprocess.CompletedProcess[str]:
        return ts.up(self.srv.url, authkey=key, extra_args=args, timeout=40)

    def joined(self, ts: Tailscaled, key: str, *args: str) -> dict[str, Any]:
        r = self.up(ts, key, *args)
        assert r.returncode == 0, r.stdout + r.stderr
        return self.node(ts)

    def web_login(self, ts: Tailscaled, *args: str, user: str = USER) -> dict[str, Any]:
        """`tailscale up` without a key, the admin registers it for `user` (Headscale's
        runHeadscaleRegister), the client runs."""
        up, auth_id = interactive_up(ts, self.srv, *args)
        try:
            r = self.srv.cli("auth", "register", "--auth-id", auth_id, "--user", user)
            assert r.returncode == 0, r.stdout + r.stderr
            assert up.wait(timeout=60) == 0
        finally:
            if up.poll() is None:
                up.kill()
                up.wait()
        ts.wait_tun_address()
        return self.node(ts)

    def nodes_named(self, ts: Tailscaled) -> list[dict[str, Any]]:
        return [n for n in hsapi.nodes(self.srv) if n["name"] == ts.host.name]

    def node(self, ts: Tailscaled) -> dict[str, Any]:
        """The server's one node for this client (Headscale: `len(nodes) == 1`)."""
        found = self.nodes_named(ts)
        assert len(found) == 1, found
        return found[0]

    def set_tags(self, node_id: str, *tags: str) -> subprocess.CompletedProcess[str]:
        """`headscale nodes tag -i ID --tags a,b` as Headscale's harness runs it."""
        return self.srv.cli("nodes", "tag", "-i", node_id, "--tags", ",".join(tags),
                            "--output", "json")

    def admin_tags(self, ts: Tailscaled, *tags: str) -> None:
        r = self.set_tags(str(self.node(ts)["id"]), *tags)
        assert r.returncode == 0, r.stdout + r.stderr
        assert sorted(json.loads(r.stdout)["tags"]) == sorted(tags)
        self.expect_tags(ts, tags)

    # -- what everyone sees ------------------------------------------------------------------

    def expect_tags(self, ts: Tailscaled, tags: tuple[str, ...] | list[str],
                    owner: str | None = None) -> dict[str, Any]:
        """The server lists exactly `tags` (and owner: TAGGED_USER when tagged unless given),
        the client's own status and netmap show them, and so does the watcher's peer entry
        with the matching user profile."""
        want = sorted(tags)
        owner = owner or (TAGGED_USER if want else USER)
        node = self.node(ts)
        assert sorted(node["tags"]) == want, node
        assert node["user"]["name"] == owner, node  # Headscale lists tagged-devices too
        wait_for(f"{ts.host.name} to show itself with {want}",
                 lambda: self_tags(ts) == want, 30)
        wait_for(f"{ts.host.name}'s netmap to carry {want}",
                 lambda: sorted(ts.netmap()["SelfNode"].get("Tags") or []) == want, 30)

        def seen() -> dict[str, Any] | None:
            st = self.watcher.status_json()
            p = peers_by_name(st).get(ts.host.name)
            if p is None or sorted(p.get("Tags") or []) != want:
                return None
            return p if st["User"][str(p["UserID"])]["LoginName"] == owner else None

        wait_for(f"the watcher to see {ts.host.name} with {want} owned by {owner}", seen, 30)
        return node

    def expect_unchanged(self, ts: Tailscaled, node: dict[str, Any],
                         tags: tuple[str, ...] | list[str]) -> None:
        """Still the same node (ID, addresses), running, with `tags` everywhere."""
        assert ts.backend_state() == "Running"
        after = self.expect_tags(ts, tags)
        assert (after["id"], after["ipAddresses"]) == (node["id"], node["ipAddresses"])

    # -- the REST API ------------------------------------------------------------------------

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        if not self._api_key:
            self._api_key = self.srv.cli("apikeys", "create", "-e", "1h").stdout.strip()
        r = self.srv.host.run(
            [sys.executable, "-c", _API, self.srv.url + path, self._api_key,
             str(self.srv.ca_file), method, "" if body is None else json.dumps(body)],
            timeout=30)
        status, _, text = r.stdout.partition("\n")
        assert status.strip().isdigit(), r.stdout + r.stderr
        return int(status), json.loads(text) if text.strip() else None


def self_tags(ts: Tailscaled) -> list[str]:
    return sorted(ts.status_json()["Self"].get("Tags") or [])
