"""Create users and pre-auth keys in a server's database before it starts (tests/seeddb.py
does the work in a process of its own).

The admin CLI and API are the normal way; this lets tests set up exotic keys (already expired,
already used) without waiting for time to pass.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from tests.integration.server import REPO, VENV_PYTHON, PyHeadscale


def seed(server: PyHeadscale, users: list[str], keys: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """users: names; keys: label -> {user, reusable, ephemeral, expires_in (s), tags}.

    Returns {"users": {name: id}, "keys": {label: "hskey-auth-..."}}.
    """
    if server.running:
        raise RuntimeError("seed() needs the server stopped")
    r = subprocess.run(
        [str(VENV_PYTHON), "-m", "tests.seeddb", str(server.config_path),
         json.dumps({"users": users, "keys": keys})],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    if r.returncode != 0:
        raise RuntimeError(f"seeding failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])
