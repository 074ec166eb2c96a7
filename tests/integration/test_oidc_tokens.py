"""Headscale's OIDC scenarios that depend on the provider's tokens or the policy at join, with
official clients and a real OpenID provider: PKCE, node expiry taken from the ID token, and a
node joining through OIDC seeing the policy's routes at once.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.integration.oidc_world import OIDCWorld
from tests.integration.test_oidc_official import (
    ALICE,
    BOB,
    oidc_overrides,
    web_login,
)
from tests.integration.versions import MIDDLE, NEWEST, OLDEST
from tests.integration.world import peers_by_name, wait_for, wait_mesh, world_fixture

pytestmark = pytest.mark.integration

TOKEN_TTL_S = 90


world = world_fixture(OIDCWorld)


def login_two(world: OIDCWorld) -> None:
    assert world.server is not None
    web_login(world.server, world.add_client("alice-pc", OLDEST), ALICE, "alice-pc")
    web_login(world.server, world.add_client("bob-pc", NEWEST), BOB, "bob-pc")


def test_oidc_authentication_with_pkce(world: OIDCWorld) -> None:
    """TestOIDCAuthenticationWithPKCE: the provider refuses authorization requests without a
    PKCE challenge; with `oidc.pkce` (S256) both users log in and their nodes reach each
    other."""
    idp = world.start_idp([ALICE, BOB], require_pkce=True)
    world.start_server(oidc_overrides(world, idp, pkce={"enabled": True, "method": "S256"}),
                       users=[])
    login_two(world)
    wait_mesh([world.nodes["alice-pc"], world.nodes["bob-pc"]])


def test_oidc_expire_nodes_based_on_token_expiry(world: OIDCWorld) -> None:
    """TestOIDCExpireNodesBasedOnTokenExpiry: with use_expiry_from_token, each node expires
    when its user's ID token does (90 s here): both reach each other first, then both
    clients drop to NeedsLogin."""
    idp = world.start_idp([ALICE, BOB], id_token_ttl=TOKEN_TTL_S)
    srv = world.start_server(oidc_overrides(world, idp, use_expiry_from_token=True), users=[])
    start = datetime.now(UTC)
    login_two(world)
    nodes = [world.nodes["alice-pc"], world.nodes["bob-pc"]]
    ttl = timedelta(seconds=TOKEN_TTL_S)
    for n in srv.cli_json("nodes", "list"):  # the token's exp, not node.expiry (none)
        at = datetime.fromisoformat(str(n["expiry"]).replace("Z", "+00:00"))
        assert start + ttl - timedelta(seconds=2) <= at <= datetime.now(UTC) + ttl, n
    wait_mesh(nodes)
    for ts in nodes:
        ts.wait_state("NeedsLogin", timeout=TOKEN_TTL_S + 60)
    assert all(n["expiry"] and datetime.fromisoformat(str(n["expiry"]).replace("Z", "+00:00"))
               <= datetime.now(UTC) for n in srv.cli_json("nodes", "list"))


GATEWAY_ROUTE, OIDC_ROUTE = "203.0.113.128/26", "203.0.113.192/26"


def test_oidc_acl_policy_on_join(world: OIDCWorld) -> None:
    """TestOIDCACLPolicyOnJoin: a key-joined gateway serves an approved route; a node that
    joins through OIDC (advertising a route of its own, auto-approved for its user) sees the
    gateway's route at once, and the gateway sees the new node's, without any restart."""
    idp = world.start_idp([ALICE, BOB])
    srv = world.start_server(
        oidc_overrides(world, idp), users=["gateway"],
        keys={"gw": {"user": "gateway", "reusable": True}},
        policy={"acls": [{"action": "accept", "src": ["100.64.0.0/10"],
                          "dst": ["100.64.0.0/10:*", f"{GATEWAY_ROUTE}:*", f"{OIDC_ROUTE}:*"]}],
                "autoApprovers": {"routes": {GATEWAY_ROUTE: ["gateway@"],
                                             OIDC_ROUTE: [ALICE.email]}}})
    gw = world.join("gateway", MIDDLE, key="gw", args=("--accept-routes",))
    r = gw.cli("set", f"--advertise-routes={GATEWAY_ROUTE}")
    assert r.returncode == 0, r.stdout + r.stderr

    def gateway_node() -> dict[str, Any] | None:
        (n,) = srv.cli_json("nodes", "list")
        return n if n["availableRoutes"] == [GATEWAY_ROUTE] else None

    gw_id = wait_for("the gateway's route to reach the server", gateway_node, 15)["id"]
    r = srv.cli("nodes", "approve-routes", "-i", str(gw_id), "-r", GATEWAY_ROUTE)
    assert r.returncode == 0, r.stdout + r.stderr

    ts = world.add_client("alice-pc", NEWEST)
    web_login(srv, ts, ALICE, "alice-pc", "--accept-routes", f"--advertise-routes={OIDC_ROUTE}")
    procs = [gw.proc, ts.proc]

    def primary(viewer: Any, peer: str) -> list[str]:
        return list(peers_by_name(viewer.status_json()).get(peer, {}).get("PrimaryRoutes")
                    or [])

    wait_for("alice-pc to see the gateway's route",
             lambda: primary(ts, "gateway") == [GATEWAY_ROUTE], 15)
    wait_for("the gateway to see alice-pc's auto-approved route",
             lambda: primary(gw, "alice-pc") == [OIDC_ROUTE], 15)
    assert all(p is not None and p.poll() is None for p in procs), "a client restarted"

