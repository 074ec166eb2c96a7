"""`headscale admin login`: a one-time sign-in link for the web admin console.

pyheadscale-only. It always asks over the server's unix socket (never cli.address): who can
use the socket can administer the server, so that is who may mint a link.
"""

from __future__ import annotations

import getpass
import os

import click

from pyheadscale.cli.client import APIFailure, Client, ConnectError
from pyheadscale.cli.common import CLIError, command, emit, group, load_cli_cfg


def _local_user() -> str:
    # Under sudo the person is SUDO_USER; the link's sessions and audit lines carry it.
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):
        return "admin"


def register(root: click.Group) -> None:
    admin = group(root, "admin", "The web admin console")

    @command(admin, "login", "Print a one-time link that signs you in to the admin console")
    @click.option("--role", type=click.Choice(["admin", "auditor"]), default="admin",
                  show_default=True, help="admin may change things; auditor only looks")
    @click.option("--name", default=None,
                  help="Who signs in, as audit lines name them (default: your login name)")
    def login(ctx: click.Context, role: str, name: str | None) -> None:
        cfg = load_cli_cfg(ctx)
        c = Client(unix_socket=cfg.unix_socket, timeout=cfg.cli.timeout.total_seconds())
        try:
            resp = c.request("POST", "/console/sign-in-link",
                             body={"user": name or _local_user(), "role": role})
        except ConnectError as e:
            raise CLIError(f"connecting to headscale: {e}") from None
        except APIFailure as e:
            if e.status == 404:
                raise CLIError("this server has no admin console (admin_console.enabled is "
                               "false)") from None
            raise CLIError(f"creating sign-in link: {e.message}") from None
        minutes = max(int(resp.get("expiresInSeconds", 0)) // 60, 1)
        emit(ctx, resp, f"Open this link within {minutes} min to sign in as {role} (it works "
                        f"once):\n{resp['url']}")
