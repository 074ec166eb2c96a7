"""Node lifecycle judged by official clients: ephemeral nodes, tags as identity,
key expiry set, disabled and reached."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.integration import hsapi
from tests.integration.server import PyHeadscale
from tests.integration.tailscale import Tailscaled
from tests.integration.versions import NEWEST, OLDEST
from tests.integration.world import (
    World,
    interactive_up,
    peers_by_name,
    wait_for,
    world_fixture,
)

pytestmark = pytest.mark.integration

EPHEMERAL_TIMEOUT = 66  # seconds; Headscale refuses anything under 65 s


class Lab(World):
    """Users alice and bob; keys as each test needs them."""

    def start_server(self, keys: dict[str, dict[str, Any]],  # type: ignore[override]
                     overrides: dict[str, Any] | None = None,
                     policy: dict[str, Any] | None = None) -> PyHeadscale:
        return super().start_server(overrides, keys, ["alice", "bob"], policy)

    def client(self, name: str, version: str = NEWEST) -> Tailscaled:
        return self.add_client(name, version)

    def join(self, name: str, key: str, version: str = NEWEST,  # type: ignore[override]
             args: tuple[str, ...] = ()) -> Tailscaled:
        return super().join(name, version, key, args)


lab = world_fixture(Lab)


REUSABLE = {"user": "alice", "reusable": True}


def test_ephemeral_nodes_go_after_inactivity_or_logout_and_stay_while_running(
        lab: Lab) -> None:
    srv = lab.start_server(
        {"alice": REUSABLE, "eph": {"user": "alice", "reusable": True, "ephemeral": True}},
        {"node": {"ephemeral": {"inactivity_timeout": f"{EPHEMERAL_TIMEOUT}s"}}})
    watcher = lab.join("watcher", "alice")
    other = lab.join("other", "alice", OLDEST)
    gone = lab.join("gone", "eph")
    stays = lab.join("stays", "eph", OLDEST)
    for ts in (watcher, other):
        wait_for(f"{ts.host.name} to see both ephemeral nodes",
                 lambda ts=ts: {"gone", "stays"} <= set(peers_by_name(ts.status_json())), 10)

    gone.stop()
    stopped = time.monotonic()
    wait_for("the stopped node to show offline",
             lambda: peers_by_name(watcher.status_json()).get("gone", {}).get("Online") is False,
             30)
    # Well inside the timeout it is still there (offline), not deleted early.
    time.sleep(max(0.0, EPHEMERAL_TIMEOUT - 20 - (time.monotonic() - stopped)))
    assert "gone" in peers_by_name(watcher.status_json())
    assert hsapi.node_by_name(srv, "gone") is not None

    for ts in (watcher, other):
        wait_for(f"{ts.host.name} to drop the inactive ephemeral node",
                 lambda ts=ts: "gone" not in peers_by_name(ts.status_json()),
                 EPHEMERAL_TIMEOUT + 15 - (time.monotonic() - stopped))
    assert time.monotonic() - stopped >= EPHEMERAL_TIMEOUT - 1
    assert hsapi.node_by_name(srv, "gone") is None
    # The one still running has been up longer than the timeout and stays.
    assert "stays" in peers_by_name(watcher.status_json())
    assert hsapi.node_by_name(srv, "stays") is not None

    r = stays.logout()
    assert r.returncode == 0, r.stderr
    for ts in (watcher, other):
        wait_for(f"{ts.host.name} to drop the logged-out ephemeral node at once",
                 lambda ts=ts: "stays" not in peers_by_name(ts.status_json()), 5)
    assert hsapi.node_by_name(srv, "stays") is None


def test_tagged_key_makes_a_tagged_node_and_unowned_advertised_tags_are_refused(
        lab: Lab) -> None:
    policy = {
        "tagOwners": {"tag:server": ["alice@"], "tag:bobs": ["bob@"]},
        "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
    }
    srv = lab.start_server({"alice": REUSABLE, "tagged": {"tags": ["tag:server"]}},
                           {"node": {"expiry": "24h"}}, policy)
    viewer = lab.join("viewer", "alice", OLDEST)
    lab.join("tagged", "tagged")

    peer = wait_for("the viewer to see the tagged node with its tags",
                    lambda: peers_by_name(viewer.status_json()).get("tagged"), 10)
    assert peer.get("Tags") == ["tag:server"]
    st = viewer.status_json()
    assert st["User"][str(peer["UserID"])]["LoginName"] == "tagged-devices"
    node = hsapi.node_by_name(srv, "tagged")
    assert node is not None
    assert node["tags"] == ["tag:server"]
    assert node["user"] is None or node["user"]["name"] == "tagged-devices"
    assert node["expiry"] is None  # tagged nodes are exempt from node.expiry
    assert hsapi.node_by_name(srv, "viewer")["expiry"] is not None  # type: ignore[index]

    # alice does not own tag:bobs; Headscale refuses advertised tags on a user key.
    refused = lab.client("refused")
    r = refused.up(srv.url, authkey=lab.keys["alice"], hostname="refused",
                   extra_args=("--advertise-tags=tag:bobs",), timeout=30)
    assert r.returncode != 0
    assert "requested tags [tag:bobs] are invalid or not permitted" in r.stdout + r.stderr
    assert hsapi.node_by_name(srv, "refused") is None
    assert refused.backend_state() != "Running"


def test_expire_now_disable_and_future_expiry(lab: Lab) -> None:
    srv = lab.start_server({"alice": REUSABLE})
    a = lab.join("alpha", "alice")
    b = lab.join("bravo", "alice", OLDEST)
    wait_for("alpha to see bravo", lambda: "bravo" in peers_by_name(a.status_json()), 10)

    def seen_expired(ts: Tailscaled, name: str) -> bool:
        p = peers_by_name(ts.status_json()).get(name)
        return p is None or bool(p.get("Expired"))

    hsapi.expire(srv, "bravo")
    t0 = time.monotonic()
    wait_for("alpha to drop the expired bravo", lambda: seen_expired(a, "bravo"), 10)
    wait_for("bravo to report its own key expired",
             lambda: b.backend_state() == "NeedsLogin", 10)
    assert time.monotonic() - t0 < 10
    r = a.ping(b.ip("4")[0], count=2, timeout=2, until_direct=False)
    assert r.returncode != 0, "an expired node still answered"

    hsapi.expire(srv, "bravo", disable=True)
    wait_for("bravo to run again", lambda: b.backend_state() == "Running", 15)
    wait_for("alpha to see bravo valid again", lambda: not seen_expired(a, "bravo"), 15)
    r = a.ping(b.ip("4")[0], count=10, until_direct=False)
    assert r.returncode == 0, r.stdout + r.stderr

    # A window wide enough for a busy machine (parallel workers): the checks before it
    # passes must run while it is still in the future.
    at = datetime.now(UTC) + timedelta(seconds=40)
    node = hsapi.expire(srv, "alpha", expiry=at.isoformat().replace("+00:00", "Z"))
    assert node["expiry"] is not None
    assert a.backend_state() == "Running" and not seen_expired(b, "alpha")
    assert datetime.now(UTC) < at - timedelta(seconds=2), "checks ran past the expiry"
    wait_for("the future expiry to take effect on alpha",
             lambda: a.backend_state() == "NeedsLogin", 60)
    assert datetime.now(UTC) >= at - timedelta(seconds=1)
    wait_for("bravo to drop alpha", lambda: seen_expired(b, "alpha"), 10)


def test_advertise_tags_at_web_login_are_checked_and_reauth_returns_the_node(
        lab: Lab) -> None:
    policy = {
        "tagOwners": {"tag:server": ["alice@"]},
        "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
    }
    srv = lab.start_server({"alice": REUSABLE}, {"node": {"expiry": "24h"}}, policy)
    viewer = lab.join("viewer", "alice", OLDEST)
    ts = lab.client("webby")
    up, auth_id = interactive_up(ts, srv, "--advertise-tags=tag:server")

    # bob does not own tag:server: the registration is refused and nothing is created.
    r = srv.cli("auth", "register", "--auth-id", auth_id, "--user", "bob")
    assert r.returncode != 0
    assert "requested tags [tag:server] are invalid or not permitted" in r.stdout + r.stderr
    assert hsapi.node_by_name(srv, "webby") is None
    # alice owns it: the node joins tagged, without expiry.
    r = srv.cli("auth", "register", "--auth-id", auth_id, "--user", "alice")
    assert r.returncode == 0, r.stderr
    assert up.wait(timeout=60) == 0
    node = hsapi.node_by_name(srv, "webby")
    assert node is not None and node["tags"] == ["tag:server"] and node["expiry"] is None
    wait_for("the viewer to see webby tagged",
             lambda: peers_by_name(viewer.status_json()).get("webby", {}).get("Tags")
             == ["tag:server"], 10)

    # Re-auth with an empty --advertise-tags returns the node to the user who logs in.
    up, auth_id = interactive_up(ts, srv, "--advertise-tags=", "--force-reauth")
    r = srv.cli("auth", "register", "--auth-id", auth_id, "--user", "alice")
    assert r.returncode == 0, r.stderr
    assert up.wait(timeout=60) == 0
    after = hsapi.node_by_name(srv, "webby")
    assert after is not None and after["id"] == node["id"]
    assert after["tags"] == [] and after["user"]["name"] == "alice"
    assert after["expiry"] is not None
    wait_for("the viewer to see webby untagged",
             lambda: not peers_by_name(viewer.status_json()).get("webby", {}).get("Tags"), 10)
