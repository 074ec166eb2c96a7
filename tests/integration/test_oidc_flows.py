"""Headscale's OIDC login edge cases (integration/auth_oidc_test.go) with official clients and
a real OpenID provider, on one server: users the provider creates next to CLI users of the same
name (the 0.24 user-creation rules), a login URL that expires while the client waits, the
login URLs of two `tailscale up` runs opened in one browser, the node expiry surviving a
client restart, and one machine logging out and in again as the same or another user.

The server runs with a short registration cache (so an unused login URL expires within the
test) and node.expiry 72h (so OIDC nodes get an expiry to keep).
"""

from __future__ import annotations

import re
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.integration.idp import Account, browser_login
from tests.integration.oidc_world import OIDCWorld
from tests.integration.server import PyHeadscale
from tests.integration.tailscale import Tailscaled
from tests.integration.test_oidc_official import (
    oidc_overrides,
    up_args,
    web_login,
)
from tests.integration.versions import MIDDLE, NEWEST, OLDEST
from tests.integration.world import shared_world_fixture, wait_for

pytestmark = pytest.mark.integration

CACHE_S = 20  # tuning.register_cache_expiration

USER1 = Account("user1", "pw-user1", email="user1@headscale.net", name="User One",
                preferred_username="user1")
USER2 = Account("user2", "pw-user2", email="user2@headscale.net", email_verified=False,
                name="User Two", preferred_username="user2")
CAROL = Account("carol-sub", "pw-carol", email="carol@example.com", name="Carol",
                preferred_username="carol")
DAVE = Account("dave-sub", "pw-dave", email="dave@example.com", name="Dave",
               preferred_username="dave")
ERIN = Account("erin-sub", "pw-erin", email="erin@example.com", name="Erin",
               preferred_username="erin")
FRANK = Account("frank-sub", "pw-frank", email="frank@example.com", name="Frank",
                preferred_username="frank")
GRACE = Account("grace-sub", "pw-grace", email="grace@example.com", name="Grace",
                preferred_username="grace")
HEIDI = Account("heidi-sub", "pw-heidi", email="heidi@example.com", name="Heidi",
                preferred_username="heidi")


OIDCLab = OIDCWorld


def setup(lab: OIDCLab) -> None:
    idp = lab.start_idp([USER1, USER2, CAROL, DAVE, ERIN, FRANK, GRACE, HEIDI])
    over = oidc_overrides(lab, idp)
    over["tuning"] = {"register_cache_expiration": f"{CACHE_S}s"}
    over["node"] = {"expiry": "72h"}
    lab.start_server(over, users=[])


lab = shared_world_fixture(OIDCLab, setup)


def users_by_provider_id(srv: PyHeadscale) -> dict[str, dict[str, Any]]:
    return {u.get("providerId", ""): u for u in srv.cli_json("users", "list")}


class Up:
    """`tailscale up` without a key, left running; its output is collected by a thread."""

    def __init__(self, srv: PyHeadscale, ts: Tailscaled, hostname: str) -> None:
        self.lines: list[str] = []
        self.proc = ts.host.popen([str(ts.tailscale), f"--socket={ts.socket}",
                                   *up_args(srv, hostname)], env=ts.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url_re = re.compile(re.escape(srv.url) + r"/register/hskey-authreq-[0-9a-f]+")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def urls(self) -> list[str]:
        return self.url_re.findall("".join(self.lines))

    def first_url(self) -> str:
        return str(wait_for("`tailscale up` to print a login URL",
                            lambda: (self.urls() or [None])[0], timeout=30))

    def wait(self) -> None:
        try:
            assert self.proc.wait(timeout=60) == 0, "".join(self.lines)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)


def test_oidc_024_user_creation(lab: OIDCLab) -> None:
    """TestOIDC024UserCreation: CLI users named like the provider's users (user1, user2, and
    user1.headscale.net) are never taken over; each login creates its own OIDC user, named
    after preferred_username, with the e-mail only when the provider verified it."""
    srv = lab.server
    assert srv is not None and lab.idp is not None
    cli = {"user1": "user1@test.no", "user2": "user2@test.no",
           "user1.headscale.net": "user1.headscale.net@test.no"}
    for name, email in cli.items():
        r = srv.cli("users", "create", name, "--email", email)
        assert r.returncode == 0, r.stdout + r.stderr
    before = {u["name"]: u for u in srv.cli_json("users", "list") if u["name"] in cli}
    web_login(srv, lab.add_client("n-user1", OLDEST), USER1, "n-user1")
    web_login(srv, lab.add_client("n-user2", NEWEST), USER2, "n-user2")

    users = srv.cli_json("users", "list")
    iss = lab.idp.issuer
    for name, email in cli.items():  # untouched, still without a provider
        (u,) = [u for u in users if u["name"] == name and not u.get("provider")]
        assert (u["id"], u["email"]) == (before[name]["id"], email)
    by_pid = users_by_provider_id(srv)
    one, two = by_pid[f"{iss}/{USER1.sub}"], by_pid[f"{iss}/{USER2.sub}"]
    assert (one["name"], one["email"], one["provider"]) == ("user1", USER1.email, "oidc")
    assert (two["name"], two.get("email", ""), two["provider"]) == ("user2", "", "oidc")
    assert int(one["id"]) > int(before["user1"]["id"])
    owners = {n["givenName"]: n["user"]["id"] for n in srv.cli_json("nodes", "list")}
    assert owners["n-user1"] == one["id"] and owners["n-user2"] == two["id"]


def test_oidc_follow_up_url(lab: OIDCLab) -> None:
    """TestOIDCFollowUpUrl: the client waits on a login URL nobody opens; when the server's
    registration cache drops it, the client gets (and shows) a new URL, which then works."""
    srv = lab.server
    assert srv is not None and lab.idp is not None
    ts = lab.add_client("follow", MIDDLE)
    up = Up(srv, ts, "follow")
    first = up.first_url()
    # The old registration expires (CACHE_S); the client's follow-up gets a fresh URL.
    st = wait_for("the client to show a new login URL", lambda: (
        s if (s := ts.status_json()).get("AuthURL") not in (None, "", first) else None),
        timeout=CACHE_S + 40)
    assert st["BackendState"] == "NeedsLogin"
    second = st["AuthURL"]
    assert second.startswith(f"{srv.url}/register/hskey-authreq-")
    res = browser_login(srv.host, second, CAROL, ca_file=srv.ca_file)
    assert res.confirm_status == 200 and "Node registered" in res.confirm_page, res.confirm_page
    up.wait()
    ts.wait_state("Running", timeout=30)
    u = users_by_provider_id(srv)[f"{lab.idp.issuer}/{CAROL.sub}"]
    assert (u["name"], u["email"], u["provider"]) == ("carol", CAROL.email, "oidc")
    owners = {n["givenName"]: n["user"]["id"] for n in srv.cli_json("nodes", "list")}
    assert owners["follow"] == u["id"]


def test_oidc_multiple_opened_login_urls(lab: OIDCLab) -> None:
    """TestOIDCMultipleOpenedLoginUrls: `tailscale up` twice gives two different login URLs;
    each opened in one browser reaches the provider (two redirects with their own state and
    nonce); the first tab completed registers the machine once. Here the client (waiting on
    the newest URL) is then running too, and the machine has exactly one node."""
    srv = lab.server
    assert srv is not None and lab.idp is not None
    ts = lab.add_client("tabs", NEWEST)
    first = Up(srv, ts, "tabs")
    u1 = first.first_url()
    second = Up(srv, ts, "tabs")
    u2 = second.first_url()
    assert u1 != u2
    res = browser_login(srv.host, u1, DAVE, ca_file=srv.ca_file, other_tabs=[u2])
    r1, r2 = res.redirects
    assert r1.startswith(lab.idp.issuer) and r2.startswith(lab.idp.issuer)
    assert r1 != r2  # each tab has its own state and nonce
    assert res.confirm_status == 200 and "Node registered" in res.confirm_page, res
    ts.wait_state("Running", timeout=30)
    for up in (first, second):  # which of the two `up`s reports the login is the client's
        if up.proc.poll() is None:
            up.proc.kill()
        up.proc.wait(10)
    u = users_by_provider_id(srv)[f"{lab.idp.issuer}/{DAVE.sub}"]
    assert (u["name"], u["email"], u["provider"]) == ("dave", DAVE.email, "oidc")
    (node,) = [n for n in srv.cli_json("nodes", "list") if n["givenName"] == "tabs"]
    assert node["user"]["id"] == u["id"]
    assert [n["id"] for n in machine_nodes(srv, node["machineKey"])] == [node["id"]]  # once
    assert node["nodeKey"] == ts.status_json()["Self"]["PublicKey"]


def test_oidc_expiry_after_restart(lab: OIDCLab) -> None:
    """TestOIDCExpiryAfterRestart: an OIDC node gets node.expiry (72h) at login, and a
    restart of its tailscaled keeps that exact expiry."""
    srv = lab.server
    assert srv is not None
    ts = lab.add_client("expiry", OLDEST)
    web_login(srv, ts, ERIN, "expiry")

    def expiry() -> str:
        (n,) = [n for n in srv.cli_json("nodes", "list") if n["givenName"] == "expiry"]
        return str(n.get("expiry") or "")

    before = expiry()
    at = datetime.fromisoformat(before.replace("Z", "+00:00"))
    left = at - datetime.now(UTC)
    assert timedelta(hours=71) < left <= timedelta(hours=72), before
    ts.restart()
    ts.wait_state("Running", timeout=60)
    assert expiry() == before


def machine_nodes(srv: PyHeadscale, machine_key: str) -> list[dict[str, Any]]:
    return sorted((n for n in srv.cli_json("nodes", "list") if n["machineKey"] == machine_key),
                  key=lambda n: int(n["id"]))


def log_out(ts: Tailscaled) -> None:
    r = ts.logout()
    assert r.returncode == 0, r.stdout + r.stderr
    ts.wait_state("NeedsLogin", timeout=30)


def online(srv: PyHeadscale, node_id: str) -> bool:
    return any(n["id"] == node_id and n.get("online") for n in srv.cli_json("nodes", "list"))


def test_oidc_relogin_same_node_new_user(lab: OIDCLab) -> None:
    """TestOIDCReloginSameNodeNewUser: one machine logs in as frank, logs out, logs in as
    grace (a second node: same machine key, its own node key, ID and user), logs out, and
    logs in as frank again: frank's node comes back (same ID, new node key), still two."""
    srv = lab.server
    assert srv is not None
    ts = lab.add_client("switch", MIDDLE)
    web_login(srv, ts, FRANK, "switch")
    (first,) = [n for n in srv.cli_json("nodes", "list") if n["givenName"] == "switch"]
    mkey = first["machineKey"]
    log_out(ts)
    web_login(srv, ts, GRACE, "switch", "--reset")
    nodes = machine_nodes(srv, mkey)
    assert len(nodes) == 2, nodes
    frank, grace = nodes
    assert frank["id"] == first["id"] and frank["user"]["name"] == "frank"
    assert grace["user"]["name"] == "grace" and grace["nodeKey"] != frank["nodeKey"]
    wait_for("grace's node to be online", lambda: online(srv, grace["id"]), 30)
    log_out(ts)
    assert len(machine_nodes(srv, mkey)) == 2, "logging out must not delete the node"
    web_login(srv, ts, FRANK, "switch", "--reset", expect="Node reauthenticated")
    after = machine_nodes(srv, mkey)
    assert [n["id"] for n in after] == [frank["id"], grace["id"]]
    assert after[0]["user"]["name"] == "frank" and after[0]["nodeKey"] != first["nodeKey"]
    assert after[1]["nodeKey"] == grace["nodeKey"]
    wait_for("frank's node to be online again", lambda: online(srv, frank["id"]), 30)


def test_oidc_relogin_same_node_same_user(lab: OIDCLab) -> None:
    """TestOIDCReloginSameNodeSameUser: log out and in again as the same user: the same node
    (ID, machine key, user) with a new node key, online again."""
    srv = lab.server
    assert srv is not None and lab.idp is not None
    ts = lab.add_client("again", OLDEST)
    web_login(srv, ts, HEIDI, "again")
    (first,) = [n for n in srv.cli_json("nodes", "list") if n["givenName"] == "again"]
    log_out(ts)
    assert machine_nodes(srv, first["machineKey"]) != []
    web_login(srv, ts, HEIDI, "again", "--reset", expect="Node reauthenticated")
    (after,) = machine_nodes(srv, first["machineKey"])
    assert (after["id"], after["user"]["id"]) == (first["id"], first["user"]["id"])
    assert after["nodeKey"] != first["nodeKey"]
    heidi = [u for u in srv.cli_json("users", "list") if u["name"] == "heidi"]
    assert len(heidi) == 1 and heidi[0]["providerId"] == f"{lab.idp.issuer}/{HEIDI.sub}"
    wait_for("the node to be online again", lambda: online(srv, first["id"]), 30)
