"""Create users and pre-auth keys in a server's database before it starts.

The admin CLI and API are the normal way; this lets tests set up exotic keys (already expired,
already used) without waiting for time to pass. The server must not be running: it keeps the
authoritative state in memory and reads the database only at start.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.integration.server import VENV_PYTHON, PyHeadscale

_SCRIPT = r"""
import asyncio, json, sys
from datetime import UTC, datetime, timedelta
from pyheadscale.config import load_config
from pyheadscale.db.engine import engine_from_config, migrate
from pyheadscale.state.tailnet import Tailnet

async def main(path, spec):
    cfg = load_config(path)
    engine = engine_from_config(cfg.database)
    migrate(engine)
    tn = await Tailnet.load(engine, cfg)
    out = {"users": {}, "keys": {}}
    for name in spec.get("users", []):
        u = tn.user_by_name(name) or await tn.create_user(name)
        out["users"][name] = u.id
    for label, k in spec.get("keys", {}).items():
        user = k.get("user")
        uid = out["users"][user] if user else None
        exp = datetime.now(UTC) + timedelta(seconds=k.get("expires_in", 3600))
        _, full = await tn.create_preauth_key(uid, reusable=k.get("reusable", False),
                                              ephemeral=k.get("ephemeral", False),
                                              expiration=exp, tags=tuple(k.get("tags", ())))
        out["keys"][label] = full
    await tn.close()
    engine.dispose()
    print(json.dumps(out))

asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
"""


def seed(server: PyHeadscale, users: list[str], keys: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """users: names; keys: label -> {user, reusable, ephemeral, expires_in (s), tags}.

    Returns {"users": {name: id}, "keys": {label: "hskey-auth-..."}}.
    """
    if server.running:
        raise RuntimeError("seed() needs the server stopped")
    r = subprocess.run(
        [str(VENV_PYTHON), "-c", _SCRIPT, str(server.config_path),
         json.dumps({"users": users, "keys": keys})],
        capture_output=True, text=True, timeout=120, cwd=Path(server.config_path).parent,
    )
    if r.returncode != 0:
        raise RuntimeError(f"seeding failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])
