"""`headscale completion bash|zsh|fish|powershell`: the shell's completion script, as cobra's
command prints it. Click generates the scripts; they call back into `headscale` with
`_HEADSCALE_COMPLETE` set, which click answers before any command runs (no config is read)."""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class

from pyheadscale.cli.common import CLIError, command, group

PROG = "headscale"
COMPLETE_VAR = "_HEADSCALE_COMPLETE"  # what click derives from the program name
SHELLS = {
    "bash": "To load completions in the current shell: source <(headscale completion bash)\n"
            "For every new session: headscale completion bash > "
            "/etc/bash_completion.d/headscale",
    "zsh": "To load completions: headscale completion zsh > \"${fpath[1]}/_headscale\" "
           "(needs `autoload -U compinit; compinit` in ~/.zshrc)",
    "fish": "To load completions: headscale completion fish > "
            "~/.config/fish/completions/headscale.fish",
    "powershell": "To load completions in the current session: headscale completion "
                  "powershell | Out-String | Invoke-Expression",
}


def script(root: click.Command, shell: str) -> str:
    cls = get_completion_class(shell)
    if cls is None:  # click releases before 8.5 have no PowerShell completion
        raise CLIError(f"completion for {shell} needs a newer click")
    return cls(root, {}, PROG, COMPLETE_VAR).source()


def register(root: click.Group) -> None:
    comp = group(root, "completion", "Generate the autocompletion script for the specified "
                 "shell")
    for shell, how in SHELLS.items():
        def make(shell: str = shell, how: str = how) -> None:
            @command(comp, shell, f"Generate the autocompletion script for {shell}.\n\n{how}")
            def _print(ctx: click.Context) -> None:
                click.echo(script(root, shell), nl=False)

        make()
