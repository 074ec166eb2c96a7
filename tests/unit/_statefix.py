"""Shared helpers for the state/auth tests: a real migrated SQLite DB and a Config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from pyheadscale.config import Config
from pyheadscale.db.engine import make_engine, migrate
from pyheadscale.state.tailnet import Tailnet


def make_cfg(**over: Any) -> Config:
    raw: dict[str, Any] = {
        "server_url": "http://127.0.0.1:8080",
        "prefixes": {"v4": "100.64.0.0/10", "v6": "fd7a:115c:a1e0::/48"},
        "tuning": {"batch_change_delay": "0s"},
        "node": {"expiry": "0", "ephemeral": {"inactivity_timeout": "120s"}},
        "dns": {"base_domain": "ts.example"},
    }
    for k, v in over.items():
        raw[k] = v
    return Config.model_validate(raw)


def new_engine(tmp: Path) -> Engine:
    engine = make_engine("sqlite", sqlite_path=os.fspath(tmp / "db.sqlite"))
    migrate(engine)
    return engine


async def open_tailnet(engine: Engine, cfg: Config | None = None) -> Tailnet:
    return await Tailnet.load(engine, cfg or make_cfg())


def key(n: int) -> bytes:
    return bytes([n]) * 32
