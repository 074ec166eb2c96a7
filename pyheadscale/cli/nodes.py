"""`headscale nodes` (alias node)."""

from __future__ import annotations

import base64
import sys
from datetime import UTC, datetime
from typing import Any

import click

from pyheadscale.cli.client import seg
from pyheadscale.cli.common import (
    CLIError,
    call,
    command,
    confirm,
    emit,
    emit_list,
    group,
    parse_uint,
    require,
    slice_flag,
)
from pyheadscale.cli.output import fmt_time, green, parse_time, red, render_table

ID_FLAG = "-i, --identifier"


def short_key(text: str) -> str:
    """Tailscale's key ShortString: "[" + first 5 base64 chars + "]"."""
    _, _, hexpart = text.partition(":")
    try:
        raw = bytes.fromhex(hexpart)
    except ValueError:
        return ""
    return "[" + base64.b64encode(raw).decode()[:5] + "]"


def nodes_table(nodes: list[dict[str, Any]]) -> str:
    rows = [["ID", "Hostname", "Name", "MachineKey", "NodeKey", "User", "Tags",
             "IP addresses", "Ephemeral", "Last seen", "Expiration", "Connected", "Expired"]]
    now = datetime.now(UTC)
    for n in nodes:
        pak = n.get("preAuthKey") or {}
        exp = parse_time(n.get("expiry"))
        rows.append([
            n["id"], n["name"], n["givenName"], short_key(n["machineKey"]),
            short_key(n["nodeKey"]), (n.get("user") or {}).get("name", ""),
            "\n".join(n.get("tags") or []), "\n".join(n.get("ipAddresses") or []),
            "true" if pak.get("ephemeral") else "false", fmt_time(n.get("lastSeen")),
            fmt_time(n.get("expiry")) if n.get("expiry") else "N/A",
            green("online") if n.get("online") else red("offline"),
            red("yes") if exp is not None and exp < now else green("no"),
        ])
    return render_table(rows)


def routes_table(nodes: list[dict[str, Any]]) -> str:
    rows = [["ID", "Hostname", "Approved", "Available", "Serving (Primary)"]]
    for n in nodes:
        rows.append([n["id"], n["givenName"], "\n".join(n["approvedRoutes"]),
                     "\n".join(n["availableRoutes"]), "\n".join(n["subnetRoutes"])])
    return render_table(rows)


def parse_rfc3339(text: str) -> datetime:
    from pyheadscale.api.shapes import parse_ts

    try:
        return parse_ts(text)
    except ValueError:
        raise CLIError(f'parsing expiry time: parsing time "{text}" as '
                       '"2006-01-02T15:04:05Z07:00": cannot parse') from None


def id_flag(f: Any) -> Any:
    return click.option("-i", "--identifier", default=None, help="Node identifier (ID)")(f)


def register(root: click.Group) -> None:
    nodes = group(root, "nodes", "Manage the nodes of Headscale", aliases=["node"])

    @command(nodes, "list", "List nodes", aliases=["ls", "show"])
    @click.option("-u", "--user", default="", help="Filter by user")
    def list_(ctx: click.Context, user: str) -> None:
        found = call(ctx, "listing nodes", "GET", "/api/v1/node", query={"user": user})["nodes"]
        emit_list(ctx, found, lambda: nodes_table(found))

    @command(nodes, "list-routes", "List routes available on nodes", aliases=["lsr", "routes"])
    @id_flag
    def list_routes(ctx: click.Context, identifier: str | None) -> None:
        node_id = parse_uint(identifier, ID_FLAG)
        found = call(ctx, "listing nodes", "GET", "/api/v1/node")["nodes"]
        if node_id:
            found = [n for n in found if n["id"] == str(node_id)] or found
        found = [n for n in found
                 if n["subnetRoutes"] or n["approvedRoutes"] or n["availableRoutes"]]
        emit_list(ctx, found, lambda: routes_table(found))

    @command(nodes, "register", "Registers a node to your network (deprecated)")
    @click.option("-u", "--user", default=None, help="User")
    @click.option("-k", "--key", default=None, help="Key")
    def register_(ctx: click.Context, user: str | None, key: str | None) -> None:
        print('Command "register" is deprecated, use \'headscale auth register --auth-id '
              "<id> --user <user>' instead", file=sys.stderr)
        require(user=user, key=key)
        resp = call(ctx, "registering node", "POST", "/api/v1/node/register",
                    query={"user": user, "key": key})
        emit(ctx, resp["node"], f"Node {resp['node']['givenName']} registered")

    @command(nodes, "expire", "Expire (log out) a node in your network",
             aliases=["logout", "exp", "e"])
    @id_flag
    @click.option("-e", "--expiry", default="", help="Set expire to (RFC3339 format, e.g. "
                  "2025-08-27T10:00:00Z), or leave empty to expire immediately.")
    @click.option("-d", "--disable", is_flag=True, default=False,
                  help="Disable key expiry (node will never expire)")
    def expire(ctx: click.Context, identifier: str | None, expiry: str, disable: bool) -> None:
        require(identifier=identifier)
        node_id = parse_uint(identifier, ID_FLAG)
        path = f"/api/v1/node/{node_id}/expire"
        if disable:
            resp = call(ctx, "disabling node expiry", "POST", path, {"disableExpiry": True})
            emit(ctx, resp["node"], "Node expiry disabled")
            return
        now = datetime.now(UTC)
        when = parse_rfc3339(expiry) if expiry else now
        resp = call(ctx, "expiring node", "POST", path,
                    {"expiry": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")})
        emit(ctx, resp["node"], "Node expired" if when <= now else "Node expiration updated")

    @command(nodes, "rename", "Renames a node in your network")
    @click.argument("new_name", required=False, default="")
    @id_flag
    def rename(ctx: click.Context, new_name: str, identifier: str | None) -> None:
        require(identifier=identifier)
        node_id = parse_uint(identifier, ID_FLAG)
        resp = call(ctx, "renaming node", "POST",
                    f"/api/v1/node/{node_id}/rename/{seg(new_name)}")
        emit(ctx, resp["node"], "Node renamed")

    @command(nodes, "delete", "Delete a node", aliases=["del"])
    @id_flag
    def delete(ctx: click.Context, identifier: str | None) -> None:
        require(identifier=identifier)
        node_id = parse_uint(identifier, ID_FLAG)
        node = call(ctx, "getting node", "GET", f"/api/v1/node/{node_id}")["node"]
        if not confirm(ctx, f"Do you want to remove the node {node['name']}?"):
            emit(ctx, {"Result": "Node not deleted"}, "Node not deleted")
            return
        call(ctx, "deleting node", "DELETE", f"/api/v1/node/{node_id}")
        emit(ctx, {"Result": "Node deleted"}, "Node deleted")

    @command(nodes, "tag", "Manage the tags of a node", aliases=["tags", "t"])
    @id_flag
    @click.option("-t", "--tags", multiple=True, help="List of tags to add to the node")
    def tag(ctx: click.Context, identifier: str | None, tags: tuple[str, ...]) -> None:
        require(identifier=identifier)
        node_id = parse_uint(identifier, ID_FLAG)
        resp = call(ctx, "setting tags", "POST", f"/api/v1/node/{node_id}/tags",
                    {"tags": slice_flag(tags)})
        emit(ctx, resp["node"], "Node updated")

    @command(nodes, "approve-routes", "Manage the approved routes of a node")
    @id_flag
    @click.option("-r", "--routes", multiple=True,
                  help='List of routes that will be approved (comma-separated, e.g. '
                  '"10.0.0.0/8,192.168.0.0/24" or empty string to remove all approved routes)')
    def approve_routes(ctx: click.Context, identifier: str | None,
                       routes: tuple[str, ...]) -> None:
        require(identifier=identifier)
        node_id = parse_uint(identifier, ID_FLAG)
        resp = call(ctx, "setting approved routes", "POST",
                    f"/api/v1/node/{node_id}/approve_routes", {"routes": slice_flag(routes)})
        emit(ctx, resp["node"], "Node updated")

    @command(nodes, "backfillips", "Backfill IPs missing from nodes")
    def backfillips(ctx: click.Context) -> None:
        if not confirm(ctx, "Are you sure that you want to assign/remove IPs to/from nodes?"):
            return
        resp = call(ctx, "backfilling IPs", "POST", "/api/v1/node/backfillips",
                    query={"confirmed": "true"})
        emit(ctx, resp, "Node IPs backfilled successfully")
