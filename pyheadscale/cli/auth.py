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

    @command(auth, "approve", "Approve a pending authentication request")
    @click.option("--auth-id", default=None, help="Auth ID")
    def approve(ctx: click.Context, auth_id: str | None) -> None:
        require(auth_id=auth_id)
        resp = call(ctx, "approving auth request", "POST", "/api/v1/auth/approve",
                    {"authId": auth_id})
        emit(ctx, resp, "Auth request approved")

    @command(auth, "reject", "Reject a pending authentication request")
    @click.option("--auth-id", default=None, help="Auth ID")
    def reject(ctx: click.Context, auth_id: str | None) -> None:
        require(auth_id=auth_id)
        resp = call(ctx, "rejecting auth request", "POST", "/api/v1/auth/reject",
                    {"authId": auth_id})
        emit(ctx, resp, "Auth request rejected")
