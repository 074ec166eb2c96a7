"""Shared helpers of the unit tests: a Config, a real migrated SQLite tailnet, a control
plane, an /api/v1 client on it, and nodes built by hand. Fixtures using them are in
conftest.py; tests that need other settings call these directly."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import Engine

from pyheadscale.api import add_api_routes
from pyheadscale.config import Config
from pyheadscale.control.dispatch import ControlPlane
from pyheadscale.db.engine import make_engine, migrate
from pyheadscale.state.model import Node
from pyheadscale.state.tailnet import Tailnet

CREATED = datetime(2026, 8, 22, 15, 59, 58, tzinfo=UTC)


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


async def open_control(tmp: Path, **cfg_over: Any) -> ControlPlane:
    """A control plane on a fresh tailnet (database policy mode unless overridden), with its
    policy loaded; not started (no DERP fetch, no background tasks)."""
    cfg = make_cfg(**({"policy": {"mode": "database"}} | cfg_over))
    tn = await open_tailnet(new_engine(tmp), cfg)
    cp = ControlPlane(cfg, tn, tn.engine, None)
    await cp.policy.load()
    return cp


async def api_client(cp: ControlPlane, *, trusted: bool = True,
                     cors_origins: Sequence[str] = (),
                     app: web.Application | None = None) -> TestClient:
    """A started aiohttp test client for /api/v1 of `cp` (close it when done)."""
    app = app if app is not None else web.Application()
    add_api_routes(app, cp.admin, trusted=trusted, cors_origins=cors_origins)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


def key(n: int) -> bytes:
    return bytes([n]) * 32


def make_node(i: int, *, user: int | None = 1, tags: Sequence[str] = (),
              routes: Sequence[str] = (), approved: Sequence[str] = (),
              **fields: Any) -> Node:
    """Node i with addresses 100.64.0.i and fd7a:115c:a1e0::i, name n<i>, owned by `user`
    (no user when tagged); `routes` are announced, `approved` approved; any other Node field
    may be given."""
    base: dict[str, Any] = dict(
        id=i, machine_key=bytes(32), node_key=bytes(32), disco_key=None,
        hostname=f"n{i}", given_name=f"n{i}", user_id=None if tags else user,
        ipv4=ipaddress.IPv4Address(f"100.64.0.{i}"),
        ipv6=ipaddress.IPv6Address(f"fd7a:115c:a1e0::{i}"),
        register_method="authkey", created_at=CREATED, updated_at=CREATED, tags=tuple(tags),
        hostinfo={"RoutableIPs": list(routes)} if routes else {},
        approved_routes=tuple(ipaddress.ip_network(r) for r in approved),
    )
    base.update(fields)
    return Node(**base)
