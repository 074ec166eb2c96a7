"""Admin actions on a running pyheadscale through its `headscale` CLI (`-o json`), as an
operator would do them: list nodes, approve routes, expire or un-expire a node."""

from __future__ import annotations

from typing import Any

from tests.integration.server import PyHeadscale


def nodes(server: PyHeadscale) -> list[dict[str, Any]]:
    return list(server.cli_json("nodes", "list") or [])


def node_by_name(server: PyHeadscale, hostname: str) -> dict[str, Any] | None:
    for n in nodes(server):
        if n["name"] == hostname or n["givenName"] == hostname:
            return n
    return None


def node_id(server: PyHeadscale, hostname: str) -> str:
    n = node_by_name(server, hostname)
    if n is None:
        raise AssertionError(f"no node named {hostname!r} on the server")
    return str(n["id"])


def approve_routes(server: PyHeadscale, hostname: str, routes: list[str]) -> dict[str, Any]:
    """`headscale nodes approve-routes -i ID -r a,b` (empty list clears)."""
    return dict(server.cli_json("nodes", "approve-routes", "-i", node_id(server, hostname),
                                "-r", ",".join(routes)))


def expire(server: PyHeadscale, hostname: str, *, expiry: str | None = None,
           disable: bool = False) -> dict[str, Any]:
    """`headscale nodes expire -i ID [--expiry RFC3339 | --disable]` (default: now)."""
    args = ["nodes", "expire", "-i", node_id(server, hostname)]
    if disable:
        args.append("--disable")
    elif expiry is not None:
        args += ["--expiry", expiry]
    return dict(server.cli_json(*args))
