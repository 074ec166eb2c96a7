"""The relay's HTTP endpoints, as a front-door router (see ``frontdoor``).

``derp_router`` answers derper's paths: ``/derp`` (Upgrade: DERP, or a WebSocket with the
``derp`` subprotocol), ``/derp/probe``, ``/derp/latency-check``, ``/generate_204`` and
``/bootstrap-dns``.  pyheadscale mounts it on its main listener; ``serve_derp`` runs it alone
(with derper's ``/`` and ``/robots.txt``), and ``serve_port80`` is derper's plain-HTTP port.

``/derp`` hands the connection to the relay together with every byte that arrived after the
request head: with ``Derp-Fast-Start: 1`` the client sends its ClientInfo right behind the
request without waiting for a response.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
from collections.abc import Callable
from urllib.parse import parse_qs

from .frontdoor import (
    TEXT,
    DoorLimits,
    FrontDoor,
    Reply,
    RequestHead,
    Route,
    Router,
    Upgrade,
    WebSocket,
    first_match,
)
from .server import DerpServer

_CHALLENGE_RE = re.compile(r"[A-Za-z0-9._:\-]{0,64}")

HOME_PAGE = (
    b"<html><body>\n<h1>DERP</h1>\n<p>\n  This is a <a href=\"https://tailscale.com/\">"
    b"Tailscale</a> DERP server (pyheadscale).\n</p>\n</body></html>\n"
)

BootstrapDNS = Callable[[], dict[str, list[str]]]


def generate_204(head: RequestHead) -> Reply:
    """Captive-portal check: 204, echoing a well-formed ``X-Tailscale-Challenge``."""
    extra = [("Cache-Control", "no-cache, no-store, must-revalidate, no-transform, max-age=0")]
    ch = head.header("x-tailscale-challenge")
    if ch is not None and _CHALLENGE_RE.fullmatch(ch):
        extra.append(("X-Tailscale-Response", "response " + ch))
    return Reply(204, headers=tuple(extra))


def derp_router(server: DerpServer, *,
                bootstrap_dns: BootstrapDNS | None = None) -> Router:
    """Routes for the relay; paths it does not serve return None (for the next router)."""

    def attach(head: RequestHead) -> Callable[..., asyncio.BaseProtocol]:
        def start(transport: asyncio.Transport, prefix: bytes,
                  surplus: bytes) -> asyncio.BaseProtocol:
            # Behind a trusted proxy the client's address, not the proxy's (no port then).
            ip = head.client or head.peer[0]
            port = head.peer[1] if ip == head.peer[0] else 0
            conn = server.new_connection(ip, port,
                                         not_ideal=head.header("ideal-node") is not None)
            conn.start(transport, prefix, surplus)
            return conn
        return start

    def route(head: RequestHead) -> Route:
        path = head.path
        if path in ("/derp/probe", "/derp/latency-check"):
            if head.method in ("GET", "HEAD"):
                return Reply(200, headers=(("Access-Control-Allow-Origin", "*"),))
            return Reply(405, b"bogus probe method\n", TEXT)
        if path == "/generate_204":
            return generate_204(head)
        if path == "/derp":
            up = (head.header("upgrade") or "").lower()
            if up == "websocket" and "derp" in (head.header("sec-websocket-protocol") or ""):
                return WebSocket(attach(head), "derp")
            if up not in ("derp", "websocket"):
                return Reply(426, b"DERP requires connection upgrade\n", TEXT)
            if head.header("derp-fast-start") == "1":
                return Upgrade(attach(head), None)
            return Upgrade(attach(head), (
                ("Upgrade", "DERP"), ("Connection", "Upgrade"), ("Derp-Version", "2"),
                ("Derp-Public-Key", server.public_key.hex())))
        if path == "/bootstrap-dns" and bootstrap_dns is not None:
            return _bootstrap_dns(head, bootstrap_dns())
        return None

    return route


def _bootstrap_dns(head: RequestHead, table: dict[str, list[str]]) -> Reply:
    # Only names the operator configured (or the DERP map's own hosts) are answered: the
    # relay never resolves arbitrary names on behalf of clients.
    if head.method not in ("GET", "HEAD"):
        return Reply(405, b"method not allowed\n", TEXT)
    q = parse_qs(head.query).get("q", [""])[0]
    out = {q: table[q]} if q in table else ({} if q else table)
    return Reply(200, json.dumps(out).encode(), (("Content-Type", "application/json"),),
                 close=True)


def _derper_pages(head: RequestHead) -> Reply:
    if head.path == "/robots.txt":
        return Reply(200, b"User-agent: *\nDisallow: /\n", TEXT)
    if head.path == "/":
        return Reply(200, HOME_PAGE, (("Content-Type", "text/html; charset=utf-8"),))
    return Reply(404, b"404 page not found\n", TEXT)


def tune_socket(transport: asyncio.Transport) -> None:
    """derper's listener options: TCP keepalive 10 min, TCP_USER_TIMEOUT 15 s, no Nagle."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 600)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 600)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 15000)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


async def serve_derp(server: DerpServer, host: str, port: int,
                     ssl_context: ssl.SSLContext | None, *,
                     bootstrap_dns: dict[str, list[str]] | BootstrapDNS | None = None,
                     reuse_port: bool = False,
                     limits: DoorLimits | None = None) -> asyncio.base_events.Server:
    """Listen on host:port (TLS when ``ssl_context`` is given) and serve the DERP endpoints.

    Returns the started asyncio Server; ``server.close()`` stops accepting (existing DERP
    connections stay until ``await derp_server.close()``).  ``reuse_port`` lets several
    processes share the port (they must share the DERP key and mesh with each other).
    """
    if callable(bootstrap_dns):
        lookup = bootstrap_dns
    else:
        table = dict(bootstrap_dns or {})

        def lookup() -> dict[str, list[str]]:
            return table
    router = first_match([derp_router(server, bootstrap_dns=lookup), _derper_pages])
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: FrontDoor(router, on_accept=tune_socket, limits=limits),
        host, port, ssl=ssl_context, reuse_address=True, reuse_port=reuse_port or None,
        ssl_handshake_timeout=(limits or DoorLimits()).head_timeout if ssl_context else None,
        backlog=1024,
    )


async def serve_port80(host: str, port: int, *, https_host: str | None = None
                       ) -> asyncio.base_events.Server:
    """derper's plain-HTTP port: /generate_204, otherwise 302 to https (400 for non-GET)."""

    def route(head: RequestHead) -> Reply:
        if head.path == "/generate_204":
            return generate_204(head)
        if head.method in ("GET", "HEAD"):
            hostname = https_host or (head.header("host") or "").split(":")[0]
            return Reply(302, headers=(("Location", f"https://{hostname}{head.origin}"),))
        return Reply(400, b"Use HTTPS\n", TEXT)

    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: FrontDoor(route), host, port, reuse_address=True)
