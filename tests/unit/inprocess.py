"""The whole server in-process on loopback, for unit tests that need every part wired."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from pyheadscale.app import Server
from pyheadscale.config import load_config
from tests.integration.server import deep_merge


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def running_server(tmp_path: Path, overrides: Mapping[str, Any] | None = None,
                         *, scheme: str = "http") -> AsyncIterator[Server]:
    """A started Server on a free loopback port with SQLite and the embedded relay (STUN on
    a free port); ``overrides`` are merged into that config."""
    port = free_port()
    base: dict[str, Any] = {
        "server_url": f"{scheme}://127.0.0.1:{port}",
        "listen_addr": f"127.0.0.1:{port}",
        "metrics_listen_addr": "",
        "data_dir": str(tmp_path),
        "noise": {"private_key_path": str(tmp_path / "noise.key")},
        "prefixes": {"v4": "100.64.0.0/10", "v6": "fd7a:115c:a1e0::/48"},
        "database": {"type": "sqlite", "sqlite": {"path": str(tmp_path / "db.sqlite")}},
        "derp": {"server": {"enabled": True,
                            "stun_listen_addr": f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
                            "private_key_path": str(tmp_path / "derp.key")},
                 "urls": []},
        "unix_socket": str(tmp_path / "hs.sock"),
        "dns": {"magic_dns": True, "base_domain": "tailnet.test", "override_local_dns": False},
    }
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(deep_merge(base, overrides or {})))
    srv = Server(load_config(cfg_path))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()
