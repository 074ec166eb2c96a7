"""`headscale users` (alias user)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import click

from pyheadscale.cli.client import seg
from pyheadscale.cli.common import CLIError, call, command, confirm, emit, emit_list, group
from pyheadscale.cli.output import fmt_time, render_table

ERR_FLAG_REQUIRED = "--name or --identifier flag is required"
ERR_MULTIPLE = "multiple users match query, specify an ID"


def register(root: click.Group) -> None:
    users = group(root, "users", "Manage the users of Headscale", aliases=["user"])

    @command(users, "create", "Creates a new user", aliases=["c", "new"])
    @click.argument("name", required=False)
    @click.option("-d", "--display-name", default="", help="Display name")
    @click.option("-e", "--email", default="", help="Email")
    @click.option("-p", "--picture-url", default="", help="Profile picture URL")
    def create(ctx: click.Context, name: str | None, display_name: str, email: str,
               picture_url: str) -> None:
        if not name:
            raise CLIError("missing parameters")
        body = {"name": name}
        if display_name:
            body["displayName"] = display_name
        if email:
            body["email"] = email
        if picture_url:
            try:
                urlsplit(picture_url)
            except ValueError as e:
                raise CLIError(f"invalid picture URL: {e}") from None
            body["pictureUrl"] = picture_url
        resp = call(ctx, "creating user", "POST", "/api/v1/user", body)
        emit(ctx, resp["user"], "User created")

    def id_name_flags(f: Callable[..., Any]) -> Callable[..., Any]:
        f = click.option("-i", "--identifier", type=int, default=-1,
                         help="User identifier (ID)")(f)
        return click.option("-n", "--name", default="", help="Username")(f)

    def find_one(ctx: click.Context, identifier: int, name: str) -> dict[str, Any]:
        if not name and identifier < 0:
            raise CLIError(ERR_FLAG_REQUIRED)
        q = {"name": name, "id": str(identifier) if identifier > 0 else ""}
        found = call(ctx, "listing users", "GET", "/api/v1/user", query=q)["users"]
        if len(found) != 1:
            raise CLIError(ERR_MULTIPLE)
        return found[0]  # type: ignore[no-any-return]

    @command(users, "list", "List all the users", aliases=["ls", "show"])
    @id_name_flags
    @click.option("-e", "--email", default="", help="Email")
    def list_(ctx: click.Context, identifier: int, name: str, email: str) -> None:
        q = {}
        if identifier > 0:
            q["id"] = str(identifier)
        elif name:
            q["name"] = name
        elif email:
            q["email"] = email
        found = call(ctx, "listing users", "GET", "/api/v1/user", query=q)["users"]

        def table() -> str:
            rows = [["ID", "Name", "Username", "Email", "Created"]]
            for u in found:
                rows.append([u["id"], u["displayName"], u["name"], u["email"],
                             fmt_time(u["createdAt"])])
            return render_table(rows)

        emit_list(ctx, found, table)

    @command(users, "destroy", "Destroys a user", aliases=["delete"])
    @id_name_flags
    def destroy(ctx: click.Context, identifier: int, name: str) -> None:
        u = find_one(ctx, identifier, name)
        prompt = (f'Do you want to remove the user "{u["name"]}" ({u["id"]}) and any '
                  "associated preauthkeys?")
        if not confirm(ctx, prompt):
            emit(ctx, {"Result": "User not destroyed"}, "User not destroyed")
            return
        resp = call(ctx, "destroying user", "DELETE", f"/api/v1/user/{seg(u['id'])}")
        emit(ctx, resp, "User destroyed")

    @command(users, "rename", "Renames a user", aliases=["mv"])
    @id_name_flags
    @click.option("-r", "--new-name", default=None, help="New username")
    def rename(ctx: click.Context, identifier: int, name: str, new_name: str | None) -> None:
        from pyheadscale.cli.common import require

        require(new_name=new_name)
        u = find_one(ctx, identifier, name)
        resp = call(ctx, "renaming user", "POST",
                    f"/api/v1/user/{seg(u['id'])}/rename/{seg(new_name or '')}")
        emit(ctx, resp["user"], "User renamed")
