"""HTTP/1.1 front door of the relay, as a plain asyncio protocol (no framework).

Parsing the request head ourselves lets ``/derp`` hand every byte that arrived after the head
to the DERP connection (fast start pipelines ClientInfo behind the request), and lets the
upgraded connection swap the transport's protocol so the hot path has no extra layer.

Served paths (derper's, see derp.md section 1.1): ``/derp`` (Upgrade: DERP, or WebSocket with
the ``derp`` subprotocol), ``/derp/probe``, ``/derp/latency-check``, ``/generate_204``,
``/bootstrap-dns``, ``/``, ``/robots.txt``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import socket
import ssl
from collections.abc import Iterable
from typing import Any

from .server import ClientConn, DerpServer

log = logging.getLogger("derp.http")

MAX_HEAD = 16 << 10
HEAD_TIMEOUT = 30.0
WS_MAX_FRAME = 2 << 20
_CHALLENGE_RE = re.compile(r"[A-Za-z0-9._:\-]{0,64}")
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B85"

_REASONS = {
    101: "Switching Protocols", 200: "OK", 204: "No Content", 302: "Found",
    400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    426: "Upgrade Required", 431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}

HOME_PAGE = (
    b"<html><body>\n<h1>DERP</h1>\n<p>\n  This is a <a href=\"https://tailscale.com/\">"
    b"Tailscale</a> DERP server (pyheadscale).\n</p>\n</body></html>\n"
)


def _unmap(ip: str) -> str:
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


class DerpHTTPProtocol(asyncio.Protocol):
    """One accepted TCP/TLS connection until (and unless) it upgrades to DERP."""

    def __init__(self, server: DerpServer | None, *, port80: bool = False,
                 bootstrap_dns: dict[str, list[str]] | None = None,
                 https_host: str | None = None) -> None:
        self.server = server
        self.port80 = port80
        self.bootstrap_dns = bootstrap_dns
        self.https_host = https_host
        self.transport: Any = None
        self._buf = bytearray()
        self._body_left = 0
        self._timer: asyncio.TimerHandle | None = None
        self._peer: tuple[str, int] = ("", 0)
        self._ws_conn: ClientConn | None = None
        self._ws_writer: _WSTransport | None = None
        self._ws_msg_open = False

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._peer = (_unmap(str(peer[0])), int(peer[1]))
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _tune_socket(sock)
        self._arm_timer()

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, self._on_timeout)

    def _on_timeout(self) -> None:
        self._timer = None
        if self.transport is not None and self._ws_conn is None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._ws_conn is not None:
            self._ws_conn.connection_lost(exc)
            self._ws_conn = None
        self.transport = None

    def pause_writing(self) -> None:
        if self._ws_conn is not None:
            self._ws_conn.pause_writing()

    def resume_writing(self) -> None:
        if self._ws_conn is not None:
            self._ws_conn.resume_writing()

    def data_received(self, data: bytes) -> None:  # type: ignore[override]
        if self._ws_conn is not None:
            self._buf += data
            self._ws_feed()
            return
        buf = self._buf
        buf += data
        while self.transport is not None and self._ws_conn is None:
            if self._body_left:
                k = min(self._body_left, len(buf))
                del buf[:k]
                self._body_left -= k
                if self._body_left:
                    return
            idx = buf.find(b"\r\n\r\n")
            if idx < 0:
                if len(buf) > MAX_HEAD:
                    self._respond(431, b"", close=True)
                return
            head = bytes(buf[:idx])
            del buf[: idx + 4]
            if not self._handle(head):
                return

    # ------------------------------------------------------------------------ requests

    def _handle(self, head: bytes) -> bool:
        """Handle one request head; False once the connection is handed over or closed."""
        try:
            text = head.decode("latin-1")
            lines = text.split("\r\n")
            method, target, version = lines[0].split(" ")
            if not version.startswith("HTTP/1."):
                raise ValueError(version)
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep or not name or name != name.strip():
                    raise ValueError(line)
                headers[name.lower()] = value.strip()
            clen = int(headers.get("content-length", "0") or "0")
            if clen < 0:
                raise ValueError("content-length")
        except ValueError:
            self._respond(400, b"bad request\n", close=True)
            return False
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._respond(400, b"chunked bodies not supported\n", close=True)
            return False
        self._body_left = clen
        close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
        path, _, query = target.partition("?")
        head_only = method == "HEAD"

        if path in ("/derp/probe", "/derp/latency-check") and not self.port80:
            if method in ("GET", "HEAD"):
                self._respond(200, b"", [("Access-Control-Allow-Origin", "*")],
                              close=close, head_only=head_only)
            else:
                self._respond(405, b"bogus probe method\n", _TEXT, close=close)
            return not close
        if path == "/generate_204":
            extra = [("Cache-Control",
                      "no-cache, no-store, must-revalidate, no-transform, max-age=0")]
            ch = headers.get("x-tailscale-challenge")
            if ch is not None and _CHALLENGE_RE.fullmatch(ch):
                extra.append(("X-Tailscale-Response", "response " + ch))
            self._respond(204, b"", extra, close=close, head_only=True)
            return not close
        if self.port80:
            if method in ("GET", "HEAD"):
                host = self.https_host or headers.get("host", "").split(":")[0]
                self._respond(302, b"", [("Location", f"https://{host}{target}")],
                              close=close, head_only=True)
            else:
                self._respond(400, b"Use HTTPS\n", _TEXT, close=close)
            return not close
        if (path == "/derp" or path.startswith("/derp/")) and self.server is not None:
            return self._upgrade(headers, close)
        if path == "/bootstrap-dns" and method in ("GET", "HEAD"):
            self._bootstrap_dns(query, head_only)
            return False
        if path == "/robots.txt":
            self._respond(200, b"User-agent: *\nDisallow: /\n", _TEXT, close=close,
                          head_only=head_only)
            return not close
        if path == "/":
            self._respond(200, HOME_PAGE, [("Content-Type", "text/html; charset=utf-8")],
                          close=close, head_only=head_only)
            return not close
        self._respond(404, b"404 page not found\n", _TEXT, close=close, head_only=head_only)
        return not close

    def _upgrade(self, headers: dict[str, str], close: bool) -> bool:
        assert self.server is not None
        up = headers.get("upgrade", "").lower()
        if up not in ("derp", "websocket"):
            self._respond(426, b"DERP requires connection upgrade\n", _TEXT, close=close)
            return not close
        not_ideal = "ideal-node" in headers
        conn = self.server.new_connection(self._peer[0], self._peer[1], not_ideal=not_ideal)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if up == "websocket" and "derp" in headers.get("sec-websocket-protocol", ""):
            wskey = headers.get("sec-websocket-key", "")
            accept = base64.b64encode(hashlib.sha1(wskey.encode() + _WS_GUID).digest())
            resp = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept +
                    b"\r\nSec-WebSocket-Protocol: derp\r\n\r\n")
            self.transport.write(resp)
            self._ws_writer = _WSTransport(self.transport)
            self._ws_conn = conn
            conn.start(self._ws_writer)
            if self._buf:
                self._ws_feed()
            return False
        surplus = bytes(self._buf)
        self._buf.clear()
        transport = self.transport
        self.transport = None
        prefix = b""
        if headers.get("derp-fast-start") != "1":
            prefix = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n"
                      b"Connection: Upgrade\r\nDerp-Version: 2\r\nDerp-Public-Key: " +
                      self.server.public_key.hex().encode() + b"\r\n\r\n")
        transport.set_protocol(conn)
        conn.start(transport, prefix, surplus)
        return False

    def _bootstrap_dns(self, query: str, head_only: bool) -> None:
        # Only names configured by the operator are answered: the relay never resolves
        # arbitrary names on behalf of clients.
        from urllib.parse import parse_qs

        q = parse_qs(query).get("q", [""])[0]
        table = self.bootstrap_dns or {}
        out = {q: table[q]} if q in table else ({} if q else table)
        body = json.dumps(out).encode()
        self._respond(200, body, [("Content-Type", "application/json")], close=True,
                      head_only=head_only)

    def _respond(self, status: int, body: bytes, headers: Iterable[tuple[str, str]] = (),
                 *, close: bool = False, head_only: bool = False) -> None:
        t = self.transport
        if t is None:
            return
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        for k, v in headers:
            lines.append(f"{k}: {v}")
        if status not in (204, 101):
            lines.append(f"Content-Length: {len(body)}")
        if close:
            lines.append("Connection: close")
        out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if not head_only and status != 204:
            out += body
        t.write(out)
        if close:
            t.close()
            self.transport = None
        else:
            self._arm_timer()

    # ----------------------------------------------------------------------- WebSocket

    def _ws_feed(self) -> None:
        """Unwrap client WebSocket frames; DERP is one byte stream across messages."""
        buf = self._buf
        conn = self._ws_conn
        out: list[bytes] = []
        while conn is not None and len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            opcode = b0 & 0x0F
            masked = b1 & 0x80
            ln = b1 & 0x7F
            pos = 2
            if ln == 126:
                if len(buf) < 4:
                    break
                ln = int.from_bytes(buf[2:4], "big")
                pos = 4
            elif ln == 127:
                if len(buf) < 10:
                    break
                ln = int.from_bytes(buf[2:10], "big")
                pos = 10
            if not masked or ln > WS_MAX_FRAME or b0 & 0x70:
                self._ws_fail()
                return
            if len(buf) < pos + 4 + ln:
                break
            mask = bytes(buf[pos:pos + 4])
            payload = bytes(buf[pos + 4:pos + 4 + ln])
            del buf[:pos + 4 + ln]
            if ln:
                m = (mask * (ln // 4 + 1))[:ln]
                payload = (int.from_bytes(payload, "little") ^
                           int.from_bytes(m, "little")).to_bytes(ln, "little")
            if opcode in (0x0, 0x1, 0x2):
                out.append(payload)
            elif opcode == 0x8:
                if out:
                    conn.data_received(b"".join(out))
                    out = []
                if self.transport is not None:
                    self.transport.write(b"\x88\x00")
                    self.transport.close()
                return
            elif opcode == 0x9:
                assert self._ws_writer is not None
                self._ws_writer.control(0xA, payload[:125])
            elif opcode == 0xA:
                pass
            else:
                self._ws_fail()
                return
        if out and conn is not None:
            conn.data_received(b"".join(out))

    def _ws_fail(self) -> None:
        if self.transport is not None:
            self.transport.abort()


_TEXT = [("Content-Type", "text/plain; charset=utf-8"), ("X-Content-Type-Options", "nosniff")]


class _WSTransport:
    """Write side of a DERP-over-WebSocket connection: wraps bytes in binary messages."""

    def __init__(self, transport: Any) -> None:
        self._t = transport

    @staticmethod
    def _frame(opcode: int, data: bytes) -> bytes:
        n = len(data)
        if n < 126:
            head = bytes((0x80 | opcode, n))
        elif n < 65536:
            head = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
        return head + data

    def write(self, data: bytes) -> None:
        if data:
            self._t.write(self._frame(0x2, data))

    def control(self, opcode: int, data: bytes) -> None:
        self._t.write(self._frame(opcode, data))

    def close(self) -> None:
        if not self._t.is_closing():
            self._t.write(b"\x88\x00")
            self._t.close()

    def abort(self) -> None:
        self._t.abort()

    def is_closing(self) -> bool:
        return bool(self._t.is_closing())

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._t.get_extra_info(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._t.set_write_buffer_limits(high=high, low=low)


def _tune_socket(sock: socket.socket) -> None:
    """derper's listener options: TCP keepalive 10 min, TCP_USER_TIMEOUT 15 s."""
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
                     bootstrap_dns: dict[str, list[str]] | None = None,
                     reuse_port: bool = False) -> asyncio.base_events.Server:
    """Listen on host:port (TLS when ``ssl_context`` is given) and serve the DERP endpoints.

    Returns the started asyncio Server; ``server.close()`` stops accepting (existing DERP
    connections stay until ``await derp_server.close()``).  ``reuse_port`` lets several
    processes share the port (they must share the DERP key and mesh with each other).
    """
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: DerpHTTPProtocol(server, bootstrap_dns=bootstrap_dns),
        host, port, ssl=ssl_context, reuse_address=True, reuse_port=reuse_port or None,
        backlog=1024,
    )


async def serve_port80(host: str, port: int, *, https_host: str | None = None
                       ) -> asyncio.base_events.Server:
    """derper's plain-HTTP port: /generate_204, otherwise 302 to https (400 for non-GET)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: DerpHTTPProtocol(None, port80=True, https_host=https_host),
        host, port, reuse_address=True)
