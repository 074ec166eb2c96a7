"""asyncio DERP client (tests, benchmarks, mesh links).

    c = await DerpClient.connect("https://127.0.0.1:8443/derp", priv, ssl=ctx)
    c.send(peer_key, b"hello")
    ev = await c.recv()          # RecvPacket / PeerGone / PeerPresent / KeepAlive / Pong / ...
    await c.ping()               # round trip
    await c.close()

Built on the sans-IO codec in derp.protocol.  ``connect`` returns after ServerInfo arrived;
a server that refuses the client closes the connection instead, raising ``DerpRejected``.
"""

from __future__ import annotations

import asyncio
import os
import ssl as _ssl
from collections import deque
from typing import Any
from urllib.parse import urlsplit

from . import protocol as p


class DerpClientError(Exception):
    pass


class DerpRejected(DerpClientError):
    """The server closed the connection before sending ServerInfo."""


class DerpClosed(DerpClientError):
    pass


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, client: DerpClient) -> None:
        self.c = client

    def connection_made(self, transport: Any) -> None:
        self.c._transport = transport

    def data_received(self, data: bytes) -> None:
        self.c._on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.c._on_lost(exc)

    def pause_writing(self) -> None:
        self.c._writable.clear()

    def resume_writing(self) -> None:
        self.c._writable.set()


class DerpClient:
    """One DERP connection.  Use ``await DerpClient.connect(...)``."""

    def __init__(self, private_key: bytes) -> None:
        self.private_key = bytes(private_key)
        self.public_key = p.public_key_of(self.private_key)
        self.server_key: bytes | None = None
        self.server_info: p.ServerInfo | None = None
        self.http_status: int | None = None
        self._transport: Any = None
        self._decoder = p.FrameDecoder(p.CLIENT_MAX_FRAME)
        self._head = bytearray()
        self._in_http = True
        self._events: deque[p.ServerEvent] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closed = False
        self._close_exc: BaseException | None = None
        self._pings: dict[bytes, asyncio.Future[None]] = {}
        self._writable = asyncio.Event()
        self._writable.set()
        self._info = p.ClientInfo()
        self._expect_server_key: bytes | None = None

    # ---------------------------------------------------------------------------- connect

    @classmethod
    async def connect(
        cls,
        url: str,
        private_key: bytes,
        *,
        ssl: _ssl.SSLContext | bool | None = None,
        server_hostname: str | None = None,
        mesh_key: str = "",
        can_ack_pings: bool = True,
        is_prober: bool = False,
        fast_start_key: bytes | None = None,
        ideal_node: str | None = None,
        expect_server_key: bytes | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> DerpClient:
        """Dial ``http(s)://host:port/derp``, upgrade and handshake.

        ``fast_start_key``: the server's public key, known in advance; sends
        ``Derp-Fast-Start: 1`` with ClientInfo pipelined behind the request.
        ``expect_server_key``: a pinned server key; a server presenting another one is
        refused before ClientInfo (and the mesh key in it) is sealed to it.
        For https with ``ssl=None`` certificate verification is off (tests, pinned labs).
        """
        u = urlsplit(url)
        tls = u.scheme in ("https", "wss")
        host = u.hostname or "127.0.0.1"
        port = u.port or (443 if tls else 80)
        ctx: _ssl.SSLContext | None = None
        if tls:
            if isinstance(ssl, _ssl.SSLContext):
                ctx = ssl
            else:
                ctx = _ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = _ssl.CERT_NONE
        self = cls(private_key)
        self._info = p.ClientInfo(mesh_key=mesh_key, can_ack_pings=can_ack_pings,
                                  is_prober=is_prober)
        self._expect_server_key = expect_server_key
        loop = asyncio.get_running_loop()

        async def _go() -> None:
            await loop.create_connection(
                lambda: _ClientProtocol(self), host, port, ssl=ctx,
                server_hostname=(server_hostname or (host if ctx else None)) if ctx else None)
            hosthdr = u.netloc.rsplit("@", 1)[-1]
            req = (f"GET {u.path or '/derp'} HTTP/1.1\r\nHost: {hosthdr}\r\n"
                   "User-Agent: Go-http-client/1.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n")
            if ideal_node:
                req += f"Ideal-Node: {ideal_node}\r\n"
            if fast_start_key is not None:
                req += "Derp-Fast-Start: 1\r\n"
                self._in_http = False
                self._expect_server_key = fast_start_key
                self.server_key = fast_start_key
                ci = p.client_info_frame(self.private_key, fast_start_key, self._info)
                self._transport.write((req + "\r\n").encode() + ci)
            else:
                self._transport.write((req + "\r\n").encode())
            await self._handshake

        try:
            await asyncio.wait_for(_go(), timeout)
        except BaseException:
            self.abort()
            raise
        return self

    def _on_data(self, data: bytes) -> None:
        if self._in_http:
            self._head += data
            idx = self._head.find(b"\r\n\r\n")
            if idx < 0:
                if len(self._head) > 16384:
                    self._fail(DerpClientError("HTTP response head too long"))
                return
            status_line = bytes(self._head[:idx]).split(b"\r\n", 1)[0]
            rest = bytes(self._head[idx + 4:])
            self._head = bytearray()
            self._in_http = False
            try:
                self.http_status = int(status_line.split(b" ")[1])
            except (IndexError, ValueError):
                self._fail(DerpClientError(f"bad status line {status_line!r}"))
                return
            if self.http_status != 101:
                self._fail(DerpClientError(f"unexpected HTTP status {self.http_status}"))
                return
            data = rest
            if not data:
                return
        try:
            frames = self._decoder.feed(data)
        except p.DerpProtocolError as e:
            self._fail(e)
            return
        for ftype, payload in frames:
            if not self._handshake.done():
                try:
                    self._handshake_frame(ftype, payload)
                except p.DerpProtocolError as e:
                    self._fail(e)
                    return
                continue
            ev = p.decode_server_frame(ftype, payload)
            if ev is None:
                continue
            if isinstance(ev, p.Pong):
                fut = self._pings.pop(ev.data, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
            elif isinstance(ev, p.Ping) and self._info.can_ack_pings:
                self._write(p.pong_frame(ev.data))
            self._events.append(ev)
        if self._events and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _handshake_frame(self, ftype: int, payload: bytes) -> None:
        if self.server_key is None:
            if ftype != p.FrameType.SERVER_KEY:
                raise p.HandshakeError(f"first frame type {ftype:#x}, want ServerKey")
            self.server_key = p.parse_server_key(payload)
            if self._expect_server_key is not None and self.server_key != self._expect_server_key:
                raise p.HandshakeError("server key differs from the pinned key")
            self._transport.write(
                p.client_info_frame(self.private_key, self.server_key, self._info))
            return
        if ftype == p.FrameType.SERVER_KEY:
            if self._expect_server_key is not None:
                got = p.parse_server_key(payload)
                if got != self._expect_server_key:
                    raise p.HandshakeError("server key differs from the fast-start key")
            return
        if ftype != p.FrameType.SERVER_INFO:
            raise p.HandshakeError(f"frame {ftype:#x} before ServerInfo")
        self.server_info = p.open_server_info(self.private_key, self.server_key, payload)
        self._handshake.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if not self._handshake.done():
            self._handshake.set_exception(exc)
        self._close_exc = exc
        self.abort()

    def _on_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._transport = None
        if not self._handshake.done():
            self._handshake.set_exception(
                DerpRejected("connection closed before ServerInfo"))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(DerpClosed("connection closed"))
        self._pings.clear()
        self._writable.set()

    # ------------------------------------------------------------------------------- API

    @property
    def closed(self) -> bool:
        return self._closed

    def _write(self, data: bytes) -> None:
        if self._transport is None:
            raise DerpClosed("connection closed")
        self._transport.write(data)

    def send(self, dst: bytes, packet: bytes) -> None:
        """SendPacket(dst, packet); buffered in the transport, never blocks."""
        self._write(p.send_packet_frame(dst, packet))

    def send_many(self, frames: list[bytes]) -> None:
        """Write pre-built frames in one call (benchmarks)."""
        self._write(b"".join(frames))

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its high-water mark."""
        await self._writable.wait()

    def write_buffer_size(self) -> int:
        return 0 if self._transport is None else int(self._transport.get_write_buffer_size())

    def note_preferred(self, preferred: bool) -> None:
        self._write(p.note_preferred_frame(preferred))

    def watch_conns(self) -> None:
        self._write(p.WATCH_CONNS_FRAME)

    def forward(self, src: bytes, dst: bytes, packet: bytes | memoryview) -> None:
        self._write(p.forward_packet_frame(src, dst, bytes(packet)))

    def close_peer(self, key: bytes) -> None:
        self._write(p.close_peer_frame(key))

    def write_raw(self, data: bytes) -> None:
        self._write(data)

    async def ping(self, data: bytes | None = None, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Send Ping and wait for the matching Pong."""
        data = data if data is not None else os.urandom(8)
        fut = asyncio.get_running_loop().create_future()
        self._pings[data] = fut
        self._write(p.ping_frame(data))
        await asyncio.wait_for(fut, timeout)

    async def recv(self, timeout: float | None = None) -> p.ServerEvent:  # noqa: ASYNC109
        """Next event from the server; raises DerpClosed when the connection ends."""
        while not self._events:
            if self._closed:
                raise DerpClosed("connection closed") from self._close_exc
            self._waiter = asyncio.get_running_loop().create_future()
            if timeout is None:
                await self._waiter
            else:
                await asyncio.wait_for(self._waiter, timeout)
        return self._events.popleft()

    async def recv_packet(
        self, timeout: float | None = None  # noqa: ASYNC109
    ) -> p.RecvPacket:
        """Next RecvPacket, skipping other events."""
        while True:
            ev = await self.recv(timeout)
            if isinstance(ev, p.RecvPacket):
                return ev

    def pending_events(self) -> int:
        return len(self._events)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    async def close(self) -> None:
        t = self._transport
        if t is not None:
            t.close()
        for _ in range(100):
            if self._closed:
                return
            await asyncio.sleep(0.01)
        self.abort()
