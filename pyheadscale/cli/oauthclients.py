"""`headscale oauth-clients` (aliases oauth-client, oauthclients, oauthclient, oauth).

OAuth clients live on the v2 keys resource (`keyType: "client"`), as in Headscale 0.30, so the
CLI talks to /api/v2 (over the unix socket with local trust, or remotely with the API key).
"""

from __future__ import annotations

import click

from pyheadscale.cli.client import seg
from pyheadscale.cli.common import CLIError, call, command, emit, emit_list, group
from pyheadscale.cli.output import fmt_time, render_table

KEYS = "/api/v2/tailnet/-/keys"
SCOPE_HELP = ("Scope the client's tokens are granted (repeatable): auth_keys, oauth_keys, "
              "devices:core, devices:routes, policy_file, feature_settings, users (each with a "
              ":read variant), or all/all:read")


def register(root: click.Group) -> None:
    clients = group(root, "oauth-clients", "Manage OAuth clients",
                    aliases=["oauth-client", "oauthclients", "oauthclient", "oauth"])

    @command(clients, "create", "Create an OAuth client (its secret is shown once)",
             aliases=["c", "new"])
    @click.option("-s", "--scope", "scopes", multiple=True, help=SCOPE_HELP)
    @click.option("-t", "--tag", "tags", multiple=True,
                  help="Tag the client's tokens may assign (repeatable), e.g. tag:k8s-operator")
    @click.option("-d", "--description", default="", help="Human-readable description")
    def create(ctx: click.Context, scopes: tuple[str, ...], tags: tuple[str, ...],
               description: str) -> None:
        if not scopes:
            raise CLIError("at least one --scope is required: missing parameters")
        key = call(ctx, "creating oauth client", "POST", KEYS, {
            "keyType": "client", "scopes": list(scopes), "tags": list(tags),
            "description": description}, v2=True)
        emit(ctx, key, f"OAuth client {key['id']} created.\n"
                       f"Secret (shown once, store it now): {key.get('key', '')}")

    @command(clients, "list", "List OAuth clients", aliases=["ls", "show"])
    def list_(ctx: click.Context) -> None:
        keys = call(ctx, "listing oauth clients", "GET", KEYS, v2=True)["keys"]
        found = [k for k in keys if k.get("keyType") == "client"]

        def table() -> str:
            rows = [["ID", "Scopes", "Tags", "Description", "Created"]]
            for k in found:
                rows.append([k["id"], ",".join(k.get("scopes") or ()),
                             ",".join(k.get("tags") or ()), k.get("description", ""),
                             fmt_time(k.get("created"))])
            return render_table(rows)

        emit_list(ctx, found, table)

    @command(clients, "delete", "Delete an OAuth client and its tokens",
             aliases=["remove", "del"])
    @click.option("-i", "--id", "client_id", default="", help="OAuth client id")
    def delete(ctx: click.Context, client_id: str) -> None:
        if not client_id:
            raise CLIError("--id is required: missing parameters")
        call(ctx, "deleting oauth client", "DELETE", f"{KEYS}/{seg(client_id)}", v2=True)
        emit(ctx, {"id": client_id}, f"OAuth client {client_id} deleted")
