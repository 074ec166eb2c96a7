"""`headscale apikeys` (aliases apikey, api)."""

from __future__ import annotations

import click

from pyheadscale.cli.client import seg
from pyheadscale.cli.common import CLIError, call, command, emit, emit_list, group, parse_uint
from pyheadscale.cli.output import colour_time, fmt_time, render_table
from pyheadscale.cli.preauthkeys import expiration_from_flag

DEFAULT_EXPIRY = "90d"


def id_or_prefix(key_id: str | None, prefix: str) -> tuple[int, str]:
    kid = parse_uint(key_id, "-i, --id")
    if kid == 0 and not prefix:
        raise CLIError("either --id or --prefix must be provided: missing parameters")
    if kid != 0 and prefix:
        raise CLIError("only one of --id or --prefix can be provided: missing parameters")
    return kid, prefix


def register(root: click.Group) -> None:
    keys = group(root, "apikeys", "Handle the Api keys in Headscale", aliases=["apikey", "api"])

    @command(keys, "list", "List the Api keys for headscale", aliases=["ls", "show"])
    def list_(ctx: click.Context) -> None:
        found = call(ctx, "listing api keys", "GET", "/api/v1/apikey")["apiKeys"]

        def table() -> str:
            rows = [["ID", "Prefix", "Expiration", "Created"]]
            for k in found:
                rows.append([k["id"], k["prefix"], colour_time(k["expiration"]) or "-",
                             fmt_time(k["createdAt"])])
            return render_table(rows)

        emit_list(ctx, found, table)

    @command(keys, "create", "Creates a new Api key", aliases=["c", "new"])
    @click.option("-e", "--expiration", default=DEFAULT_EXPIRY,
                  help="Human-readable expiration of the key (e.g. 30m, 24h)")
    @click.option("-u", "--user", "user_id", default=None,
                  help="User ID the key acts for: /api/v2 creates untagged auth keys for it")
    def create(ctx: click.Context, expiration: str, user_id: str | None) -> None:
        body: dict[str, str] = {"expiration": expiration_from_flag(expiration)}
        if user_id:
            body["user"] = str(parse_uint(user_id, "-u, --user"))
        resp = call(ctx, "creating api key", "POST", "/api/v1/apikey", body)
        emit(ctx, resp["apiKey"], resp["apiKey"])

    @command(keys, "expire", "Expire an ApiKey", aliases=["revoke", "exp", "e"])
    @click.option("-p", "--prefix", default="", help="ApiKey prefix")
    @click.option("-i", "--id", "key_id", default=None, help="ApiKey ID")
    def expire(ctx: click.Context, prefix: str, key_id: str | None) -> None:
        kid, prefix = id_or_prefix(key_id, prefix)
        body = {"id": str(kid)} if kid else {"prefix": prefix}
        resp = call(ctx, "expiring api key", "POST", "/api/v1/apikey/expire", body)
        emit(ctx, resp, "Key expired")

    @command(keys, "delete", "Delete an ApiKey", aliases=["remove", "del"])
    @click.option("-p", "--prefix", default="", help="ApiKey prefix")
    @click.option("-i", "--id", "key_id", default=None, help="ApiKey ID")
    def delete(ctx: click.Context, prefix: str, key_id: str | None) -> None:
        kid, prefix = id_or_prefix(key_id, prefix)
        if kid:
            # The API deletes by prefix in the path: resolve the id through the list.
            found = call(ctx, "listing api keys", "GET", "/api/v1/apikey")["apiKeys"]
            match = [k for k in found if k["id"] == str(kid)]
            if not match:
                raise CLIError(f"deleting api key: API key with id {kid} not found")
            prefix = match[0]["prefix"]
        resp = call(ctx, "deleting api key", "DELETE", f"/api/v1/apikey/{seg(prefix)}")
        emit(ctx, resp, "Key deleted")
