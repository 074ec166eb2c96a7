"""Mesh links between the relays of one region (derper's --mesh-with).

A link is a DERP client to the other relay that authenticates with this relay's own DERP
key plus the mesh key, sends WatchConns, and turns PeerPresent/PeerGone into packet
forwarders on the local DerpServer.  Packets for keys learned this way go out as
ForwardPacket.  When the link breaks, every learned key is dropped and the link retries.

The mesh key goes out sealed to the DERP key the other end presents, so that end must be
the real peer relay before anything is sent: either its TLS certificate is verified (the
system's CAs or a given CA file, and the host name, as derper's Go client does), or its
DERP public key is pinned and checked before ClientInfo. Nothing is ever sent to an
unverified server.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as _ssl
from typing import TYPE_CHECKING

from . import protocol as p
from .client import DerpClient, DerpClientError

if TYPE_CHECKING:
    from .server import DerpServer

log = logging.getLogger("derp.mesh")

MESH_MAX_BUFFER = 4 << 20  # beyond this a stalled link drops instead of buffering


def verifying_context(cafile: str | None = None) -> _ssl.SSLContext:
    """Certificate and host-name verification, against `cafile` or the system's CAs (which
    honour SSL_CERT_FILE, as Go does)."""
    ctx = _ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = True
    ctx.verify_mode = _ssl.CERT_REQUIRED
    return ctx


def pinned_only_context() -> _ssl.SSLContext:
    """TLS without certificate checks: only for a peer whose DERP key is pinned, where the
    key check (before ClientInfo) is what authenticates it."""
    ctx = _ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = _ssl.CERT_NONE
    return ctx


class MeshLink:
    def __init__(self, server: DerpServer, url: str, *, ssl: _ssl.SSLContext | None = None,
                 retry_interval: float = 5.0, server_hostname: str | None = None,
                 public_key: bytes | None = None) -> None:
        if public_key is None and not url.startswith(("https://", "wss://")):
            raise ValueError(f"mesh peer {url}: without TLS its DERP public key must be pinned")
        self.server = server
        self.url = url
        self.public_key = public_key
        self.ssl = ssl or (pinned_only_context() if public_key else verifying_context())
        self.server_hostname = server_hostname
        self.retry_interval = retry_interval
        self.client: DerpClient | None = None
        self.learned: set[bytes] = set()
        self.is_self = False
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._drop_all()
        if self.client is not None:
            self.client.abort()
            self.client = None

    def forward(self, src: bytes, dst: bytes, packet: bytes | memoryview) -> None:
        c = self.client
        if c is None or c.closed:
            self.server.stats.dropped["write_error"] += 1
            return
        if c.write_buffer_size() > MESH_MAX_BUFFER:
            self.server.stats.dropped["queue_tail"] += 1
            return
        c.write_raw(p.pack_header(p.FrameType.FORWARD_PACKET, 64 + len(packet)) + src + dst +
                    packet)

    def _drop_all(self) -> None:
        for key in list(self.learned):
            self.server.remove_packet_forwarder(key, self)
        self.learned.clear()

    async def _run(self) -> None:
        srv = self.server
        assert srv.mesh_key
        while True:
            try:
                c = await DerpClient.connect(self.url, srv.private_key, ssl=self.ssl,
                                             server_hostname=self.server_hostname,
                                             mesh_key=srv.mesh_key,
                                             expect_server_key=self.public_key)
            except (TimeoutError, OSError, DerpClientError, p.DerpProtocolError) as e:
                log.info("mesh %s: connect failed: %s", self.url, e)
                await asyncio.sleep(self.retry_interval)
                continue
            if c.server_key == srv.public_key:
                log.info("mesh %s: that is this relay; not meshing with self", self.url)
                self.is_self = True
                c.abort()
                return
            self.client = c
            c.watch_conns()
            self.connected.set()
            try:
                while True:
                    ev = await c.recv()
                    if isinstance(ev, p.PeerPresent):
                        if ev.key != srv.public_key:
                            self.learned.add(ev.key)
                            srv.add_packet_forwarder(ev.key, self)
                    elif isinstance(ev, p.PeerGone):
                        self.learned.discard(ev.key)
                        srv.remove_packet_forwarder(ev.key, self)
            except DerpClientError:
                pass
            finally:
                self.connected.clear()
                self.client = None
                self._drop_all()
                c.abort()
            log.info("mesh %s: link broke; retrying", self.url)
            await asyncio.sleep(self.retry_interval)
