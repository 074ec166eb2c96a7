"""The admin surface judged by official clients: web login completed by
`headscale auth register`, rename, delete, expire and `expire --disable`."""

from __future__ import annotations

import re
import subprocess
import time
from typing import Any

import pytest

from tests.integration.tailscale import Tailscaled
from tests.integration.versions import PINNED
from tests.integration.world import BASE_DOMAIN, World, dns, peers_by_name, wait_for

pytestmark = pytest.mark.integration


def node_id(world: World, name: str) -> str:
    assert world.server is not None
    for n in world.server.cli_json("nodes", "list"):
        if n["givenName"] == name or n["name"] == name:
            return str(n["id"])
    raise AssertionError(f"no node {name} in nodes list")


def test_web_login_rename_delete(world: World) -> None:
    srv = world.start_server()
    a = world.join("alpha", PINNED[0])

    # `tailscale up` without a key prints our register URL and waits.
    b = world.add_client("bravo", PINNED[-1])
    up = b.host.popen([str(b.tailscale), f"--socket={b.socket}", "up", f"--login-server={srv.url}",
                       "--hostname=bravo", "--accept-dns=false", "--timeout=90s"],
                      env=b.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url_re = re.compile(re.escape(srv.url) + r"/register/(hskey-authreq-[0-9a-f]+)")
    out, auth_id = "", None
    deadline = time.monotonic() + 30
    while auth_id is None and time.monotonic() < deadline:
        line = up.stdout.readline()  # type: ignore[union-attr]
        out += line
        if m := url_re.search(line):
            auth_id = m.group(1)
    assert auth_id, f"no register URL printed: {out}"
    page = srv.http_get(f"/register/{auth_id}")
    assert page[0] == 200 and f"headscale auth register --auth-id {auth_id}".encode() in page[1]

    r = srv.cli("auth", "register", "--auth-id", auth_id, "--user", "alice")
    assert r.returncode == 0, r.stderr
    assert up.wait(timeout=60) == 0, out + (up.stdout.read() if up.stdout else "")  # type: ignore[union-attr]
    b.wait_state("Running", timeout=30)

    nodes = {n["givenName"]: n for n in srv.cli_json("nodes", "list")}
    assert nodes["bravo"]["online"] is True
    assert sorted(nodes["bravo"]["ipAddresses"]) == sorted(b.ip())
    wait_for("alpha to see bravo", lambda: "bravo" in peers_by_name(a.status_json()), 10)

    # Rename: peers resolve the new MagicDNS name.
    r = srv.cli("nodes", "rename", "-i", node_id(world, "bravo"), "bravo-renamed")
    assert r.returncode == 0, r.stderr
    b_v4 = [ip for ip in b.ip() if ":" not in ip]
    wait_for("the new name to resolve on alpha",
             lambda: dns(a.host, f"bravo-renamed.{BASE_DOMAIN}") == b_v4, timeout=10)

    # Delete: gone from every peer's status.
    r = srv.cli("nodes", "delete", "-i", node_id(world, "bravo-renamed"), "--force")
    assert r.returncode == 0, r.stderr
    wait_for("alpha to drop the deleted node",
             lambda: not any(p["TailscaleIPs"] == b.ip()
                             for p in (a.status_json().get("Peer") or {}).values()), 10)


def _bravo(a: Tailscaled) -> dict[str, Any] | None:
    return peers_by_name(a.status_json()).get("bravo")


def test_expire_and_disable(world: World) -> None:
    """Expiry reaches the peers and is taken back: alpha's status lists bravo with
    Expired=true (the client omits the field while it is false, so each wait looks at the
    peer entry itself), then without it again, and traffic follows the flag."""
    srv = world.start_server()
    a = world.join("alpha", PINNED[0])
    b = world.join("bravo", PINNED[1])
    bravo = wait_for("alpha to see bravo", lambda: _bravo(a), 10)
    assert bravo.get("Expired") is not True and not bravo.get("KeyExpiry"), bravo
    b_ip = b.ip("4")[0]
    r = a.ping(b_ip, count=5, until_direct=False)
    assert r.returncode == 0, r.stdout + r.stderr  # the peer works before it expires
    bid = node_id(world, "bravo")

    r = srv.cli("nodes", "expire", "-i", bid)
    assert r.returncode == 0, r.stderr
    wait_for("bravo to report its expiry",
             lambda: b.status_json()["BackendState"] == "NeedsLogin", timeout=10)
    expired = wait_for("alpha to list bravo as expired",
                       lambda: (p := _bravo(a)) is not None and p.get("Expired") is True and p,
                       timeout=10)
    assert expired.get("KeyExpiry"), expired  # the expiry time came with it
    r = a.ping(b_ip, count=2, timeout=2, until_direct=False)
    assert r.returncode != 0, "alpha still reached the expired bravo: " + r.stdout

    r = srv.cli("nodes", "expire", "-i", bid, "--disable")
    assert r.returncode == 0, r.stderr
    wait_for("bravo to run again", lambda: b.status_json()["BackendState"] == "Running", 30)
    wait_for("alpha to list bravo as usable again",
             lambda: (p := _bravo(a)) is not None and p.get("Expired") is not True
             and not p.get("KeyExpiry"), timeout=15)
    r = a.ping(b_ip, count=10, until_direct=False)
    assert r.returncode == 0, r.stdout + r.stderr
