"""The HTTP/1.1 front door of a listener: the one way a connection is taken over.

Every accepted connection starts here.  h11 parses each request head (bounded in size and
time); a router then answers it (``Reply``), takes the connection over (``Upgrade``: a 101,
or no response at all for DERP's fast start; ``WebSocket``), or, when it does not know the
path, hands the request to a fallback HTTP/1.1 protocol (pyheadscale's aiohttp application).

A takeover receives the transport and every byte that arrived after the request head
(h11's ``trailing_data``), so bytes a client pipelines behind its upgrade request are never
lost; the new protocol then owns the transport and the door is out of the data path.

Requests for the fallback are re-serialised from h11's events and fed to it one exchange at a
time through a virtual transport; a client-role h11 connection reads the fallback's output to
see where each response ends.  That is what lets an upgrade arrive on a keep-alive
connection that already carried ordinary requests: reverse proxies (Caddy, Traefik, nginx
with upstream keepalive) reuse pooled upstream connections for ``/ts2021`` and ``/derp``.
The fallback only ever sees complete, validated requests without ``Upgrade``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import h11
from wsproto.utilities import generate_accept_token

log = logging.getLogger("derp.frontdoor")

MAX_HEAD = 16 << 10
HEAD_TIMEOUT = 30.0  # for the first request head of a connection
IDLE_TIMEOUT = 75.0  # between requests on a keep-alive connection (aiohttp's default)

Headers = tuple[tuple[str, str], ...]

_REASONS = {
    101: "Switching Protocols", 200: "OK", 204: "No Content", 302: "Found",
    400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    413: "Content Too Large", 426: "Upgrade Required", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 503: "Service Unavailable",
}
TEXT: Headers = (("Content-Type", "text/plain; charset=utf-8"),
                 ("X-Content-Type-Options", "nosniff"))


def unmap_ip(ip: str) -> str:
    """``::ffff:192.0.2.1`` -> ``192.0.2.1`` (a dual-stack socket's view of an IPv4 peer)."""
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


@dataclass(frozen=True, slots=True)
class RequestHead:
    """One parsed request head: what a router decides on."""

    method: str
    target: str
    version: str  # "1.1" or "1.0"
    headers: Headers  # names lower-cased, in arrival order
    peer: tuple[str, int]  # the TCP peer
    tls: bool
    client: str = ""  # the client's address: the peer's, or what a trusted proxy says

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header(self, name: str) -> str | None:
        """The header's value; repeated headers are joined with ", " as RFC 9110 allows."""
        values = [v for k, v in self.headers if k == name]
        return ", ".join(values) if values else None

    def tokens(self, name: str) -> list[str]:
        """A comma-separated header as lower-case tokens (Connection, Sec-WebSocket-Protocol)."""
        return [t.strip().lower() for t in (self.header(name) or "").split(",") if t.strip()]


class Attach(Protocol):
    """Start the protocol that takes a connection over.

    ``prefix`` (the 101 response, or b"") must be written before anything else, ideally in
    the same write; ``surplus`` are bytes the client sent after its request head.  Returns
    the protocol that will receive the transport's further callbacks.
    """

    def __call__(self, transport: asyncio.Transport, prefix: bytes,
                 surplus: bytes) -> asyncio.BaseProtocol: ...


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes = b""
    headers: Headers = ()
    close: bool = False


@dataclass(frozen=True, slots=True)
class Upgrade:
    """Take the connection over; ``headers`` of the 101, or None to send no response."""

    attach: Attach
    headers: Headers | None


@dataclass(frozen=True, slots=True)
class WebSocket:
    """Accept an RFC 6455 WebSocket with ``subprotocol`` and carry a byte stream over it."""

    attach: Attach
    subprotocol: str


Route = Reply | Upgrade | WebSocket | None  # None: not this router's path
Router = Callable[[RequestHead], Route]
# After each exchange: the request, the response status (101 for a takeover) and seconds.
OnExchange = Callable[[RequestHead, int, float], None]


class ClientResolver(Protocol):
    """Who the client is behind a reverse proxy (pyheadscale's trusted_proxies)."""

    def client(self, peer: str, headers: Headers) -> str:
        """The client's address for a request from ``peer``."""
        ...

    def strip(self, peer: str, headers: Headers) -> Headers | None:
        """``headers`` without proxy headers a handler must not believe; None: keep all."""
        ...


def first_match(routers: Sequence[Router]) -> Router:
    """One router that asks each of ``routers`` in turn."""
    def route(head: RequestHead) -> Route:
        for r in routers:
            found = r(head)
            if found is not None:
                return found
        return None
    return route


def response_bytes(status: int, body: bytes = b"", headers: Headers = (), *,
                   close: bool = False, head_only: bool = False) -> bytes:
    """An HTTP/1.1 response with Content-Length (none on 1xx/204/304, which have no body)."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    bodiless = status < 200 or status in (204, 304)
    if not bodiless:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return out if bodiless or head_only else out + body


def _websocket_accept(head: RequestHead, subprotocol: str) -> Reply | Headers:
    """RFC 6455 section 4.2: the 101's headers, or the reply refusing the handshake."""
    if head.method != "GET" or head.version != "1.1" or "upgrade" not in head.tokens("connection"):
        return Reply(400, b"bad WebSocket handshake\n", TEXT)
    if head.header("sec-websocket-version") != "13":
        return Reply(426, b"unsupported WebSocket version\n",
                     TEXT + (("Sec-WebSocket-Version", "13"),))
    key = head.header("sec-websocket-key")
    if not key:
        return Reply(400, b"missing Sec-WebSocket-Key\n", TEXT)
    if subprotocol not in head.tokens("sec-websocket-protocol"):
        return Reply(400, f"client must speak the {subprotocol} subprotocol\n".encode(), TEXT)
    return (("Upgrade", "websocket"), ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", generate_accept_token(key.encode("latin-1")).decode()),
            ("Sec-WebSocket-Protocol", subprotocol))


def _keep_alive(head: RequestHead) -> bool:
    # h11's rule: HTTP/1.0 connections close after one exchange.
    return head.version == "1.1" and "close" not in head.tokens("connection")


class FrontDoor(asyncio.Protocol):
    """One accepted connection until a router takes it over (or it closes)."""

    def __init__(self, router: Router,
                 fallback: Callable[[], asyncio.Protocol] | None = None,
                 on_accept: Callable[[asyncio.Transport], None] | None = None, *,
                 resolver: ClientResolver | None = None,
                 on_exchange: OnExchange | None = None) -> None:
        self._router = router
        self._fallback = fallback
        self._on_accept = on_accept
        self._resolver = resolver
        self._on_exchange = on_exchange
        self._started = 0.0
        self._dropped: frozenset[bytes] = frozenset()  # header names the fallback must not see
        self._t: asyncio.Transport | None = None
        self._in = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._peer: tuple[str, int] = ("", 0)
        self._tls = False
        self._timer: asyncio.TimerHandle | None = None
        self._head: RequestHead | None = None  # the exchange in progress
        self._keep = True
        self._paused: set[str] = set()  # why reading is paused: "app", "pipeline"
        self._app: _Fallback | None = None
        self._done = False  # taken over, or closing: parse nothing more

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._t = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._peer = (unmap_ip(str(peer[0])), int(peer[1]))
        self._tls = transport.get_extra_info("sslcontext") is not None
        if self._on_accept is not None:
            self._on_accept(transport)
        self._arm_timer(HEAD_TIMEOUT)

    def data_received(self, data: bytes) -> None:
        if self._t is None or self._done:
            return
        self._in.receive_data(data)
        self._pump()

    def eof_received(self) -> bool:
        if self._done:
            return False
        self._in.receive_data(b"")
        self._pump()
        # Keep the write side open until a pending response is out (TCP only: asyncio's TLS
        # transport closes regardless and warns about a true answer).
        return not self._tls

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._t = None
        if self._app is not None:
            self._app.lost(exc)
            self._app = None

    def pause_writing(self) -> None:
        if self._app is not None:
            self._app.proto.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None:
            self._app.proto.resume_writing()

    # -- timers and reading ----------------------------------------------------------------

    def _arm_timer(self, delay: float) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timeout(self) -> None:
        self._timer = None
        if self._t is not None and self._head is None and not self._done:
            self._t.close()

    def _pause(self, why: str, paused: bool) -> None:
        t = self._t
        before = bool(self._paused)
        if paused:
            self._paused.add(why)
        else:
            self._paused.discard(why)
        if t is not None and before != bool(self._paused):
            (t.pause_reading if self._paused else t.resume_reading)()

    # -- parsing ---------------------------------------------------------------------------

    def _pump(self) -> None:
        while self._t is not None and not self._done:
            if "app" in self._paused:
                return
            try:
                ev = self._in.next_event()
            except h11.RemoteProtocolError as e:
                self._bad_request(e)
                return
            if ev is h11.NEED_DATA:
                return
            if ev is h11.PAUSED:
                # The request is complete and its response is not: stop reading pipelined
                # requests until it is (h11 holds what already arrived).
                self._pause("pipeline", True)
                return
            if isinstance(ev, h11.Request):
                self._on_request(ev)
            elif isinstance(ev, h11.Data):
                if self._app is not None and self._app.busy:
                    self._app.body(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                self._on_request_end(ev)
            elif isinstance(ev, h11.ConnectionClosed):
                self._close()
                return

    def _bad_request(self, e: h11.RemoteProtocolError) -> None:
        t = self._t
        if t is None:
            return
        if self._head is None:  # nothing in flight: say why, then close
            status = e.error_status_hint if e.error_status_hint in _REASONS else 400
            t.write(response_bytes(status, f"{e}\n".encode(), TEXT, close=True))
            self._close()
        else:
            self._done = True
            t.abort()

    def _on_request(self, req: h11.Request) -> None:
        self._cancel_timer()
        # h11 bounds only heads that arrive in pieces; one read can hold a larger one.
        size = len(req.target) + sum(len(k) + len(v) + 4 for k, v in req.headers)
        if size > MAX_HEAD:
            self._head = None
            self._bad_request(h11.RemoteProtocolError("request head too large", 431))
            return
        names = {k for k, _ in req.headers}
        if b"transfer-encoding" in names and b"content-length" in names:
            # RFC 9112 section 6.3: a smuggling pattern; refuse it rather than pick one.
            self._bad_request(h11.RemoteProtocolError(
                "both Transfer-Encoding and Content-Length", 400))
            return
        self._started = time.monotonic()
        headers = tuple((k.decode("ascii"), v.decode("latin-1")) for k, v in req.headers)
        client, self._dropped = self._peer[0], frozenset()
        if self._resolver is not None:
            kept = self._resolver.strip(self._peer[0], headers)
            if kept is not None:
                self._dropped = frozenset(k.encode() for k, _ in headers) - {
                    k.encode() for k, _ in kept}
                headers = kept
            client = self._resolver.client(self._peer[0], headers)
        head = RequestHead(
            method=req.method.decode("ascii"), target=req.target.decode("latin-1"),
            version=req.http_version.decode("ascii"), headers=headers,
            peer=self._peer, tls=self._tls, client=client)
        self._head = head
        self._keep = _keep_alive(head)
        if head.method == "CONNECT":
            self._reply(Reply(405, b"CONNECT is not supported\n", TEXT, close=True))
            return
        try:
            route = self._router(head)
        except Exception:
            log.exception("router failed on %s %s", head.method, head.path)
            route = Reply(500, b"internal error\n", TEXT, close=True)
        if isinstance(route, Upgrade | WebSocket):
            self._takeover(route, head)
        elif isinstance(route, Reply):
            self._reply(route)
        elif self._fallback is not None:
            if self._app is None:
                self._app = _Fallback(self, self._fallback())
            self._app.request(req, head)
        else:
            self._reply(Reply(404, b"404 page not found\n", TEXT))

    def _reply(self, r: Reply) -> None:
        assert self._t is not None and self._head is not None
        self._keep = self._keep and not r.close
        self._t.write(response_bytes(r.status, r.body, r.headers, close=not self._keep,
                                     head_only=self._head.method == "HEAD"))
        self._exchanged(r.status)
        # The exchange ends at the request's EndOfMessage (its body, if any, is discarded).

    def _on_request_end(self, ev: h11.EndOfMessage) -> None:
        if self._app is not None and self._app.busy:
            self._app.body_end(ev)  # the exchange ends when the fallback's response does
        else:
            self._end_exchange()

    def _exchanged(self, status: int) -> None:
        if self._on_exchange is not None and self._head is not None:
            try:
                self._on_exchange(self._head, status, time.monotonic() - self._started)
            except Exception:  # a logging hook must not take the connection down
                log.exception("on_exchange hook failed")

    def _end_exchange(self) -> None:
        """A request and its response are both complete: next request, or close."""
        self._head = None
        if not self._keep or self._t is None:
            self._close()
            return
        data, closed = self._in.trailing_data
        self._in = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        if data:
            self._in.receive_data(data)
        if closed:  # h11's end-of-stream marker is an empty receive
            self._in.receive_data(b"")
        self._arm_timer(IDLE_TIMEOUT)
        self._pause("pipeline", False)
        asyncio.get_running_loop().call_soon(self._pump)

    def _close(self) -> None:
        self._done = True
        if self._t is not None:
            self._t.close()

    # -- takeover --------------------------------------------------------------------------

    def _takeover(self, route: Upgrade | WebSocket, head: RequestHead) -> None:
        t = self._t
        assert t is not None
        # An upgrade request has no body: h11 reports its end at once, then waits (PAUSED)
        # for our decision, leaving everything after the head in trailing_data.
        if not isinstance(self._in.next_event(), h11.EndOfMessage):
            self._reply(Reply(400, b"an upgrade request has no body\n", TEXT, close=True))
            self._close()
            return
        accepted: Headers = ()
        if isinstance(route, WebSocket):
            checked = _websocket_accept(head, route.subprotocol)
            if isinstance(checked, Reply):
                self._reply(checked)
                self._end_exchange()
                return
            accepted = checked
        surplus, _ = self._in.trailing_data
        self._done = True
        self._cancel_timer()
        self._exchanged(101)
        if self._app is not None:  # the fallback served earlier requests on this connection
            self._app.lost(None)
            self._app = None
        if isinstance(route, WebSocket):
            from .websocket import WebSocketTransport

            t.write(response_bytes(101, headers=accepted))
            ws = WebSocketTransport(t)
            t.set_protocol(ws)
            ws.attach(route.attach(ws, b"", b""), surplus)
            return
        prefix = b"" if route.headers is None else response_bytes(101, headers=route.headers)
        t.set_protocol(route.attach(t, prefix, surplus))


class _Fallback:
    """The fallback protocol of one connection and the exchange it is serving."""

    def __init__(self, door: FrontDoor, proto: asyncio.Protocol) -> None:
        self.door = door
        self.proto = proto
        self.vt = _FallbackTransport(self)
        self.busy = False  # an exchange is in progress
        self._request_open = False
        self._chunked = False
        self._out: h11.Connection | None = None  # reads the fallback's response
        self.status = 0
        self._detached = False
        proto.connection_made(self.vt)

    def request(self, req: h11.Request, head: RequestHead) -> None:
        self.busy = True
        self.status = 0
        self._request_open = True
        out = h11.Connection(h11.CLIENT)
        # The tracker only needs the method (HEAD has no body) to find the response's end.
        out.send(h11.Request(method=req.method, target=req.target, headers=[("Host", "x")]))
        out.send(h11.EndOfMessage())
        self._out = out
        self._chunked = False
        lines = [b"%s %s HTTP/%s" % (req.method, req.target, req.http_version)]
        # h11 accepts no Transfer-Encoding but chunked, and the door refused it beside
        # Content-Length: the framing is unambiguous.
        self._chunked = any(k == b"transfer-encoding" for k, _ in req.headers)
        dropped = self.door._dropped
        for name, value in req.headers.raw_items():
            low = name.lower()
            if low == b"upgrade" or low in dropped:  # the door owns upgrades
                continue
            if low == b"connection":
                value = b", ".join(t for t in (x.strip() for x in value.split(b","))
                                   if t and t.lower() != b"upgrade")
                if not value:
                    continue
            lines.append(name + b": " + value)
        self.proto.data_received(b"\r\n".join(lines) + b"\r\n\r\n")

    def body(self, data: bytes) -> None:
        if self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self.proto.data_received(data)

    def body_end(self, ev: h11.EndOfMessage) -> None:
        if self._chunked:
            trailers = b"".join(k + b": " + v + b"\r\n" for k, v in ev.headers.raw_items())
            self.proto.data_received(b"0\r\n" + trailers + b"\r\n")
        self._request_open = False
        if self._out is None:  # the response was already complete
            self._exchange_done()

    def output(self, data: bytes) -> None:
        t = self.door._t
        if self._detached or t is None:
            return
        t.write(data)
        out = self._out
        if out is None:
            return
        out.receive_data(data)
        while True:
            try:
                ev = out.next_event()
            except h11.RemoteProtocolError as e:
                log.error("fallback wrote an unparsable response: %s", e)
                t.abort()
                return
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return
            if isinstance(ev, h11.Response):
                self.status = ev.status_code
            elif isinstance(ev, h11.EndOfMessage):
                self._out = None
                if not self._request_open:
                    self._exchange_done()
                return

    def _exchange_done(self) -> None:
        self.busy = False
        self.door._exchanged(self.status)
        self.door._end_exchange()

    def closed_by_app(self) -> None:
        if self._detached:
            return
        if self._out is not None:  # a response delimited by the end of the connection
            self.output(b"")
        self.door._close()

    def lost(self, exc: Exception | None) -> None:
        """The connection is gone, or taken over: the fallback must forget it."""
        if self._detached:
            return
        self._detached = True
        self.proto.connection_lost(exc)


class _FallbackTransport(asyncio.Transport):
    """What the fallback protocol sees as its transport: the real one, one exchange at a time."""

    def __init__(self, fb: _Fallback) -> None:
        super().__init__()
        self._fb = fb
        self._closing = False

    def _real(self) -> asyncio.Transport | None:
        return None if self._fb._detached else self._fb.door._t

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing:
            self._fb.output(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        t = self._real()
        return self._closing or t is None or t.is_closing()

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._fb.closed_by_app()

    def abort(self) -> None:
        self._closing = True
        t = self._real()
        if t is not None:
            t.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        t = self._fb.door._t
        return default if t is None else t.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._fb.door._pause("app", True)

    def resume_reading(self) -> None:
        door = self._fb.door
        door._pause("app", False)
        if door._t is not None:
            asyncio.get_running_loop().call_soon(door._pump)

    def is_reading(self) -> bool:
        return "app" not in self._fb.door._paused

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        t = self._real()
        if t is not None:
            t.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        t = self._real()
        return 0 if t is None else t.get_write_buffer_size()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        raise NotImplementedError("the front door owns protocol switches")

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._fb.proto
