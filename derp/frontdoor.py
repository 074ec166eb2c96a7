"""The HTTP/1.1 front door of a listener: the one way a connection is taken over.

Every accepted connection starts here.  h11 parses each request head (bounded in size and
time); a router then answers it (``Reply``), takes the connection over (``Upgrade``: a 101,
or no response at all for DERP's fast start; ``WebSocket``), or, when it does not know the
path, hands the request to a fallback HTTP/1.1 protocol (pyheadscale's aiohttp application).

A takeover receives the transport and every byte that arrived after the request head
(h11's ``trailing_data``), so bytes a client pipelines behind its upgrade request are never
lost; the new protocol then owns the transport and the door is out of the data path.

Requests for the fallback go through ``passthrough.Passthrough`` one exchange at a time, so
an upgrade may arrive on a keep-alive connection that already carried ordinary requests:
reverse proxies (Caddy, Traefik, nginx with upstream keepalive) reuse pooled upstream
connections for ``/ts2021`` and ``/derp``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import h11
from wsproto.utilities import generate_accept_token

from .gate import SourceGate
from .passthrough import Passthrough
from .websocket import WebSocketTransport

log = logging.getLogger("derp.frontdoor")

MAX_HEAD = 16 << 10
HEAD_TIMEOUT = 30.0  # for the first request head of a connection
IDLE_TIMEOUT = 75.0  # between requests on a keep-alive connection (aiohttp's default)


@dataclass(frozen=True)
class DoorLimits:
    """Bounds of one listener's connections before any takeover (pyheadscale's `limits:`)."""

    head_timeout: float = HEAD_TIMEOUT  # accept (after TLS) to a complete first head
    idle_timeout: float = IDLE_TIMEOUT  # between requests on a kept-alive connection
    gate: SourceGate | None = None  # open connections per source address, if limited

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


def origin_form(target: str) -> str:
    """``http://host:port/p?q`` -> ``/p?q`` (``/`` when the path is empty); an origin-form
    target (``/p?q``), ``*`` and anything else come back unchanged."""
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return target
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    tail = rest[cut:]
    return tail if tail.startswith("/") else "/" + tail


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
    def origin(self) -> str:
        """The target in origin form: ``/path?query``.  RFC 9112 section 3.2.2 has servers
        accept the absolute form (``POST http://host:port/ts2021``) too, and clients built on
        hyper's HTTP/1.1 connection (tailscale-rs) send it for /key, /ts2021 and /derp."""
        return origin_form(self.target)

    @property
    def path(self) -> str:
        return self.origin.partition("?")[0]

    @property
    def query(self) -> str:
        return self.origin.partition("?")[2]

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
# After each exchange: the request, the response status (101 for a takeover), the response
# body's size in bytes and the seconds it took.
OnExchange = Callable[[RequestHead, int, int, float], None]


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
                 on_exchange: OnExchange | None = None,
                 limits: DoorLimits | None = None) -> None:
        self._router = router
        self._limits = limits or DoorLimits()
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
        self._app: Passthrough | None = None
        self._done = False  # taken over, or closing: parse nothing more

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's (the standalone relay's loop) duck-type asyncio's
        # Transport without subclassing it, so this is a cast, not an isinstance check.
        transport = cast(asyncio.Transport, transport)
        self._t = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._peer = (unmap_ip(str(peer[0])), int(peer[1]))
        self._tls = transport.get_extra_info("sslcontext") is not None
        gate = self._limits.gate
        if gate is not None and not gate.admit(self._peer[0],
                                               transport.get_extra_info("socket")):
            self._done = True
            transport.abort()  # over its source's limit: nothing is read or answered
            return
        if self._on_accept is not None:
            self._on_accept(transport)
        self._arm_timer(self._limits.head_timeout)

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
                self._app = Passthrough(self, self._fallback())
            self._app.request(req)
        else:
            self._reply(Reply(404, b"404 page not found\n", TEXT))

    def _reply(self, r: Reply) -> None:
        assert self._t is not None and self._head is not None
        self._keep = self._keep and not r.close
        self._t.write(response_bytes(r.status, r.body, r.headers, close=not self._keep,
                                     head_only=self._head.method == "HEAD"))
        self._exchanged(r.status, 0 if self._head.method == "HEAD" else len(r.body))
        # The exchange ends at the request's EndOfMessage (its body, if any, is discarded).

    def _on_request_end(self, ev: h11.EndOfMessage) -> None:
        if self._app is not None and self._app.busy:
            self._app.body_end(ev)  # the exchange ends when the fallback's response does
        else:
            self._end_exchange()

    def _exchanged(self, status: int, size: int) -> None:
        if self._on_exchange is not None and self._head is not None:
            try:
                self._on_exchange(self._head, status, size, time.monotonic() - self._started)
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
        self._arm_timer(self._limits.idle_timeout)
        self._pause("pipeline", False)
        asyncio.get_running_loop().call_soon(self._pump)

    def _close(self) -> None:
        self._done = True
        if self._t is not None:
            self._t.close()

    # -- what the fallback's bridge (passthrough.py) may use -------------------------------

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._t

    @property
    def dropped_headers(self) -> frozenset[bytes]:
        """Names of proxy headers the current request must not carry to the fallback."""
        return self._dropped

    @property
    def app_paused(self) -> bool:
        return "app" in self._paused

    def set_app_paused(self, paused: bool) -> None:
        """The fallback's flow control: stop (or resume) reading from the client."""
        self._pause("app", paused)
        if not paused and self._t is not None:
            asyncio.get_running_loop().call_soon(self._pump)

    def exchange_done(self, status: int, size: int) -> None:
        """The fallback finished its response (``status``, ``size`` body bytes)."""
        self._exchanged(status, size)
        self._end_exchange()

    def close(self) -> None:
        self._close()

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
        self._exchanged(101, 0)
        if self._app is not None:  # the fallback served earlier requests on this connection
            self._app.lost(None)
            self._app = None
        if isinstance(route, WebSocket):
            t.write(response_bytes(101, headers=accepted))
            ws = WebSocketTransport(t)
            t.set_protocol(ws)
            ws.attach(route.attach(ws, b"", b""), surplus)
            return
        prefix = b"" if route.headers is None else response_bytes(101, headers=route.headers)
        t.set_protocol(route.attach(t, prefix, surplus))
