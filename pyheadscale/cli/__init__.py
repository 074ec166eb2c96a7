"""The `headscale`-compatible command line (console scripts `pyheadscale` and `headscale`)."""

from __future__ import annotations

import sys

import click

from pyheadscale import __version__
from pyheadscale.config import ConfigError, load_config


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Path to the configuration file (default: search HEADSCALE_CONFIG, "
              "/etc/headscale, ~/.headscale, the current directory).")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """pyheadscale - a Headscale-compatible Tailscale control server."""
    ctx.obj = {"config_path": config_path}


def load(ctx: click.Context):  # type: ignore[no-untyped-def]
    """Load the configuration or exit 1 with its one-line error."""
    try:
        return load_config(ctx.obj["config_path"])
    except ConfigError as e:
        click.echo(str(e), err=True)
        sys.exit(1)


@cli.command()
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run the control server (with the embedded default when no config file exists)."""
    from pyheadscale.app import run

    run(load(ctx))


@cli.command()
@click.pass_context
def configtest(ctx: click.Context) -> None:
    """Validate the configuration and exit."""
    cfg = load(ctx)
    for w in cfg.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo("config OK")


@cli.command()
def version() -> None:
    """Print the version."""
    click.echo(f"v0.29.2-pyheadscale-{__version__}")


def main() -> None:
    cli(prog_name="headscale")
