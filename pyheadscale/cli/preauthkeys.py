"""`headscale preauthkeys` (aliases preauthkey, authkey, pre)."""

from __future__ import annotations

from datetime import UTC, datetime

import click

from pyheadscale.cli.common import (
    CLIError,
    call,
    command,
    emit,
    emit_list,
    group,
    parse_uint,
    slice_flag,
)
from pyheadscale.cli.output import colour_time, fmt_time, render_table

DEFAULT_EXPIRY = "1h"


def _key_id(flag: str | None) -> str:
    """The required -i/--id of expire and delete, as the API takes it."""
    kid = parse_uint(flag, "-i, --id")
    if kid == 0:
        raise CLIError("missing --id parameter: missing parameters")
    return str(kid)


def expiration_from_flag(text: str) -> str:
    """Now + a Prometheus duration ("30m", "24h", "90d"), as RFC 3339."""
    from pyheadscale.durations import parse_prometheus_duration

    try:
        d = parse_prometheus_duration(text)
    except ValueError:
        raise CLIError(f'parsing duration: not a valid duration string: "{text}"') from None
    return rfc3339(datetime.now(UTC) + d)


def rfc3339(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def register(root: click.Group) -> None:
    keys = group(root, "preauthkeys", "Handle the preauthkeys in Headscale",
                 aliases=["preauthkey", "authkey", "pre"])

    @command(keys, "list", "List all preauthkeys", aliases=["ls", "show"])
    def list_(ctx: click.Context) -> None:
        found = call(ctx, "listing preauthkeys", "GET", "/api/v1/preauthkey")["preAuthKeys"]

        def table() -> str:
            rows = [["ID", "Key/Prefix", "Reusable", "Ephemeral", "Used", "Expiration",
                     "Created", "Owner"]]
            for k in found:
                if k["aclTags"]:
                    owner = "\n".join(k["aclTags"])
                elif k.get("user"):
                    owner = k["user"]["name"]
                else:
                    owner = "-"
                rows.append([k["id"], k["key"], str(k["reusable"]).lower(),
                             str(k["ephemeral"]).lower(), str(k["used"]).lower(),
                             colour_time(k["expiration"]) or "-", fmt_time(k["createdAt"]),
                             owner])
            return render_table(rows)

        emit_list(ctx, found, table)

    @command(keys, "create", "Creates a new preauthkey", aliases=["c", "new"])
    @click.option("-u", "--user", default=None, help="User identifier (ID)")
    @click.option("--reusable", is_flag=True, default=False, help="Make the preauthkey reusable")
    @click.option("--ephemeral", is_flag=True, default=False,
                  help="Preauthkey for ephemeral nodes")
    @click.option("-e", "--expiration", default=DEFAULT_EXPIRY,
                  help="Human-readable expiration of the key (e.g. 30m, 24h)")
    @click.option("--tags", multiple=True, help="Tags to automatically assign to node")
    def create(ctx: click.Context, user: str | None, reusable: bool, ephemeral: bool,
               expiration: str, tags: tuple[str, ...]) -> None:
        uid = parse_uint(user, "-u, --user")
        body = {"reusable": reusable, "ephemeral": ephemeral, "aclTags": slice_flag(tags),
                "expiration": expiration_from_flag(expiration)}
        if uid:
            body["user"] = str(uid)
        resp = call(ctx, "creating preauthkey", "POST", "/api/v1/preauthkey", body)
        emit(ctx, resp["preAuthKey"], resp["preAuthKey"]["key"])

    @command(keys, "expire", "Expire a preauthkey", aliases=["revoke", "exp", "e"])
    @click.option("-i", "--id", "key_id", default=None, help="Authkey ID")
    def expire(ctx: click.Context, key_id: str | None) -> None:
        resp = call(ctx, "expiring preauthkey", "POST", "/api/v1/preauthkey/expire",
                    {"id": _key_id(key_id)})
        emit(ctx, resp, "Key expired")

    @command(keys, "delete", "Delete a preauthkey", aliases=["del", "rm", "d"])
    @click.option("-i", "--id", "key_id", default=None, help="Authkey ID")
    def delete(ctx: click.Context, key_id: str | None) -> None:
        resp = call(ctx, "deleting preauthkey", "DELETE", "/api/v1/preauthkey",
                    query={"id": _key_id(key_id)})
        emit(ctx, resp, "Key deleted")

