"""The main listener's TLS: a certificate that can change while the server runs, and the
ClientHello look-ahead that TLS-ALPN-01 needs.

Every connection is accepted with ``base``, whose SNI callback switches it to the current
certificate's context; installing a renewed certificate is one assignment, so new
connections get it and established ones (long-lived map polls, DERP) are untouched.

TLS-ALPN-01 (RFC 8737) must answer a ClientHello offering ``acme-tls/1`` with a special
certificate, but Python's ssl module shows neither the ClientHello's ALPN list nor a
certificate-selection hook that sees it.  So while that challenge type is configured the
listener accepts sockets itself, peeks (MSG_PEEK) at the first TLS record, and picks the
context before the handshake starts: ``peek_client_hello`` and ``client_hello_names``.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from pathlib import Path

ACME_TLS_ALPN = "acme-tls/1"
MAX_RECORD = 5 + (16 << 10)  # one TLS record: its header and at most 16 KiB
_HELLO_POLL = 0.01


def server_context(chain_file: Path, key_file: Path | None = None) -> ssl.SSLContext:
    """A server context for one certificate (TLS 1.2+, HTTP/1.1 over ALPN, as Headscale)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(str(chain_file), None if key_file is None else str(key_file))
    return ctx


class ServerTLS:
    """The listener's contexts: ``base`` for accepting, the current certificate's, and the
    TLS-ALPN-01 challenge certificates by host name."""

    def __init__(self, *, peek_alpn: bool = False) -> None:
        self.base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.base.minimum_version = ssl.TLSVersion.TLSv1_2
        self.base.set_alpn_protocols(["http/1.1"])
        self.base.sni_callback = self._select
        self.current: ssl.SSLContext | None = None
        self.peek_alpn = peek_alpn
        self.alpn_challenges: dict[str, ssl.SSLContext] = {}

    def use(self, chain_file: Path, key_file: Path | None = None) -> None:
        """Serve this certificate to new connections (loaded and checked before it is used)."""
        self.current = server_context(chain_file, key_file)

    def _select(self, sslobj: ssl.SSLObject, server_name: str | None,
                ctx: ssl.SSLContext) -> None:
        # Called with server_name None too when the client sent no SNI (IP-literal URLs).
        if self.current is not None and ctx is self.base:
            sslobj.context = self.current

    def context_for(self, hello: bytes) -> ssl.SSLContext:
        """The context for a connection whose first TLS record is ``hello``."""
        if self.alpn_challenges:
            name, protocols = client_hello_names(hello)
            if ACME_TLS_ALPN in protocols and name is not None:
                challenge = self.alpn_challenges.get(name.lower())
                if challenge is not None:
                    return challenge
        return self.base


async def peek_client_hello(sock: socket.socket) -> bytes:
    """The first TLS record on ``sock`` without consuming it (the handshake reads it again).

    Returns early with what is there if the peer sends something that is not a handshake
    record; callers bound the wait with a timeout.
    """
    loop = asyncio.get_running_loop()
    fd = sock.fileno()
    def wake(fut: asyncio.Future[None]) -> None:
        if not fut.done():
            fut.set_result(None)

    while True:
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, wake, ready)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
        data = sock.recv(MAX_RECORD, socket.MSG_PEEK)
        if not data:
            raise ConnectionResetError("closed before the ClientHello")
        if data[0] != 0x16 or (len(data) >= 5 and
                               len(data) >= 5 + int.from_bytes(data[3:5], "big")):
            return data
        # Readiness is level-triggered while the partial record sits unread: wait a little
        # for the rest instead of spinning.
        await asyncio.sleep(_HELLO_POLL)


def client_hello_names(record: bytes) -> tuple[str | None, list[str]]:
    """(SNI host name, ALPN protocols) of a ClientHello record; (None, []) if malformed."""
    try:
        return _parse_hello(memoryview(record))
    except (IndexError, struct.error, UnicodeDecodeError, ValueError):
        return None, []


def _parse_hello(b: memoryview) -> tuple[str | None, list[str]]:
    if b[0] != 0x16 or b[5] != 0x01:  # handshake record, ClientHello message
        return None, []
    end = min(len(b), 5 + int.from_bytes(b[3:5], "big"))
    pos = 5 + 4 + 2 + 32  # record header, handshake header, legacy version, random
    pos += 1 + b[pos]  # session id
    pos += 2 + int.from_bytes(b[pos:pos + 2], "big")  # cipher suites
    pos += 1 + b[pos]  # compression methods
    ext_end = min(end, pos + 2 + int.from_bytes(b[pos:pos + 2], "big"))
    pos += 2
    name: str | None = None
    protocols: list[str] = []
    while pos + 4 <= ext_end:
        etype, elen = struct.unpack_from(">HH", b, pos)
        data = b[pos + 4:pos + 4 + elen]
        pos += 4 + elen
        if etype == 0:  # server_name: list length, then (type, length, name) entries
            i = 2
            while i + 3 <= len(data):
                nlen = int.from_bytes(data[i + 1:i + 3], "big")
                if data[i] == 0:
                    name = bytes(data[i + 3:i + 3 + nlen]).decode("ascii")
                i += 3 + nlen
        elif etype == 16:  # ALPN: list length, then length-prefixed protocol names
            i = 2
            while i < len(data):
                plen = data[i]
                protocols.append(bytes(data[i + 1:i + 1 + plen]).decode("ascii"))
                i += 1 + plen
    return name, protocols
