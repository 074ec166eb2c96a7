"""``GET /key`` (aiohttp) and the ``/ts2021`` upgrade (HTTP/1.1 101 and WebSocket).

``/ts2021`` is a front-door route (``derp.frontdoor``): the listener's h11 front door parses
the request head, this module checks it and runs the Noise handshake, and the door hands the
socket over.  We answer 101, write the 51-byte Noise response and the HTTP/2 SETTINGS, and
from then on ``_NoiseStream`` is the transport's protocol.  Over WebSocket the same stream
runs inside binary messages (``derp.websocket``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Callable
from urllib.parse import parse_qs

from aiohttp import web

from derp.frontdoor import TEXT, Reply, RequestHead, Route, Upgrade, WebSocket
from pyheadscale.control.h2limits import BodyBudget, H2Limits
from pyheadscale.control.h2server import H2ControlConnection
from pyheadscale.control.types import MAX_REQUEST_BODY, MIN_CAPVER, Dispatch
from pyheadscale.listener import add_takeover_route
from pyheadscale.noise.handshake import HandshakeError, HandshakeResult, error_frame, respond
from pyheadscale.noise.keys import mkey, public_key

log = logging.getLogger(__name__)

UPGRADE_PROTOCOL = "tailscale-control-protocol"
HANDSHAKE_HEADER = "X-Tailscale-Handshake"
# Clients older than this cannot speak Noise at all (Headscale's NoiseCapabilityVersion).
NOISE_CAPABILITY_VERSION = 39


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text + "\n", content_type="text/plain")


def _reply(status: int, text: str) -> Reply:
    return Reply(status, (text + "\n").encode(), TEXT)


def _decode_handshake(value: str) -> bytes | None:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


CLOSE_GRACE = 5.0


class _NoiseStream(asyncio.Protocol):
    """The socket (or WebSocket) of one Noise connection after the takeover.

    It is the transport's protocol (bytes in) and the connection's ``ByteSink`` (bytes out,
    waiting while the transport's buffer is above its high-water mark).
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self._t = transport
        self._writable = asyncio.Event()
        self._writable.set()
        self.conn: H2ControlConnection | None = None

    async def write(self, data: bytes) -> None:
        if self._t.is_closing():
            raise ConnectionResetError("connection closed")
        self._t.write(data)
        await self._writable.wait()

    def ready(self) -> bool:
        return self._writable.is_set() and not self._t.is_closing()

    def write_nowait(self, data: bytes) -> None:
        self._t.write(data)  # pause_writing() says when the buffer is past its high-water mark

    async def close(self) -> None:
        self._t.close()
        # A graceful close (TLS close_notify after the unsent output) needs a peer that
        # reads; one that does not is cut off, so its socket cannot outlive the connection.
        asyncio.get_running_loop().call_later(CLOSE_GRACE, self._t.abort)

    def abort(self) -> None:
        self._t.abort()

    def data_received(self, data: bytes) -> None:
        if self.conn is not None:
            self.conn.feed(data)

    def eof_received(self) -> bool:
        if self.conn is not None:
            self.conn.feed_eof()
        # The writer flushes GOAWAY, then closes (TCP only: asyncio's TLS transport closes
        # at once anyway and warns about a true answer).
        return self._t.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._writable.set()
        if self.conn is not None:
            self.conn.feed_eof()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()


class Ts2021Server:
    """Holds the server key and the live Noise connections of one aiohttp app."""

    def __init__(
        self,
        noise_private_key: bytes,
        dispatch: Dispatch,
        min_capver: int = MIN_CAPVER,
        max_body: int = MAX_REQUEST_BODY,
        limits: H2Limits | None = None,
        body_budget: int = 64 << 20,
        is_registered: Callable[[bytes], bool] | None = None,
    ) -> None:
        self.private_key = bytes(noise_private_key)
        self.public_key = public_key(self.private_key)
        self.dispatch = dispatch
        self.min_capver = min_capver
        self.max_body = max_body
        self.limits = limits or H2Limits()
        self.budget = BodyBudget(body_budget)
        self.is_registered = is_registered
        self.connections: set[H2ControlConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- /key ----------------------------------------------------------------------------

    async def handle_key(self, request: web.Request) -> web.Response:
        v = request.query.get("v")
        if v is None or v == "":
            return _text(400, "missing capability version parameter v")
        try:
            capver = int(v)
        except ValueError:
            return _text(400, "capability version v must be an integer")
        if capver < NOISE_CAPABILITY_VERSION:
            return _text(
                400,
                f"client capability version {capver} is too old for the Noise control "
                f"protocol; please upgrade Tailscale",
            )
        # Clients below min_capver still get the key; they are refused at the handshake with
        # a message they can show ("server error: ...").
        return web.json_response(
            {"legacyPublicKey": mkey(bytes(32)), "publicKey": mkey(self.public_key)}
        )

    # -- /ts2021 (a front-door route: the connection is taken over) ---------------------------

    def route(self, head: RequestHead) -> Route:
        if head.path != "/ts2021":
            return None
        if head.method not in ("GET", "POST"):
            return _reply(405, "method not allowed")
        upgrade = head.header("upgrade") or ""
        if not upgrade:
            log.warning("/ts2021 without an Upgrade header: is a reverse proxy dropping it?")
            return _reply(400, "missing next protocol (Upgrade header)")
        if upgrade.lower() == "websocket":
            # Handshake from the query string; "+" may arrive as a space if not %-escaped.
            query = parse_qs(head.query).get(HANDSHAKE_HEADER, [""])[0]
            hs = query.replace(" ", "+")
            where = "parameter"
        elif upgrade.lower() == UPGRADE_PROTOCOL:
            hs = head.header(HANDSHAKE_HEADER.lower()) or ""
            where = "header"
        else:
            return _reply(400, f"unknown next protocol {upgrade!r}")
        if not hs:
            return _reply(400, f"missing X-Tailscale-Handshake {where}")
        init = _decode_handshake(hs)
        if init is None:
            return _reply(400, f"invalid X-Tailscale-Handshake {where} (not base64)")
        result = self._handshake(init)
        if isinstance(result, str):
            log.info("refusing Noise handshake from %s: %s", head.client, result)

        def attach(transport: asyncio.Transport, prefix: bytes,
                   surplus: bytes) -> asyncio.BaseProtocol:
            return self._attach(result, transport, prefix, surplus, head.client)

        if where == "parameter":
            return WebSocket(attach, UPGRADE_PROTOCOL)
        return Upgrade(attach, (("Upgrade", UPGRADE_PROTOCOL), ("Connection", "upgrade")))

    def _handshake(self, init: bytes) -> HandshakeResult | str:
        try:
            return respond(self.private_key, init, self.min_capver)
        except HandshakeError as e:
            return str(e)

    def _attach(self, result: HandshakeResult | str, transport: asyncio.Transport,
                prefix: bytes, surplus: bytes, remote: str) -> asyncio.BaseProtocol:
        stream = _NoiseStream(transport)
        if isinstance(result, str):  # the client shows this message ("server error: ...")
            transport.write(prefix + error_frame(result))
            transport.close()
            return stream
        conn = H2ControlConnection(
            records=result.records(), sink=stream, dispatch=self.dispatch,
            machine_key=result.peer_static, capver=result.version, max_body=self.max_body,
            limits=self.limits, budget=self.budget, is_registered=self.is_registered,
            remote=remote)
        stream.conn = conn
        conn.start(preamble=prefix + result.message)
        self.connections.add(conn)
        task = asyncio.get_running_loop().create_task(self._serve(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if surplus:  # a client waits for our reply, but bytes that did arrive are not dropped
            conn.feed(surplus)
        return stream

    async def _serve(self, conn: H2ControlConnection) -> None:
        try:
            await conn.wait_closed()
        finally:
            conn.close("connection finished")
            self.connections.discard(conn)

    async def on_shutdown(self, app: web.Application) -> None:
        conns = list(self.connections)
        for c in conns:
            c.close("server shutting down")
        if conns:
            await asyncio.wait([asyncio.ensure_future(c.wait_closed()) for c in conns], timeout=5)


_APP_KEY = web.AppKey("pyheadscale_ts2021", Ts2021Server)


def add_routes(
    app: web.Application,
    noise_private_key: bytes,
    dispatch: Dispatch,
    min_capver: int = MIN_CAPVER,
    *,
    limits: H2Limits | None = None,
    body_budget: int = 64 << 20,
    is_registered: Callable[[bytes], bool] | None = None,
) -> None:
    """Register ``GET /key`` and the ``GET|POST /ts2021`` takeover route on ``app``.

    ``dispatch`` receives every HTTP/2 request made over an established Noise connection.
    Clients whose capability version is below ``min_capver`` get a Noise error frame.
    ``is_registered(machine_key)`` tells whether a node has that key: connections of keys
    without one are closed after ``limits.unregistered_idle_timeout`` without a stream.
    """
    server = Ts2021Server(noise_private_key, dispatch, min_capver, limits=limits,
                          body_budget=body_budget, is_registered=is_registered)
    app[_APP_KEY] = server
    app.router.add_route("GET", "/key", server.handle_key)
    add_takeover_route(app, server.route)
    app.on_shutdown.append(server.on_shutdown)


def get_server(app: web.Application) -> Ts2021Server:
    """The ``Ts2021Server`` that ``add_routes`` attached to ``app``."""
    return app[_APP_KEY]
