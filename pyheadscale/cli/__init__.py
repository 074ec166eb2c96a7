"""The `headscale`-compatible command line (console scripts `pyheadscale` and `headscale`).

Headscale 0.29's command tree, aliases, flags and messages; output as text/tables or
`-o json|json-line|yaml` in the API's JSON shape (what Headscale 0.30 prints). Admin commands
talk to a running server over its unix socket, or remotely with cli.address + cli.api_key.
"""

from __future__ import annotations

import sys

import click

from pyheadscale.cli import (
    admin,
    apikeys,
    auth,
    completion,
    misc,
    nodes,
    oauthclients,
    policy,
    preauthkeys,
    users,
)
from pyheadscale.cli.common import STATE, AliasGroup, CLIError, command, fail, persistent
from pyheadscale.config import Config, ConfigError, load_config


@click.group(cls=AliasGroup, context_settings={"help_option_names": ["-h", "--help"]})
@persistent
@click.pass_context
def cli(ctx: click.Context) -> None:
    """pyheadscale - a Headscale-compatible Tailscale control server."""
    ctx.obj = {"config_path": ctx.meta.get("config_path")}


def load(ctx: click.Context, log_warnings: bool = True) -> Config:
    """Load the configuration or exit 1 with its one-line error."""
    try:
        return load_config(ctx.find_root().meta.get("config_path"), log_warnings=log_warnings)
    except ConfigError as e:
        click.echo(str(e), err=True)
        sys.exit(1)


@command(cli, "serve", "Run the control server (with the embedded default when no config "
         "file exists).")
def serve(ctx: click.Context) -> None:
    from pyheadscale.app import run
    from pyheadscale.proctitle import present_as_headscale_serve

    cfg = load(ctx, log_warnings=False)  # warned once logging has its configured format
    # Headplane finds the server by `comm` "headscale" and `serve` as the second word of
    # its cmdline, then sends SIGHUP: look like that whichever entry point started us.
    present_as_headscale_serve()
    run(cfg)


@command(cli, "configtest", "Validate the configuration and exit.")
def configtest(ctx: click.Context) -> None:
    cfg = load(ctx)
    for w in cfg.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo("config OK")


for _module in (users, nodes, preauthkeys, apikeys, oauthclients, auth, policy, misc,
                completion, admin):
    _module.register(cli)


def main(argv: list[str] | None = None) -> None:
    """Entry point: Headscale's error contract (stderr, exit code 1) for every failure."""
    STATE["output"] = ""
    try:
        rc = cli.main(args=argv, prog_name="headscale", standalone_mode=False)
    except CLIError as e:
        fail(str(e))
    except click.UsageError as e:
        if e.ctx is not None:
            click.echo(e.ctx.get_usage(), err=True)
        fail(e.format_message())
    except click.exceptions.Abort:
        fail("aborted")
    except click.ClickException as e:
        fail(e.format_message())
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)


__all__ = ["cli", "main"]
