"""The main listener: derp's h11 front door first, the aiohttp application behind it.

Routes that take a socket over (``/ts2021``, the embedded relay's ``/derp``) are front-door
routes, registered on the application with ``add_takeover_route``; every other request goes
to aiohttp.  aiohttp's low-level ``web.Server`` (``runner.server``) is the documented
protocol factory of an ``AppRunner``; the door feeds it complete requests one at a time and
never uses aiohttp's internals, so any aiohttp release works.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from derp.frontdoor import DoorLimits, FrontDoor, RequestHead, Route, Router, first_match
from derp.gate import SourceGate
from pyheadscale import metrics
from pyheadscale.config.schema import LimitsConfig
from pyheadscale.logs import fields
from pyheadscale.realip import RealIP
from pyheadscale.servertls import ServerTLS, peek_client_hello

log = logging.getLogger(__name__)
access_log = logging.getLogger("pyheadscale.access")
_REAL_IP = web.AppKey("pyheadscale_real_ip", RealIP)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def log_exchange(head: RequestHead, status: int, size: int, seconds: float) -> None:
    """One access-log line per request on the main listener, with Headscale's fields ("http
    request" with method, path, proto, remote, status, bytes, elapsed); the query string is
    left out, as in Headscale (OIDC callbacks carry codes in it)."""
    access_line(head.method, head.path, f"HTTP/{head.version}", head.client, status, size,
                seconds)


def access_line(method: str, path: str, proto: str, remote: str, status: int, size: int,
                seconds: float) -> None:
    access_log.info("http request", extra=fields(
        method=method, path=path, proto=proto, remote=remote, status=status, bytes=size,
        elapsed=f"{seconds * 1000:.1f}ms"))


def endpoint_of(request: web.Request) -> str:
    """go-chi/metrics' endpoint label: method and route pattern, or "<no-match>"."""
    info = request.match_info
    resource = info.route.resource if info is not None and info.http_exception is None else None
    return f"{request.method} {resource.canonical}" if resource is not None else "<no-match>"


@web.middleware
async def http_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Headscale's HTTP series (http_requests_total, _inflight, _duration) for the requests
    aiohttp serves; takeovers are counted by the listener's exchange hook."""
    upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
    proto = f"HTTP/{request.version.major}.{request.version.minor}" + (
        " WebSocket" if upgrade else "")
    start = time.monotonic()
    status, aborted = 500, False
    metrics.http_inflight.labels("", proto).inc()
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as e:
        status = e.status
        raise
    except asyncio.CancelledError:
        aborted = True
        raise
    finally:
        metrics.http_inflight.labels("", proto).dec()
        metrics.http_request(endpoint_of(request), proto, status, time.monotonic() - start,
                             aborted=aborted)


@web.middleware
async def socket_access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The access log for an aiohttp application the front door does not see (the CLI's
    unix socket): the same line, `remote=unix`."""
    start = time.monotonic()
    status, size = 500, 0
    try:
        resp = await handler(request)
        status = resp.status
        size = getattr(resp, "content_length", None) or 0
        return resp
    except web.HTTPException as e:
        status = e.status
        raise
    finally:
        access_line(request.method, request.path, f"HTTP/{request.version.major}."
                    f"{request.version.minor}", "unix", status, size, time.monotonic() - start)


@web.middleware
async def real_ip_middleware(request: web.Request,
                             handler: Handler) -> web.StreamResponse:
    """``request.remote`` is the client behind a trusted proxy (the door stripped the proxy
    headers of untrusted peers before aiohttp saw the request)."""
    real_ip = request.app[_REAL_IP]
    peer = request.remote or ""
    client = real_ip.client(peer, tuple((k.lower(), v) for k, v in request.headers.items()))
    if client != peer:
        request = request.clone(remote=client)
    return await handler(request)

_TAKEOVER = web.AppKey("pyheadscale_takeover_routes", list[Router])


def add_takeover_route(app: web.Application, router: Router) -> None:
    """Serve ``router``'s paths on ``app``'s listener ahead of aiohttp's own routes."""
    if _TAKEOVER not in app:
        app[_TAKEOVER] = []
    app[_TAKEOVER].append(router)


def door_limits(c: LimitsConfig) -> DoorLimits:
    """The `limits:` of every listener's front door; one gate counts a source's connections
    on all of them."""
    gate = SourceGate(c.max_connections_per_source) if c.max_connections_per_source else None
    return DoorLimits(head_timeout=c.request_head_timeout.total_seconds(),
                      idle_timeout=c.keepalive_timeout.total_seconds(), gate=gate)


class MainListener:
    """One TCP (optionally TLS) listener serving ``app`` and its takeover routes.

    ``observed=False`` (the metrics listener) keeps the door's timeouts and limits but leaves
    its requests out of the access log and the HTTP series, as Headscale does for scrapes."""

    def __init__(self, app: web.Application, real_ip: RealIP | None = None,
                 limits: DoorLimits | None = None, *, observed: bool = True) -> None:
        self.app = app
        self.limits = limits or DoorLimits()
        self.observed = observed
        self.real_ip = real_ip or RealIP(())
        app[_REAL_IP] = self.real_ip
        app.middlewares.insert(0, real_ip_middleware)
        if observed:
            app.middlewares.insert(1, http_metrics)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self._server: asyncio.base_events.Server | None = None
        self._lsock: socket.socket | None = None  # the TLS-ALPN-01 accept loop's socket
        self._accepting: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int, tls: ServerTLS | None) -> None:
        await self.runner.setup()
        fallback = self.runner.server
        assert fallback is not None  # set by setup()
        routers: list[Router] = self.app[_TAKEOVER] if _TAKEOVER in self.app else []
        router = first_match(routers)
        # Requests the door answers or takes over (not aiohttp, whose middleware counts its
        # own), by head, until their exchange ends: their path is a fixed route.
        door_served: dict[int, RequestHead] = {}

        def routed(head: RequestHead) -> Route:
            route = router(head)
            if route is not None:
                if len(door_served) > 4096:  # exchanges that never ended: forget them
                    door_served.clear()
                door_served[id(head)] = head
            return route

        def exchanged(head: RequestHead, status: int, size: int, seconds: float) -> None:
            log_exchange(head, status, size, seconds)
            if door_served.pop(id(head), None) is head:
                proto = f"HTTP/{head.version}" + (" WebSocket" if status == 101 and any(
                    k == "upgrade" and v.lower() == "websocket" for k, v in head.headers)
                    else "")
                metrics.http_request(f"{head.method} {head.path}", proto, status, seconds)

        resolver = self.real_ip

        def door() -> FrontDoor:
            return FrontDoor(routed, fallback, resolver=resolver,
                             on_exchange=exchanged if self.observed else None,
                             limits=self.limits)

        loop = asyncio.get_running_loop()
        if tls is not None and tls.peek_alpn:
            lsock = socket.create_server((host, port), backlog=1024)
            lsock.setblocking(False)
            self._lsock = lsock
            self._accepting = loop.create_task(self._accept_loop(lsock, door, tls))
            return
        self._server = await loop.create_server(
            door, host or None, port, ssl=None if tls is None else tls.base,
            ssl_handshake_timeout=None if tls is None else self.limits.head_timeout,
            reuse_address=True, backlog=1024)

    async def _accept_loop(self, lsock: socket.socket, door: Callable[[], FrontDoor],
                           tls: ServerTLS) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(lsock)
            except OSError as e:  # out of file descriptors, ...: keep listening, as asyncio does
                log.error("accepting a connection failed: %s", e)
                await asyncio.sleep(1)
                continue
            task = loop.create_task(self._tls_accept(sock, door, tls))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _tls_accept(self, sock: socket.socket, door: Callable[[], FrontDoor],
                          tls: ServerTLS) -> None:
        """Pick the context from the ClientHello (TLS-ALPN-01), then serve as usual."""
        loop = asyncio.get_running_loop()
        try:
            # The ClientHello and the handshake share the request-head deadline.
            hello = await asyncio.wait_for(peek_client_hello(sock), self.limits.head_timeout)
            await loop.connect_accepted_socket(door, sock, ssl=tls.context_for(hello),
                                               ssl_handshake_timeout=self.limits.head_timeout)
        except (OSError, TimeoutError, ConnectionError) as e:
            log.debug("TLS connection failed before the handshake finished: %r", e)
            sock.close()

    @property
    def sockets(self) -> list[socket.socket]:
        if self._lsock is not None:
            return [self._lsock]
        return [] if self._server is None else list(self._server.sockets)

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._accepting is not None:
            self._accepting.cancel()
            for t in list(self._handshakes):
                t.cancel()
            assert self._lsock is not None
            with contextlib.suppress(OSError):
                self._lsock.close()
        # on_shutdown closes taken-over connections; aiohttp closes the ones it serves.
        await self.runner.cleanup()
