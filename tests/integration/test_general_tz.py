"""Ephemeral nodes with the server in another time zone (Headscale's
TestEphemeralInAlternateTimezone): the server runs with TZ=America/Los_Angeles, so any
local, naive time mixed with UTC would be hours off. Two users' ephemeral nodes (one per
pinned version each) mesh; the times the server reports are real UTC instants; all go down
and come back before the inactivity timeout and mesh again; then half log out (deleted at
once) and half go down (deleted after the timeout: not at once, not hours late).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.integration import hsapi
from tests.integration.seed import seed
from tests.integration.server import PyHeadscale
from tests.integration.versions import PINNED
from tests.integration.world import World, wait_for, wait_mesh

pytestmark = pytest.mark.integration

TZ = "America/Los_Angeles"
TIMEOUT = 66  # seconds; Headscale refuses an ephemeral inactivity timeout under 65 s


def _rfc3339(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_ephemeral_in_alternate_timezone(world: World) -> None:
    """Also Headscale's TestEphemeral2006DeletedTooQuickly: all nodes down and up again
    within the timeout stay and mesh; down for good, they go after the timeout."""
    srv = PyHeadscale(world.server_host, world.workdir / "server",
                      {"node": {"ephemeral": {"inactivity_timeout": f"{TIMEOUT}s"}}},
                      start=False, env={"TZ": TZ})
    world.server = srv
    world.keys = seed(srv, ["user1", "user2"], {
        u: {"user": u, "reusable": True, "ephemeral": True} for u in ("user1", "user2")})["keys"]
    srv.start()
    check = srv.host.run(["date", "+%Z"], env={"TZ": TZ}).stdout.strip()
    assert check in ("PST", "PDT"), check  # the zone exists here, so the server runs in it

    names = [f"{u}-{i}" for u in ("user1", "user2") for i in range(len(PINNED))]
    for name in names:
        world.join(name, PINNED[int(name[-1])], name.split("-")[0])
    wait_mesh([world.nodes[n] for n in names])

    now = datetime.now(UTC)
    for n in hsapi.nodes(srv):
        for field in ("createdAt", "lastSeen"):
            seen = _rfc3339(n[field])
            assert abs(seen - now) < timedelta(minutes=5), (n["name"], field, n[field], now)

    # Issue 2006: down then up again before the timeout, the nodes stay and mesh again.
    url = srv.url
    for name in names:
        assert world.nodes[name].down().returncode == 0
    wait_for("the server to see every node offline",
             lambda: not any(n.get("online") for n in hsapi.nodes(srv)), 30)
    for name in names:
        r = world.nodes[name].cli("up", f"--login-server={url}", f"--hostname={name}",
                                  "--accept-dns=false")
        assert r.returncode == 0, r.stderr
    assert sorted(n["name"] for n in hsapi.nodes(srv)) == sorted(names)
    wait_mesh([world.nodes[n] for n in names])

    # user2's nodes log out (deleted at once); user1's go down (deleted after the timeout,
    # neither at once nor hours late).
    downed, out = names[:len(PINNED)], names[len(PINNED):]
    for name in downed:
        assert world.nodes[name].down().returncode == 0
    stopped = time.monotonic()
    for name in out:
        r = world.nodes[name].logout()
        assert r.returncode == 0, r.stderr
    wait_for("the logged-out ephemeral nodes to be deleted", lambda: sorted(
        n["name"] for n in hsapi.nodes(srv)) == sorted(downed), 20)
    time.sleep(max(0.0, TIMEOUT - 25 - (time.monotonic() - stopped)))
    assert sorted(n["name"] for n in hsapi.nodes(srv)) == sorted(downed), \
        "deleted long before the inactivity timeout"
    wait_for("the inactive ephemeral nodes to be deleted", lambda: hsapi.nodes(srv) == [],
             TIMEOUT + 25 - (time.monotonic() - stopped))
    assert time.monotonic() - stopped >= TIMEOUT - 1
