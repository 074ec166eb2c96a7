"""The whole server in the test's own process, on loopback, and a Python stand-in for
tailscaled to talk to it over the real Noise + HTTP/2 stack.

The stand-in (`Machine`) is pyheadscale's own protocol client: good for checking handlers in
seconds without root, never proof of compatibility (official clients in tests/integration/
are).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Self

import yaml

from pyheadscale.app import Server
from pyheadscale.config import Config, load_config
from pyheadscale.noise.keys import public_key
from pyheadscale.testclient import ControlConnection, connect
from tests.integration.server import deep_merge
from tests.netutil import free_port

CAPVER = 113  # the oldest supported client (Tailscale v1.80)


def server_config(workdir: Path, *, port: int | None = None, scheme: str = "http",
                  overrides: Mapping[str, Any] | None = None) -> Config:
    """A loopback server in `workdir`: SQLite, no metrics listener, MagicDNS under
    tailnet.test, the embedded relay and STUN on free ports (with scheme "https" the relay is
    on the main listener, which then needs tls_cert_path/tls_key_path in `overrides`);
    `overrides` are merged in."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    relay: dict[str, Any] = {"listen_addr": f"127.0.0.1:{free_port()}"} if scheme == "http" \
        else {}
    raw: dict[str, Any] = {
        "server_url": f"{scheme}://127.0.0.1:{port}",
        "listen_addr": f"127.0.0.1:{port}",
        "metrics_listen_addr": "",
        "data_dir": str(workdir),
        "noise": {"private_key_path": str(workdir / "noise_private.key")},
        "prefixes": {"v4": "100.64.0.0/10", "v6": "fd7a:115c:a1e0::/48",
                     "allocation": "sequential"},
        "derp": {"server": {"enabled": True, "region_id": 999, **relay,
                            "stun_listen_addr": f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
                            "private_key_path": str(workdir / "derp_server_private.key")},
                 "urls": [], "paths": [], "auto_update_enabled": False},
        "database": {"type": "sqlite", "sqlite": {"path": str(workdir / "db.sqlite")}},
        "dns": {"magic_dns": True, "base_domain": "tailnet.test", "override_local_dns": False,
                "nameservers": {"global": []}},
        "policy": {"mode": "file", "path": ""},
        # AF_UNIX paths are limited to 107 bytes; pytest's tmp paths can be longer.
        "unix_socket": str(Path(tempfile.mkdtemp(prefix="phsock-")) / "hs.sock"),
        "node": {"expiry": "0"},
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(deep_merge(raw, overrides or {})))
    return load_config(path, env={})


@contextlib.asynccontextmanager
async def running_server(cfg: Config) -> AsyncIterator[Server]:
    """Start the server from `cfg`; stop it (and remove its socket directory) afterwards,
    also when the start failed half-way."""
    srv = Server(cfg)
    try:
        try:
            await srv.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await srv.stop()
            raise
        try:
            yield srv
        finally:
            await srv.stop()
    finally:
        shutil.rmtree(Path(cfg.unix_socket).parent, ignore_errors=True)


class Machine:
    """A tailscaled stand-in: one machine key, a node key, one control connection."""

    def __init__(self, url: str, hostname: str, *, capver: int = CAPVER) -> None:
        self.url = url
        self.hostname = hostname
        self.capver = capver
        self.machine_private = secrets.token_bytes(32)
        self.node_private = secrets.token_bytes(32)
        self.disco_private = secrets.token_bytes(32)
        self.request_tags: list[str] = []  # `tailscale up --advertise-tags`
        self._conn: ControlConnection | None = None

    async def open(self) -> Self:
        """Connect (Noise + HTTP/2); `async with` does it for you."""
        self._conn = await connect(self.url, self.machine_private, capver=self.capver)
        return self

    async def close(self) -> None:
        await self.conn.close()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def conn(self) -> ControlConnection:
        assert self._conn is not None, "use `async with Machine(...)`"
        return self._conn

    @property
    def node_key(self) -> bytes:
        return public_key(self.node_private)

    @property
    def nodekey_text(self) -> str:
        return "nodekey:" + self.node_key.hex()

    @property
    def machine_key_short(self) -> str:
        """Tailscale's ShortString of the machine key, as web pages show it."""
        pub = public_key(self.machine_private)
        return "[" + base64.b64encode(pub).decode()[:5] + "]"

    def new_node_key(self) -> None:
        """`tailscale login` again: a fresh node key on the same machine."""
        self.node_private = secrets.token_bytes(32)

    def hostinfo(self) -> dict[str, Any]:
        hi: dict[str, Any] = {"Hostname": self.hostname, "OS": "linux"}
        if self.request_tags:
            hi["RequestTags"] = self.request_tags
        return hi

    async def register(self, *, auth_key: str = "", followup: str = "",
                       **extra: Any) -> dict[str, Any]:
        """POST /machine/register; the decoded answer (HTTP status must be 200)."""
        body: dict[str, Any] = {"Version": self.capver, "NodeKey": self.nodekey_text,
                                "Hostinfo": self.hostinfo(), "Followup": followup}
        if auth_key:
            body["Auth"] = {"AuthKey": auth_key}
        body.update(extra)
        status, _, data = await self.conn.request("POST", "/machine/register",
                                                  json.dumps(body).encode())
        assert status == 200, data
        return dict(json.loads(data))

    async def start_login(self) -> tuple[str, asyncio.Task[dict[str, Any]]]:
        """AuthURL, and the Followup long poll running in the background."""
        first = await self.register()
        auth_url = first["AuthURL"]
        follow = asyncio.create_task(self.register(followup=auth_url))
        await asyncio.sleep(0.05)
        assert not follow.done()
        return auth_url, follow

    def map_request(self, *, stream: bool = True, **extra: Any) -> bytes:
        body: dict[str, Any] = {"Version": self.capver, "NodeKey": self.nodekey_text,
                                "DiscoKey": "discokey:" + public_key(self.disco_private).hex(),
                                "Hostinfo": self.hostinfo(), "Compress": "zstd",
                                "KeepAlive": True, "Stream": stream}
        body.update(extra)
        return json.dumps(body).encode()

    def stream_map(self, **extra: Any) -> AsyncIterator[dict[str, Any]]:
        """The decoded frames of a streaming map poll (closing it resets the stream)."""
        return self.conn.stream_map(self.map_request(**extra))
