"""`headscale completion <shell>` prints a script that completes the real command tree; bash
runs it here, as a user's shell would after `source <(headscale completion bash)`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def headscale(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "headscale"), *args], capture_output=True, text=True,
                          timeout=60, check=False)


def bash_complete(words: list[str]) -> list[str]:
    """COMPREPLY after bash runs the generated completion function on `words`."""
    script = headscale("completion", "bash").stdout
    line = " ".join(words)
    probe = (f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}\n"
             "_headscale_completion headscale\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    res = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=60,
                         env=env, check=True)
    return [w for w in res.stdout.splitlines() if w]


def test_bash_completes_commands_and_subcommands() -> None:
    assert bash_complete(["headscale", "us"]) == ["users"]
    assert {"list", "register", "expire", "rename", "delete"} <= set(
        bash_complete(["headscale", "nodes", "''"]))
    assert bash_complete(["headscale", "completion", "fi"]) == ["fish"]


@pytest.mark.parametrize(("shell", "marker"), [("zsh", "compdef"), ("fish", "complete "),
                                               ("powershell", "Register-ArgumentCompleter")])
def test_other_shells_get_their_script(shell: str, marker: str) -> None:
    res = headscale("completion", shell)
    assert res.returncode == 0, res.stderr
    assert marker in res.stdout and "_HEADSCALE_COMPLETE" in res.stdout


def test_completion_needs_no_config() -> None:
    """Like Headscale (which skips its config for `completion`), a broken config file does
    not stop the script from printing."""
    env = {**os.environ, "HEADSCALE_CONFIG": "/nonexistent/config.yaml"}
    res = subprocess.run([str(BIN / "headscale"), "completion", "bash"], capture_output=True,
                         text=True, timeout=60, env=env, check=False)
    assert res.returncode == 0 and "_headscale_completion" in res.stdout, res.stderr
