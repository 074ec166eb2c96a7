"""`headscale auth register|approve|reject` (interactive registration)."""

from __future__ import annotations

import click

from pyheadscale.cli.common import call, command, emit, group, require


def register(root: click.Group) -> None:
    auth = group(root, "auth", "Manage node authentication and approval")

    @command(auth, "register", "Register a node to your network")
    @click.option("-u", "--user", default=None, help="User")
    @click.option("--auth-id", default=None, help="Auth ID")
    def register_(ctx: click.Context, user: str | None, auth_id: str | None) -> None:
        require(user=user, auth_id=auth_id)
        resp = call(ctx, "registering node", "POST", "/api/v1/auth/register",
                    {"user": user, "authId": auth_id})
        emit(ctx, resp["node"], f"Node {resp['node']['givenName']} registered")

    for verb, doing, done in (("approve", "approving", "approved"),
                              ("reject", "rejecting", "rejected")):
        _decision(auth, verb, doing, done)


def _decision(auth: click.Group, verb: str, doing: str, done: str) -> None:
    """`auth approve` and `auth reject`: one auth id, one POST, differing only in the verb."""

    @command(auth, verb, f"{verb.capitalize()} a pending authentication request")
    @click.option("--auth-id", default=None, help="Auth ID")
    def decide(ctx: click.Context, auth_id: str | None) -> None:
        require(auth_id=auth_id)
        resp = call(ctx, f"{doing} auth request", "POST", f"/api/v1/auth/{verb}",
                    {"authId": auth_id})
        emit(ctx, resp, f"Auth request {done}")
