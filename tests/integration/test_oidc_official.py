"""OIDC login with official Tailscale clients.

Everything runs inside the test's namespaces: the OpenID provider (oidc-provider under node,
see idp.py) listens on the server host's address next to pyheadscale, and the "browser" is a
scripted aiohttp session run in the server host's namespace (idp.browser_login). An official
client's `tailscale up` without a key prints our register URL and waits; the browser signs in
at the provider and posts the confirmation form; the waiting client then reaches Running.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest

from tests.integration.idp import Account, IdPUnavailable, OpenIDProvider, browser_login
from tests.integration.netns import SERVER_IP, Host
from tests.integration.server import PyHeadscale
from tests.integration.tailscale import Tailscaled
from tests.integration.versions import MIDDLE, NEWEST, OLDEST
from tests.integration.world import Reach, World, peers_by_name, probe, serve_echo, wait_for

pytestmark = pytest.mark.integration

IDP_PORT = 5556  # inside the server host's namespace, so any port is free
CLIENT_ID = "pyheadscale"
CLIENT_SECRET = "official-clients-secret"
SVC_PORT = 8080

ALICE = Account("alice-sub", "alice-pw", email="alice@example.com", name="Alice Liddell",
                preferred_username="alice", groups=["eng", "ops"])
BOB = Account("bob-sub", "bob-pw", email="bob@other.org", name="Bob Builder",
              preferred_username="bob", groups=["sales"])

@pytest.fixture
def idp(world: World) -> Iterator[OpenIDProvider]:
    """The provider on SERVER_IP:IDP_PORT inside the server host's namespace."""
    try:
        provider = OpenIDProvider(
            world.workdir / "idp", [ALICE, BOB], client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET, redirect_uris=[f"https://{SERVER_IP}/oidc/callback"],
            port=IDP_PORT, listen_host=SERVER_IP,
        ).start(popen=world.server_host.popen)
    except IdPUnavailable as e:
        pytest.fail(f"OpenID provider unavailable: {e}", pytrace=False)
    yield provider
    provider.stop()


def oidc_overrides(world: World, idp: OpenIDProvider, **extra: Any) -> dict[str, Any]:
    secret = world.workdir / "client_secret"
    secret.write_text(CLIENT_SECRET + "\n")
    return {"oidc": {"issuer": idp.issuer, "client_id": CLIENT_ID,
                     "client_secret_path": str(secret),
                     "scope": ["openid", "profile", "email", "groups"], **extra}}


def up_args(srv: PyHeadscale, hostname: str) -> list[str]:
    return ["up", f"--login-server={srv.url}", f"--hostname={hostname}", "--accept-dns=false",
            "--timeout=90s"]


def web_login(srv: PyHeadscale, ts: Tailscaled, account: Account, hostname: str,
              *extra: str, expect: str = "Node registered") -> None:
    """`tailscale up [extra]` without a key; the browser signs `account` in and confirms."""
    up = ts.host.popen([str(ts.tailscale), f"--socket={ts.socket}", *up_args(srv, hostname),
                        *extra], env=ts.env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def read() -> None:  # a thread, so the wait for the URL is bounded even if nothing prints
        assert up.stdout is not None
        for line in up.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        url_re = re.compile(re.escape(srv.url) + r"/register/hskey-authreq-[0-9a-f]+")
        found = wait_for(f"{hostname}'s `tailscale up` to print the register URL",
                         lambda: url_re.search("".join(lines)), timeout=30)
        res = browser_login(srv.host, found.group(0), account, ca_file=srv.ca_file)
        assert res.login_status == 200, res.login_page
        assert res.login_url.startswith(f"{srv.url}/oidc/callback?")
        assert "Confirm node registration" in res.login_page and hostname in res.login_page
        assert account.name in res.login_page
        assert res.confirm_status == 200 and expect in res.confirm_page, res.confirm_page
        rc = up.wait(timeout=60)
        reader.join(5)
        assert rc == 0, "".join(lines)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
    ts.wait_state("Running", timeout=30)


def display_names(st: dict[str, Any]) -> dict[str, str]:
    """Hostname (self and peers) -> the DisplayName of its user, as the client shows it."""
    users = st.get("User") or {}
    nodes = [st["Self"], *(st.get("Peer") or {}).values()]
    return {n["HostName"]: users[str(n["UserID"])]["DisplayName"] for n in nodes}


def test_official_clients_log_in_with_oidc_and_reach_each_other(world: World,
                                                                 idp: OpenIDProvider) -> None:
    srv = world.start_server(oidc_overrides(world, idp), users=[])
    a = world.add_client("alice-pc", OLDEST)
    b = world.add_client("bob-pc", NEWEST)
    web_login(srv, a, ALICE, "alice-pc")
    web_login(srv, b, BOB, "bob-pc")

    # The users are the provider's: e-mail, display name and identity from its claims.
    users = {u["email"]: u for u in srv.cli_json("users", "list")}
    assert set(users) == {ALICE.email, BOB.email}
    for acc in (ALICE, BOB):
        u = users[acc.email]
        assert (u["name"], u["displayName"], u["provider"]) == (
            acc.preferred_username, acc.name, "oidc")
        assert u["providerId"] == f"{idp.issuer}/{acc.sub}"
    owners = {n["givenName"]: n["user"]["email"] for n in srv.cli_json("nodes", "list")}
    assert owners == {"alice-pc": ALICE.email, "bob-pc": BOB.email}

    # Each client shows both users by the provider's display name.
    expected = {"alice-pc": ALICE.name, "bob-pc": BOB.name}
    for ts in (a, b):
        wait_for(f"{ts.host.name} to show both users",
                 partial(lambda t: display_names(t.status_json()) == expected, ts), timeout=15)

    # No policy: allow all. The two users' nodes talk both ways: disco pings, then ICMP
    # through WireGuard and the receiver's packet filter.
    a_ip, b_ip = a.ip("4")[0], b.ip("4")[0]
    for src, dst in ((a, b_ip), (b, a_ip)):
        for kind in ((), ("--icmp",)):
            r = src.ping(dst, count=5, timeout=3, extra_args=kind)
            assert r.returncode == 0 and "pong from" in r.stdout, r.stdout + r.stderr


def fetch(host: Host, ip: str, timeout: float = 2) -> str | None:
    return probe(host, ip, SVC_PORT, timeout).answer


def blocked(host: Host, ip: str, timeout: float = 2) -> bool:
    """The policy stopped the request: dropped, or no peer to send it to. A refusal (the
    service gone) is not a policy decision and does not count."""
    return probe(host, ip, SVC_PORT, timeout).reach in (Reach.DROPPED, Reach.UNREACHABLE)


def test_idp_groups_in_policy_decide_reachability_and_follow_the_provider_live(
        world: World, idp: OpenIDProvider) -> None:
    """`group:idp-ops` (the provider's "ops" group) may reach a tagged service; moving users
    between groups at the provider and logging in again flips who reaches it, live."""
    over = oidc_overrides(world, idp, policy_groups={"enabled": True, "prefix": "idp-"})
    over["policy"] = {"mode": "database", "path": ""}
    srv = world.start_server(over, users=[], keys={"svc": {"tags": ["tag:svc"]}})
    policy = world.workdir / "policy.json"
    policy.write_text(json.dumps({
        "tagOwners": {"tag:svc": ["group:idp-ops"]},
        "acls": [{"action": "accept", "src": ["group:idp-ops"], "dst": [f"tag:svc:{SVC_PORT}"]}],
    }))
    r = srv.cli("policy", "set", "-f", str(policy))
    assert r.returncode == 0, r.stdout + r.stderr

    svc = world.join("svc", NEWEST, key="svc")
    svc_ip = svc.ip("4")[0]
    serving = serve_echo(svc.host, svc_ip, [SVC_PORT], "svc")
    wait_for("the service to listen", lambda: fetch(svc.host, svc_ip, timeout=1), timeout=10)

    a = world.add_client("alice-pc", OLDEST)
    b = world.add_client("bob-pc", MIDDLE)
    web_login(srv, a, ALICE, "alice-pc")  # groups eng, ops
    web_login(srv, b, BOB, "bob-pc")  # group sales
    a_ip, b_ip = a.ip("4")[0], b.ip("4")[0]

    assert wait_for("alice (ops) to reach the service",
                    lambda: fetch(a.host, svc_ip), timeout=20) == f"svc {a_ip}"
    assert blocked(b.host, svc_ip, timeout=3), probe(b.host, svc_ip, SVC_PORT)
    assert "svc" not in peers_by_name(b.status_json())

    # Nothing restarts from here on: same server, provider, daemons and service processes.
    procs = [srv.proc, idp.proc, a.proc, b.proc, svc.proc, serving]

    # At the provider alice leaves "ops" and bob joins it (as "Ops": names are normalised).
    idp.set_account(Account(**{**ALICE.__dict__, "groups": ["eng"]}))
    idp.set_account(Account(**{**BOB.__dict__, "groups": ["sales", "Ops"]}))
    for ts, acc, name in ((a, ALICE, "alice-pc"), (b, BOB, "bob-pc")):
        web_login(srv, ts, acc, name, "--force-reauth", expect="Node reauthenticated")

    assert wait_for("bob (now ops) to reach the service",
                    lambda: fetch(b.host, svc_ip), timeout=20) == f"svc {b_ip}"
    wait_for("alice (no longer ops) to be shut out", lambda: blocked(a.host, svc_ip), timeout=20)
    assert blocked(a.host, svc_ip, timeout=3), probe(a.host, svc_ip, SVC_PORT)
    # Re-authentication kept each node (same addresses), only its user's groups changed.
    assert (a.ip("4")[0], b.ip("4")[0]) == (a_ip, b_ip)
    assert len(srv.cli_json("nodes", "list")) == 3
    assert all(p is not None and p.poll() is None for p in procs), "something restarted"


def test_oidc_relogin_same_user_routes_preserved(world: World, idp: OpenIDProvider) -> None:
    """Headscale's TestOIDCReloginSameUserRoutesPreserved: a node logged in through OIDC
    advertises a route the policy auto-approves for its user; it logs out and logs in
    again through OIDC as the same user: the same node, its route still available,
    approved and served."""
    route = "203.0.113.64/26"
    over = oidc_overrides(world, idp)
    srv = world.start_server(over, users=[], policy={
        "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
        "autoApprovers": {"routes": {route: [ALICE.email]}},
    })
    ts = world.add_client("router", NEWEST)
    web_login(srv, ts, ALICE, "router", f"--advertise-routes={route}")

    def served() -> dict[str, Any] | None:
        nodes = srv.cli_json("nodes", "list")
        ok = len(nodes) == 1 and nodes[0]["availableRoutes"] == nodes[0]["approvedRoutes"] \
            == nodes[0]["subnetRoutes"] == [route]
        return nodes[0] if ok else None

    first = wait_for("the route to be approved and served", served, timeout=30)
    assert first["user"]["email"] == ALICE.email
    r = ts.logout()
    assert r.returncode == 0, r.stdout + r.stderr
    ts.wait_state("NeedsLogin", timeout=30)
    assert len(srv.cli_json("nodes", "list")) == 1, "logging out must not delete the node"
    web_login(srv, ts, ALICE, "router", "--reset", f"--advertise-routes={route}",
              expect="Node reauthenticated")
    again = wait_for("the route to be served again after the relogin", served, timeout=60)
    assert again["id"] == first["id"]
