"""`headscale policy get|set|check`, through the API or, with the bypass flag, straight
against the database named in the config (the server must not be running)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pyheadscale.cli.common import CLIError, call, command, confirm, group, load_cfg, require

if TYPE_CHECKING:  # the database stack is imported only by the bypass commands
    from sqlalchemy import Engine

BYPASS = "bypass-server-and-access-database-directly"
BYPASS_029 = "bypass-grpc-and-access-database-directly"  # Headscale <= 0.29 spelling
BYPASS_PROMPT = ("DO NOT run this command if an instance of headscale is running, are you sure "
                 "headscale is not running?")


def bypass_flags(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(f"--{BYPASS_029}", "bypass_old", is_flag=True, default=False,
                     hidden=True)(f)
    return click.option(f"--{BYPASS}", "bypass", is_flag=True, default=False,
                        help="Uses the headscale config to directly access the database, "
                        "bypassing the server; it must not be running")(f)


def read_policy_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise CLIError(f"reading policy file: open {path}: "
                       f"{(e.strerror or str(e)).lower()}") from None


def open_db(ctx: click.Context) -> Engine:
    if not confirm(ctx, BYPASS_PROMPT):
        raise CLIError("command aborted by user")
    from pyheadscale.db.engine import engine_from_config, migrate

    cfg = load_cfg(ctx)
    try:
        engine = engine_from_config(cfg.database)
        migrate(engine)
    except Exception as e:  # any driver/migration failure is a one-line CLI error
        raise CLIError(f"opening database: {e}") from None
    return engine


def file_flag(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-f", "--file", "file_", default=None,
                        help="Path to a policy file in HuJSON format")(f)


def compile_against_db(ctx: click.Context, text: str, *, with_nodes: bool, store: bool) -> None:
    """The bypass path: compile `text` against the database's users (and nodes, running the
    policy's tests); store it as the current policy when asked."""
    from pyheadscale.control.policyctl import compile_policy
    from pyheadscale.policy import PolicyError
    from pyheadscale.state.persist import load_all
    from pyheadscale.state.policystore import insert

    engine = open_db(ctx)
    try:
        loaded = load_all(engine)
        try:
            compile_policy(load_cfg(ctx), text, loaded.users,
                           loaded.nodes if with_nodes else [], run_tests=with_nodes)
        except PolicyError as e:
            raise CLIError(f"parsing policy file: {e}") from None
        if store:
            insert(engine, text)
    finally:
        engine.dispose()


def register(root: click.Group) -> None:
    pol = group(root, "policy", "Manage the Headscale ACL Policy")

    @command(pol, "get", "Print the current ACL Policy", aliases=["show", "view", "fetch"])
    @bypass_flags
    def get(ctx: click.Context, bypass: bool, bypass_old: bool) -> None:
        if bypass or bypass_old:
            from pyheadscale.state.policystore import PolicyNotFound, load_latest

            engine = open_db(ctx)
            try:
                data = load_latest(engine).data
            except PolicyNotFound as e:
                raise CLIError(f"loading policy from database: {e}") from None
            finally:
                engine.dispose()
        else:
            data = call(ctx, "loading ACL policy", "GET", "/api/v1/policy")["policy"]
        print(data, flush=True)

    @command(pol, "set", "Updates the ACL Policy", aliases=["put", "update"])
    @file_flag
    @bypass_flags
    def set_(ctx: click.Context, file_: str | None, bypass: bool, bypass_old: bool) -> None:
        _submit(ctx, file_, bypass or bypass_old, store=True)
        print("Policy updated.", flush=True)

    @command(pol, "check", "Check the Policy file for errors")
    @file_flag
    @bypass_flags
    def check(ctx: click.Context, file_: str | None, bypass: bool, bypass_old: bool) -> None:
        _submit(ctx, file_, bypass or bypass_old, store=False)
        print("Policy is valid", flush=True)


def _submit(ctx: click.Context, file_: str | None, bypass: bool, *, store: bool) -> None:
    """Compile the policy file and, for `set` (store), make it current: through the server, or
    with the bypass flag straight against the database."""
    require(file=file_)
    text = read_policy_file(file_ or "")
    if bypass:
        # As Headscale: set compiles against users only (nodes may not match yet) and runs no
        # policy tests; check also resolves the nodes.
        compile_against_db(ctx, text, with_nodes=not store, store=store)
    elif store:
        call(ctx, "setting ACL policy", "PUT", "/api/v1/policy", {"policy": text})
    else:
        call(ctx, "", "POST", "/api/v1/policy/check", {"policy": text})
