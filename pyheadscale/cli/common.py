"""Shared CLI plumbing: cobra-like aliases and persistent flags (-c, -o, --force accepted at
any level), errors as one line on stderr with exit code 1, prompts, the API client."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import click

from pyheadscale.cli.client import APIFailure, Client, ConnectError
from pyheadscale.cli.output import FORMATS, print_error, print_output
from pyheadscale.config import Config, ConfigError, load_cli_config, load_config


class CLIError(Exception):
    """A failed command: printed as `Error: <message>` (or {"error": ...}), exit code 1."""


# The -o of the running command, for error printing outside click's context.
STATE: dict[str, Any] = {"output": ""}


class AliasGroup(click.Group):
    """A group whose commands can also be reached by cobra-style aliases."""

    def __init__(self, *a: Any, aliases: Iterable[str] = (), **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.aliases = tuple(aliases)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is not None:
            return cmd
        for c in self.commands.values():
            if name in getattr(c, "aliases", ()):
                return c
        return None

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, self._hoist_subcommand(ctx, args))

    def _hoist_subcommand(self, ctx: click.Context, args: list[str]) -> list[str]:
        """cobra parses a subcommand's flags wherever they stand, so `headscale preauthkeys
        --user 1 create` works there: move the subcommand name before the leading options
        this group does not know. Like cobra's stripFlags, `--flag` without `=` takes the
        next token as its value unless the group knows it as a boolean flag."""
        own = {o: p for p in self.get_params(ctx) if isinstance(p, click.Option)
               for o in (*p.opts, *p.secondary_opts)}
        kept: list[str] = []
        foreign: list[str] = []
        i = 0
        while i < len(args) and args[i].startswith("-") and args[i] not in ("-", "--"):
            name = args[i].split("=", 1)[0]
            opt = own.get(name)
            width = 1 if "=" in args[i] or (opt is not None and opt.is_flag) else 2
            (kept if opt is not None else foreign).extend(args[i:i + width])
            i += width
        if not foreign or i >= len(args) or self.get_command(ctx, args[i]) is None:
            return args
        return [*kept, args[i], *foreign, *args[i + 1:]]

    def resolve_command(self, ctx: click.Context, args: list[str]
                        ) -> tuple[str | None, click.Command | None, list[str]]:
        _, cmd, rest = super().resolve_command(ctx, args)
        return (cmd.name if cmd else None), cmd, rest

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            c = self.get_command(ctx, name)
            if c is None or c.hidden:
                continue
            al = getattr(c, "aliases", ())
            label = f"{name} ({', '.join(al)})" if al else name
            rows.append((label, c.get_short_help_str(60)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def group(parent: click.Group, name: str, help: str, aliases: Iterable[str] = ()
          ) -> AliasGroup:
    g = AliasGroup(name=name, help=help, aliases=aliases,
                   context_settings={"help_option_names": ["-h", "--help"]})
    parent.add_command(g)
    return g


def _store(key: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def cb(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value not in (None, False, ""):
            root = ctx.find_root()
            root.meta[key] = value
            if key == "output":
                STATE["output"] = value
        return value

    return cb


def persistent(f: Callable[..., Any]) -> Callable[..., Any]:
    """Headscale's persistent flags, accepted after any subcommand too."""
    f = click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
                     default=None, expose_value=False, is_eager=True,
                     callback=_store("config_path"), help="Config file.")(f)
    f = click.option("-o", "--output", default="", expose_value=False, is_eager=True,
                     callback=_store("output"),
                     help="Output format. Empty for human-readable, 'json', 'json-line' or "
                     "'yaml'")(f)
    f = click.option("--force", is_flag=True, default=False, expose_value=False,
                     callback=_store("force"), help="Disable prompts and forces the execution")(f)
    return f


PFLAG_TRUE = ("1", "t", "T", "TRUE", "true", "True")
PFLAG_FALSE = ("0", "f", "F", "FALSE", "false", "False")


class AliasCommand(click.Command):
    """A command that cobra-style aliases also reach (AliasGroup looks them up)."""

    aliases: tuple[str, ...] = ()

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, self._bool_values(ctx, args))

    def _bool_values(self, ctx: click.Context, args: list[str]) -> list[str]:
        """pflag lets a boolean flag take a value (`--reusable=true`, `--force=false`),
        click does not: `=true` becomes the bare flag and `=false` drops it."""
        flags = {o for p in self.get_params(ctx)
                 if isinstance(p, click.Option) and p.is_flag and not p.secondary_opts
                 for o in p.opts if o.startswith("--")}
        out: list[str] = []
        for i, a in enumerate(args):
            if a == "--":
                return out + args[i:]
            name, eq, value = a.partition("=")
            if not eq or name not in flags:
                out.append(a)
            elif value in PFLAG_TRUE:
                out.append(name)
            elif value not in PFLAG_FALSE:
                raise CLIError(f'invalid argument "{value}" for "{name}" flag: '
                               f'strconv.ParseBool: parsing "{value}": invalid syntax')
        return out


def command(parent: click.Group, name: str, help: str,
            aliases: Iterable[str] = ()) -> Callable[[Callable[..., Any]], click.Command]:
    def deco(f: Callable[..., Any]) -> click.Command:
        cmd = click.command(name=name, help=help, cls=AliasCommand,
                            context_settings={"help_option_names": ["-h", "--help"]},
                            )(persistent(click.pass_context(f)))
        cmd.aliases = tuple(aliases)
        parent.add_command(cmd)
        return cmd

    return deco


def opt(ctx: click.Context, key: str, default: Any = None) -> Any:
    return ctx.find_root().meta.get(key, default)


def output_format(ctx: click.Context) -> str:
    fmt = str(opt(ctx, "output", "") or "")
    if fmt and fmt not in FORMATS:
        return ""  # Headscale prints the human form for unknown formats
    return fmt


def load_cfg(ctx: click.Context) -> Config:
    try:
        return load_config(opt(ctx, "config_path"))
    except ConfigError as e:
        raise CLIError(f"loading configuration: {e}") from None


def load_cli_cfg(ctx: click.Context) -> Config:
    """Only what reaching a server takes (unix_socket, cli.*), as Headscale's CLI reads it."""
    try:
        return load_cli_config(opt(ctx, "config_path"))
    except ConfigError as e:
        raise CLIError(f"loading configuration: {e}") from None


def client(ctx: click.Context) -> Client:
    cfg = load_cli_cfg(ctx)
    try:
        return Client.from_config(cfg)
    except ConnectError as e:
        raise CLIError(f"connecting to headscale: {e}") from None


def call(ctx: click.Context, context: str, method: str, path: str, body: Any = None,
         query: dict[str, Any] | None = None, v2: bool = False) -> Any:
    """One API call; failures become `<context>: <server message>`, or for Headscale's /api/v2
    commands (v2=True) `api error (<status>): <server message>`, as its v2Error prints them."""
    c = client(ctx)
    try:
        return c.request(method, path, body=body, query=query)
    except ConnectError as e:
        raise CLIError(f"connecting to headscale: {e}") from None
    except APIFailure as e:
        if v2:
            raise CLIError(f"api error ({e.status}): {e.message}") from None
        raise CLIError(f"{context}: {e.message}" if context else e.message) from None


def emit(ctx: click.Context, result: Any, human: str) -> None:
    print_output(result, human, output_format(ctx))


def emit_list(ctx: click.Context, data: Any, table: Callable[[], str]) -> None:
    fmt = output_format(ctx)
    if fmt:
        print_output(data, "", fmt)
    else:
        print(table(), flush=True)


def confirm(ctx: click.Context, prompt: str) -> bool:
    """Headscale confirmAction: --force, else a y/n question on stderr."""
    if opt(ctx, "force", False):
        return True
    sys.stderr.write(prompt + " [y/n] ")
    sys.stderr.flush()
    line = sys.stdin.readline()
    return line.strip().lower() in ("y", "yes")


def require(**flags: Any) -> None:
    """cobra's MarkFlagRequired check, with its message."""
    missing = sorted(name for name, value in flags.items() if value is None)
    if missing:
        names = ", ".join(f'"{n.replace("_", "-")}"' for n in missing)
        raise CLIError(f"required flag(s) {names} not set")


def parse_uint(value: str | None, flag: str) -> int:
    """A uint64 flag value (cobra's message on bad input); None/"" give 0."""
    if value is None or value == "":
        return 0
    s = str(value)
    if not s.isascii() or not s.isdigit() or int(s) >= 1 << 64:
        raise CLIError(f'invalid argument "{s}" for "{flag}" flag: strconv.ParseUint: parsing '
                       f'"{s}": invalid syntax')
    return int(s)


def slice_flag(values: Iterable[str] | None) -> list[str]:
    """pflag StringSlice: repeated flags and comma-separated values; "" gives nothing."""
    out: list[str] = []
    for v in values or ():
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return out


def fail(message: str) -> None:
    print_error(message, STATE.get("output", "") if STATE.get("output") in FORMATS else "")
    sys.exit(1)
