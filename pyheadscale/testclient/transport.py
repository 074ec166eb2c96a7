"""Byte pipes to a control server: the HTTP/1.1 ``/ts2021`` upgrade or the WebSocket variant."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from urllib.parse import quote, urlsplit

import aiohttp

from pyheadscale.noise.handshake import HandshakeResult, Initiator

UPGRADE_PROTOCOL = "tailscale-control-protocol"


class UpgradeError(Exception):
    """The server did not switch protocols."""

    def __init__(self, status: int, body: bytes, message: str = "") -> None:
        super().__init__(message or f"upgrade refused: HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body


class BytePipe:
    """Duplex byte stream with an internal read buffer; ``write`` keeps call order."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._eof = False

    async def _read_more(self) -> bytes:  # b"" on EOF
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    async def drain(self) -> None:
        return None

    async def close(self) -> None:
        raise NotImplementedError

    async def read(self) -> bytes:
        """Whatever is available next (buffered bytes first); b"" on EOF."""
        if self._buf:
            data = bytes(self._buf)
            self._buf.clear()
            return data
        if self._eof:
            return b""
        data = await self._read_more()
        if not data:
            self._eof = True
        return data

    async def readexactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            data = await self._read_more() if not self._eof else b""
            if not data:
                self._eof = True
                raise asyncio.IncompleteReadError(bytes(self._buf), n)
            self._buf += data
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


class TcpPipe(BytePipe):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__()
        self.reader = reader
        self.writer = writer

    async def _read_more(self) -> bytes:
        try:
            return await self.reader.read(65536)
        except (ConnectionError, OSError):
            return b""

    def write(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


class WsPipe(BytePipe):
    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse):
        super().__init__()
        self.session = session
        self.ws = ws
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        while (data := await self._queue.get()) is not None:
            try:
                await self.ws.send_bytes(data)
            except (ConnectionError, RuntimeError):
                return

    async def _read_more(self) -> bytes:
        while True:
            msg = await self.ws.receive()
            if msg.type == aiohttp.WSMsgType.BINARY:
                if msg.data:
                    return bytes(msg.data)
                continue
            return b""

    def write(self, data: bytes) -> None:
        self._queue.put_nowait(data)

    async def close(self) -> None:
        self._queue.put_nowait(None)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer, 2)
        await self.ws.close()
        await self.session.close()


def _host_port(base_url: str) -> tuple[str, int, bool]:
    u = urlsplit(base_url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"test client supports http(s):// URLs only, got {base_url!r}")
    tls = u.scheme == "https"
    return u.hostname, u.port or (443 if tls else 80), tls


async def _finish(pipe: BytePipe, ini: Initiator) -> HandshakeResult:
    head = await pipe.readexactly(3)
    n = Initiator.reply_length(head)
    return ini.finish(head + await pipe.readexactly(n))


async def open_http(base_url: str, ini: Initiator, local_addr: tuple[str, int] | None = None,
                    ) -> tuple[BytePipe, HandshakeResult]:
    """POST /ts2021 with the initiation, expect 101 + the handshake response."""
    host, port, tls = _host_port(base_url)
    # https: the system's CAs (SSL_CERT_FILE names a test CA).
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ssl.create_default_context() if tls else None, local_addr=local_addr)
    pipe = TcpPipe(reader, writer)
    try:
        hs = base64.b64encode(ini.initiation()).decode()
        req = (
            f"POST /ts2021 HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "User-Agent: pyheadscale-testclient\r\nContent-Length: 0\r\n"
            f"Connection: upgrade\r\nUpgrade: {UPGRADE_PROTOCOL}\r\n"
            f"X-Tailscale-Handshake: {hs}\r\n\r\n"
        )
        writer.write(req.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            data = await pipe.read()
            if not data:
                raise UpgradeError(0, head, "connection closed during upgrade")
            head += data
        head, _, rest = head.partition(b"\r\n\r\n")
        pipe._buf[:0] = rest
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if status != 101:
            body = bytes(pipe._buf)
            n = int(headers.get("content-length", "0") or 0)
            with contextlib.suppress(asyncio.IncompleteReadError):
                body = await pipe.readexactly(n) if n else body
            raise UpgradeError(status, body)
        if headers.get("upgrade") != UPGRADE_PROTOCOL:
            raise UpgradeError(status, b"", f"bad Upgrade header {headers.get('upgrade')!r}")
        if "upgrade" not in headers.get("connection", "").lower():
            raise UpgradeError(status, b"", "101 without Connection: upgrade")
        return pipe, await _finish(pipe, ini)
    except BaseException:
        await pipe.close()
        raise


async def open_websocket(base_url: str, ini: Initiator) -> tuple[BytePipe, HandshakeResult]:
    """GET /ts2021?X-Tailscale-Handshake=... as a WebSocket with the control subprotocol
    (http:// or, through a TLS-terminating proxy, https://)."""
    if urlsplit(base_url).scheme not in ("http", "https"):
        raise ValueError(f"test client supports http(s):// URLs only, got {base_url!r}")
    hs = quote(base64.b64encode(ini.initiation()).decode(), safe="")
    session = aiohttp.ClientSession()
    try:
        ws = await session.ws_connect(
            f"{base_url.rstrip('/')}/ts2021?X-Tailscale-Handshake={hs}",
            protocols=(UPGRADE_PROTOCOL,),
            autoping=True,
        )
    except aiohttp.WSServerHandshakeError as e:
        await session.close()
        raise UpgradeError(e.status, b"", str(e)) from None
    except BaseException:
        await session.close()
        raise
    pipe = WsPipe(session, ws)
    try:
        return pipe, await _finish(pipe, ini)
    except BaseException:
        await pipe.close()
        raise
