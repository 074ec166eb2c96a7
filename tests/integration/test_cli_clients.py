"""Headscale's CLI tests that run with live clients (TestNodeRouteCommands,
TestNodeBackfillIPsCommand in cli_nodes_test.go; TestPolicyBrokenConfigCommand and the
database-mode half of TestPolicyCheckCommand in cli_policy_test.go), assertion for
assertion, with official clients of the newest and oldest pinned versions on one shared
tailnet (policy in the database, none set). Beyond Headscale's CLI checks, what the clients
are told after each command is checked too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.integration.cli_server import check_policy_fixtures
from tests.integration.versions import PINNED
from tests.integration.world import World, peers_by_name, shared_world_fixture, wait_for, wait_mesh

pytestmark = pytest.mark.integration

ROUTE = "192.0.2.0/24"  # documentation range: advertised only, never carries traffic here


def _boot(w: World) -> None:
    w.start_server({"policy": {"mode": "database"}}, users=["user1", "user2"], keys={
        u: {"user": u, "reusable": True} for u in ("user1", "user2")})
    w.join("router", PINNED[-1], key="user1", args=("--accept-routes",))
    w.join("viewer", PINNED[0], key="user2", args=("--accept-routes",))
    wait_mesh([w.nodes["router"], w.nodes["viewer"]])


lab = shared_world_fixture(World, _boot)


def cli_json(w: World, *args: str) -> Any:
    assert w.server is not None
    return w.server.cli_json(*args)


def viewer_primary_routes(w: World) -> list[str]:
    peer = peers_by_name(w.nodes["viewer"].status_json()).get("router") or {}
    return sorted(peer.get("PrimaryRoutes") or [])


def test_node_route_commands(lab: World) -> None:
    r = lab.nodes["router"].cli("set", f"--advertise-routes={ROUTE}")
    assert r.returncode == 0, r.stderr

    def announced() -> list[dict[str, Any]] | None:
        nodes = cli_json(lab, "nodes", "list-routes")
        return nodes if nodes and ROUTE in nodes[0]["availableRoutes"] else None

    nodes = wait_for("list-routes to show the announced route", announced, 30)
    assert len(nodes) == 1 and nodes[0]["approvedRoutes"] == []
    node_id = nodes[0]["id"]
    assert viewer_primary_routes(lab) == [], "an unapproved route is not served"

    approved = cli_json(lab, "nodes", "approve-routes", "--identifier", node_id,
                        f"--routes={ROUTE}")
    assert ROUTE in approved["approvedRoutes"]
    one = cli_json(lab, "nodes", "list-routes", "--identifier", node_id)
    assert len(one) == 1
    assert ROUTE in one[0]["approvedRoutes"] and ROUTE in one[0]["subnetRoutes"]
    wait_for("the viewer to be told the router serves the route",
             lambda: viewer_primary_routes(lab) == [ROUTE], 30)

    cleared = cli_json(lab, "nodes", "approve-routes", "--identifier", node_id, "--routes=")
    assert cleared["approvedRoutes"] == []
    wait_for("the viewer to be told the route is gone",
             lambda: viewer_primary_routes(lab) == [], 30)
    r = lab.nodes["router"].cli("set", "--advertise-routes=")
    assert r.returncode == 0, r.stderr


def test_node_backfill_ips_command(lab: World) -> None:
    before = cli_json(lab, "nodes", "list")
    assert len(before) == 2 and all(n["ipAddresses"] for n in before)
    assert lab.server is not None
    out = lab.server.cli("nodes", "backfillips", "--force")
    assert out.returncode == 0 and "backfilled" in out.stdout, out
    after = cli_json(lab, "nodes", "list")
    assert len(after) == 2 and all(n["ipAddresses"] for n in after)
    # Nothing was missing, so nothing moved, and the clients still reach each other.
    assert {n["id"]: n["ipAddresses"] for n in after} == \
        {n["id"]: n["ipAddresses"] for n in before}
    wait_mesh([lab.nodes["router"], lab.nodes["viewer"]])


def test_policy_broken_config_command(lab: World, tmp_path: Path) -> None:
    assert lab.server is not None
    broken = tmp_path / "policy.json"
    broken.write_text(json.dumps({
        "acls": [{"action": "unknown-action", "proto": "tcp", "src": ["*"], "dst": ["*:*"]}],
        "tagOwners": {"tag:exists": ["user1@"]}}))
    r = lab.server.cli("policy", "set", "-f", str(broken))
    assert r.returncode == 1, r
    assert 'action="unknown-action" is not supported: invalid ACL action' in r.stderr
    r = lab.server.cli("policy", "get", "--output", "json")
    assert r.returncode == 1 and "acl policy not found" in r.stderr, r
    # The refused policy changed nothing the clients see: they still reach each other.
    wait_mesh([lab.nodes["router"], lab.nodes["viewer"]])


def test_policy_check_command_database_mode(lab: World, tmp_path: Path) -> None:
    """user1's and user2's nodes are the two clients; checking never sets the policy."""
    assert lab.server is not None
    check_policy_fixtures(lab.server.cli, tmp_path)
    r = lab.server.cli("policy", "get")
    assert r.returncode == 1 and "acl policy not found" in r.stderr, r
