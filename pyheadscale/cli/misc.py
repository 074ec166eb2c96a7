"""`headscale health`, `generate private-key`, `debug create-node`, `version`."""

from __future__ import annotations

import click

from pyheadscale.cli.common import CLIError, call, command, emit, group, require, slice_flag


def version_text(info: dict) -> str:  # type: ignore[type-arg]
    v = info["version"] + ("-dirty" if info["dirty"] and "dirty" not in info["version"] else "")
    go = info["go"]
    return (f"headscale version {v}\ncommit: {info['commit']}\nbuild time: "
            f"{info['buildTime']}\nbuilt with: {go['version']} {go['os']}/{go['arch']}\n")


def register(root: click.Group) -> None:
    @command(root, "health", "Check the health of the Headscale server")
    def health(ctx: click.Context) -> None:
        resp = call(ctx, "checking health", "GET", "/api/v1/health")
        emit(ctx, resp, "")

    gen = group(root, "generate", "Generate commands", aliases=["gen"])

    @command(gen, "private-key", "Generate a private key for the headscale server")
    def private_key(ctx: click.Context) -> None:
        from pyheadscale.noise.keys import generate_private_key, privkey

        text = privkey(generate_private_key())
        emit(ctx, {"private_key": text}, text)

    dbg = group(root, "debug", "debug and testing commands")

    @command(dbg, "create-node", "Create a node that can be registered with `auth register <>` "
             "command")
    @click.option("--name", default=None, help="Name")
    @click.option("-u", "--user", default=None, help="User")
    @click.option("-k", "--key", default=None, help="Key")
    @click.option("-r", "--route", multiple=True, help="List (or repeated flags) of routes to "
                  "advertise")
    def create_node(ctx: click.Context, name: str | None, user: str | None, key: str | None,
                    route: tuple[str, ...]) -> None:
        from pyheadscale.api.v1 import auth_id_error

        require(name=name, user=user, key=key)
        problem = auth_id_error(key or "")
        if problem:
            raise CLIError(f"parsing machine key: {problem}")
        resp = call(ctx, "creating node", "POST", "/api/v1/debug/node",
                    {"user": user, "key": key, "name": name, "routes": slice_flag(route)})
        emit(ctx, resp["node"], "Node created")

    @command(root, "version", "Print the version.")
    def version(ctx: click.Context) -> None:
        from pyheadscale.api.v1 import version_info

        info = version_info()
        emit(ctx, info, version_text(info))
