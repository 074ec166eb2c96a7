"""The CLI's cobra/pflag parsing habits that Headscale's own tests rely on: a subcommand's
flag written before the subcommand (`preauthkeys --user 1 create`), boolean flags with a
value (`--reusable=true`), and a config file holding only a `cli:` section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest

from pyheadscale.cli.common import AliasGroup, CLIError, command, group
from pyheadscale.config import ConfigError, load_cli_config, load_config


def tree() -> tuple[AliasGroup, dict[str, Any]]:
    seen: dict[str, Any] = {}
    root = AliasGroup(name="headscale")
    keys = group(root, "preauthkeys", "keys")

    @command(keys, "create", "create a key")
    @click.option("-u", "--user", default="")
    @click.option("--reusable", is_flag=True, default=False)
    @click.option("--ephemeral", is_flag=True, default=False)
    def create(ctx: click.Context, user: str, reusable: bool, ephemeral: bool) -> None:
        seen.update(user=user, reusable=reusable, ephemeral=ephemeral,
                    force=ctx.find_root().meta.get("force", False))

    return root, seen


def run(*argv: str) -> dict[str, Any]:
    root, seen = tree()
    root.main(list(argv), standalone_mode=False)
    return seen


@pytest.mark.parametrize("argv", [
    ("preauthkeys", "--user", "7", "create", "--reusable"),
    ("preauthkeys", "-u", "7", "create", "--reusable"),
    ("preauthkeys", "--user=7", "create", "--reusable"),
    ("preauthkeys", "create", "--user", "7", "--reusable"),
])
def test_subcommand_flag_before_the_subcommand(argv: tuple[str, ...]) -> None:
    assert run(*argv) == {"user": "7", "reusable": True, "ephemeral": False, "force": False}


def test_unknown_subcommand_after_foreign_flag_is_still_refused() -> None:
    with pytest.raises(click.UsageError):
        run("preauthkeys", "--user", "7", "nope")


@pytest.mark.parametrize(("value", "want"), [
    ("true", True), ("1", True), ("T", True), ("True", True),
    ("false", False), ("0", False), ("F", False), ("FALSE", False)])
def test_boolean_flag_takes_a_pflag_value(value: str, want: bool) -> None:
    seen = run("preauthkeys", "create", f"--reusable={value}", f"--force={value}")
    assert seen["reusable"] is want and bool(seen["force"]) is want


def test_boolean_flag_refuses_a_non_boolean_value() -> None:
    with pytest.raises(CLIError, match=r'invalid argument "maybe" for "--ephemeral" flag: '
                                       r'strconv.ParseBool: parsing "maybe": invalid syntax'):
        run("preauthkeys", "create", "--ephemeral=maybe")


def test_value_after_double_dash_is_left_alone() -> None:
    root, _ = tree()
    with pytest.raises(click.UsageError):  # `--reusable=yes` is then an argument: refused
        root.main(["preauthkeys", "create", "--", "--reusable=yes"], standalone_mode=False)


def test_cli_config_needs_only_its_own_section(tmp_path: Path) -> None:
    cfg = tmp_path / "cli.yaml"
    cfg.write_text("cli:\n  address: 127.0.0.1:8443\n  api_key: hskey-api-x\n"
                   "  timeout: 5s\n  insecure: true\nunix_socket: run/hs.sock\n")
    got = load_cli_config(cfg, env={})
    assert (got.cli.address, got.cli.api_key, got.cli.insecure) == \
        ("127.0.0.1:8443", "hskey-api-x", True)
    assert got.cli.timeout.total_seconds() == 5
    assert got.unix_socket == str(tmp_path / "run" / "hs.sock")
    env = load_cli_config(cfg, env={"HEADSCALE_CLI_API_KEY": "from-env"})
    assert env.cli.api_key == "from-env"
    with pytest.raises(ConfigError):  # the server's loader wants a whole server config
        load_config(cfg, env={}, log_warnings=False)


def test_cli_config_refuses_a_bad_cli_value(tmp_path: Path) -> None:
    cfg = tmp_path / "cli.yaml"
    cfg.write_text("cli:\n  timeout: soon\n")
    with pytest.raises(ConfigError, match="cli.timeout"):
        load_cli_config(cfg, env={})
