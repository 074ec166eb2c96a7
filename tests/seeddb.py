"""Create users and pre-auth keys in a server's database before it starts, as a program:

    python -m tests.seeddb CONFIG '{"users": [...], "keys": {label: {...}}}'

Each key is {user, reusable, ephemeral, expires_in (seconds), tags}. Prints one JSON line,
{"users": {name: id}, "keys": {label: "hskey-auth-..."}}. The server must not be running: it
keeps the authoritative state in memory and reads the database only at start.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from pyheadscale.config import load_config
from pyheadscale.db.engine import engine_from_config, migrate
from pyheadscale.state.tailnet import Tailnet


async def seed_db(config_path: str, spec: dict[str, Any]) -> dict[str, Any]:
    cfg = load_config(config_path)
    engine = engine_from_config(cfg.database)
    migrate(engine)
    tn = await Tailnet.load(engine, cfg)
    out: dict[str, Any] = {"users": {}, "keys": {}}
    try:
        for name in spec.get("users", []):
            u = tn.user_by_name(name) or await tn.create_user(name)
            out["users"][name] = u.id
        for label, k in spec.get("keys", {}).items():
            user = k.get("user")
            uid = out["users"][user] if user else None
            exp = datetime.now(UTC) + timedelta(seconds=k.get("expires_in", 3600))
            _, full = await tn.create_preauth_key(
                uid, reusable=k.get("reusable", False), ephemeral=k.get("ephemeral", False),
                expiration=exp, tags=tuple(k.get("tags", ())))
            out["keys"][label] = full
    finally:
        await tn.close()
        engine.dispose()
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(seed_db(sys.argv[1], json.loads(sys.argv[2])))))
