"""``GET /key`` and the ``/ts2021`` upgrade (HTTP/1.1 101 and WebSocket) on aiohttp.

After a valid ``POST /ts2021`` the handler answers 101, writes the 51-byte Noise response and
the HTTP/2 SETTINGS, and takes the socket over: ``request.protocol.set_parser(reader)`` makes
aiohttp hand every later byte to ``reader.feed_data`` instead of its HTTP parser.  This uses
aiohttp internals (checked on 3.13.5, C and pure-Python parsers); tests/unit/test_upgrade.py
covers it.  The handler then lives as long as the Noise connection.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging

from aiohttp import WSMsgType, web

from pyheadscale.control.h2server import H2ControlConnection
from pyheadscale.control.types import MAX_REQUEST_BODY, Dispatch
from pyheadscale.noise.handshake import HandshakeError, HandshakeResult, error_frame, respond
from pyheadscale.noise.keys import mkey, public_key

log = logging.getLogger(__name__)

UPGRADE_PROTOCOL = "tailscale-control-protocol"
HANDSHAKE_HEADER = "X-Tailscale-Handshake"
# Clients older than this cannot speak Noise at all (Headscale's NoiseCapabilityVersion).
NOISE_CAPABILITY_VERSION = 39
DEFAULT_MIN_CAPVER = 113


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text + "\n", content_type="text/plain")


def _decode_handshake(value: str) -> bytes | None:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


class _TakeoverReader:
    """Receives the raw bytes aiohttp reads after the 101 (duck-typed WebReader)."""

    def __init__(self, conn: H2ControlConnection) -> None:
        self._conn = conn

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._conn.feed(bytes(data))
        return False, b""

    def feed_eof(self) -> None:
        self._conn.feed_eof()


class _HttpSink:
    def __init__(self, request: web.BaseRequest, resp: web.StreamResponse) -> None:
        self._request = request
        self._resp = resp

    async def write(self, data: bytes) -> None:
        await self._resp.write(data)

    async def close(self) -> None:
        transport = self._request.transport
        if transport is not None:
            transport.close()


class _WsSink:
    def __init__(self, ws: web.WebSocketResponse) -> None:
        self._ws = ws

    async def write(self, data: bytes) -> None:
        await self._ws.send_bytes(data)

    async def close(self) -> None:
        await self._ws.close()


class Ts2021Server:
    """Holds the server key and the live Noise connections of one aiohttp app."""

    def __init__(
        self,
        noise_private_key: bytes,
        dispatch: Dispatch,
        min_capver: int = DEFAULT_MIN_CAPVER,
        max_body: int = MAX_REQUEST_BODY,
    ) -> None:
        self.private_key = bytes(noise_private_key)
        self.public_key = public_key(self.private_key)
        self.dispatch = dispatch
        self.min_capver = min_capver
        self.max_body = max_body
        self.connections: set[H2ControlConnection] = set()

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

    # -- /ts2021 -------------------------------------------------------------------------

    async def handle_ts2021(self, request: web.Request) -> web.StreamResponse:
        upgrade = request.headers.get("Upgrade", "")
        if not upgrade:
            log.warning("/ts2021 without an Upgrade header: is a reverse proxy dropping it?")
            return _text(400, "missing next protocol (Upgrade header)")
        if upgrade.lower() == "websocket":
            return await self._websocket(request)
        if upgrade.lower() != UPGRADE_PROTOCOL:
            return _text(400, f"unknown next protocol {upgrade!r}")
        hs = request.headers.get(HANDSHAKE_HEADER)
        if not hs:
            return _text(400, "missing X-Tailscale-Handshake header")
        init = _decode_handshake(hs)
        if init is None:
            return _text(400, "invalid X-Tailscale-Handshake header (not base64)")
        return await self._takeover(request, init)

    def _handshake(self, init: bytes) -> HandshakeResult | str:
        try:
            return respond(self.private_key, init, self.min_capver)
        except HandshakeError as e:
            return str(e)

    async def _takeover(self, request: web.Request, init: bytes) -> web.StreamResponse:
        result = self._handshake(init)
        protocol = request.protocol
        if protocol is None or request.transport is None:
            raise ConnectionResetError("client went away")
        resp = web.StreamResponse(
            status=101,
            reason="Switching Protocols",
            headers={"Upgrade": UPGRADE_PROTOCOL, "Connection": "upgrade"},
        )
        await resp.prepare(request)
        if isinstance(result, str):
            log.info("refusing Noise handshake from %s: %s", request.remote, result)
            await resp.write(error_frame(result))
            request.transport.close()
            return resp
        conn = H2ControlConnection(
            records=result.records(),
            sink=_HttpSink(request, resp),
            dispatch=self.dispatch,
            machine_key=result.peer_static,
            capver=result.version,
            max_body=self.max_body,
        )
        # From here on aiohttp's HTTP parser is bypassed.  Nothing awaits between
        # set_parser and start(), and the client sends nothing before our handshake reply.
        protocol.set_parser(_TakeoverReader(conn))
        conn.start(preamble=result.message)
        await self._serve(conn)
        return resp

    async def _serve(self, conn: H2ControlConnection) -> None:
        self.connections.add(conn)
        try:
            await conn.wait_closed()
        finally:
            # Also reached when aiohttp cancels the handler (handler_cancellation=True).
            conn.close("handler finished")
            self.connections.discard(conn)

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        # Handshake from the query string; "+" may arrive as a space if not %-escaped.
        hs = request.query.get(HANDSHAKE_HEADER, "").replace(" ", "+")
        if not hs:
            return _text(400, "missing X-Tailscale-Handshake query parameter")
        init = _decode_handshake(hs)
        if init is None:
            return _text(400, "invalid X-Tailscale-Handshake parameter (not base64)")
        ws = web.WebSocketResponse(protocols=(UPGRADE_PROTOCOL,), compress=False)
        await ws.prepare(request)
        if ws.ws_protocol != UPGRADE_PROTOCOL:
            await ws.close(code=1008, message=b"subprotocol tailscale-control-protocol required")
            return ws
        result = self._handshake(init)
        if isinstance(result, str):
            await ws.send_bytes(error_frame(result))
            await ws.close()
            return ws
        conn = H2ControlConnection(
            records=result.records(),
            sink=_WsSink(ws),
            dispatch=self.dispatch,
            machine_key=result.peer_static,
            capver=result.version,
            max_body=self.max_body,
        )
        conn.start(preamble=result.message)
        self.connections.add(conn)
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    conn.feed(msg.data)
                else:
                    conn.close("unexpected WebSocket message type")
                if conn.closing:
                    break
            conn.feed_eof()
            await conn.wait_closed()
        finally:
            conn.close("websocket closed")
            self.connections.discard(conn)
        return ws

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
    min_capver: int = DEFAULT_MIN_CAPVER,
) -> None:
    """Register ``GET /key`` and ``GET|POST /ts2021`` on ``app``.

    ``dispatch`` receives every HTTP/2 request made over an established Noise connection.
    Clients whose capability version is below ``min_capver`` get a Noise error frame.
    """
    server = Ts2021Server(noise_private_key, dispatch, min_capver)
    app[_APP_KEY] = server
    app.router.add_route("GET", "/key", server.handle_key)
    app.router.add_route("POST", "/ts2021", server.handle_ts2021)
    app.router.add_route("GET", "/ts2021", server.handle_ts2021)
    app.on_shutdown.append(server.on_shutdown)


def get_server(app: web.Application) -> Ts2021Server:
    """The ``Ts2021Server`` that ``add_routes`` attached to ``app``."""
    return app[_APP_KEY]
