"""asyncio control-protocol client: Noise initiator + HTTP/2 client (``h2``) over it.

For unit tests and load generation only.  ``connect()`` performs /key (unless the server key
is given), the /ts2021 upgrade and the handshake; requests then run as concurrent h2 streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import aiohttp
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from pyheadscale.noise.handshake import HandshakeResult, Initiator
from pyheadscale.noise.keys import MACHINE_PREFIX, parse_key
from pyheadscale.noise.records import RecordError, RecordLayer
from pyheadscale.testclient.mapframes import MapFrameDecoder
from pyheadscale.testclient.transport import BytePipe, open_http, open_websocket

EARLY_MAGIC = b"\xff\xff\xffTS"
MAX_EARLY = 10 << 20


def _s(b: bytes | str) -> str:
    return b.decode() if isinstance(b, bytes) else b


class ConnectionClosed(Exception):
    """The Noise/HTTP/2 connection is gone."""


class StreamResetError(Exception):
    """The server reset the stream before the response completed."""

    def __init__(self, stream_id: int, error_code: int) -> None:
        super().__init__(f"stream {stream_id} reset by server (error code {error_code})")
        self.stream_id = stream_id
        self.error_code = error_code


async def fetch_key(base_url: str, capver: int = 113) -> bytes:
    """``GET /key?v=capver`` and return the server's 32-byte Noise public key."""
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{base_url.rstrip('/')}/key", params={"v": str(capver)}) as r,
    ):
        body = await r.read()
        if r.status != 200:
            raise ValueError(f"/key answered {r.status}: {body[:200]!r}")
        return parse_key(MACHINE_PREFIX, json.loads(body)["publicKey"])


class ClientStream:
    """One request/response exchange on the connection."""

    def __init__(self, conn: ControlConnection, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.status: int | None = None
        self.headers: list[tuple[str, str]] = []
        self._chunks: list[tuple[bytes, int]] = []
        self.ended = False
        self.reset_code: int | None = None
        self._event = asyncio.Event()
        self._window = asyncio.Event()

    def _wake(self) -> None:
        self._event.set()
        self._window.set()

    @property
    def done(self) -> bool:
        return self.ended or self.reset_code is not None or self._conn.closed

    async def response(self) -> tuple[int, list[tuple[str, str]]]:
        """Wait for the response headers."""
        while self.status is None:
            if self.reset_code is not None:
                raise StreamResetError(self.stream_id, self.reset_code)
            if self._conn.closed:
                raise ConnectionClosed(self._conn.close_reason)
            self._event.clear()
            await self._event.wait()
        return self.status, self.headers

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive; flow-control credit is returned as they are consumed."""
        await self.response()
        while True:
            if self._chunks:
                data, flow = self._chunks.pop(0)
                self._conn._ack(self.stream_id, flow)
                if data:
                    yield data
                continue
            if self.ended:
                return
            if self.reset_code is not None:
                raise StreamResetError(self.stream_id, self.reset_code)
            if self._conn.closed:
                raise ConnectionClosed(self._conn.close_reason)
            self._event.clear()
            await self._event.wait()

    async def read(self) -> bytes:
        return b"".join([c async for c in self.chunks()])

    def reset(self, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Cancel the stream (RST_STREAM), as tailscaled does on re-login/shutdown."""
        self._conn._reset(self, error_code)


class ControlConnection:
    """An established Noise + HTTP/2 connection to a control server."""

    def __init__(
        self, base_url: str, pipe: BytePipe, hs: HandshakeResult, machine_private_key: bytes
    ) -> None:
        self.base_url = base_url
        self.handshake = hs
        self.capver = hs.version
        self.server_public_key = hs.peer_static
        self.machine_private_key = machine_private_key
        self.early_payload: dict[str, Any] | None = None
        self.close_reason = ""
        self._pipe = pipe
        self._records: RecordLayer = hs.records()
        self._h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self._streams: dict[int, ClientStream] = {}
        self._closed = False
        self._pre = bytearray()  # plaintext before the early-payload check is decided
        self._pre_done = False
        self._h2.initiate_connection()
        self._flush()
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    # -- context manager -----------------------------------------------------------------

    async def __aenter__(self) -> ControlConnection:
        return self

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        if not self._closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.close_connection()
                self._flush()
            await self._pipe.drain()
        self._mark_closed("closed by client")
        await self._pipe.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    async def wait_closed(self) -> None:
        """Wait until the server closes the connection (wrap in ``asyncio.timeout``)."""
        await asyncio.shield(self._reader)

    async def get_server_key(self) -> bytes:
        return await fetch_key(self.base_url, self.capver)

    # -- raw access (for tests of malformed input) ---------------------------------------

    def send_raw(self, data: bytes) -> None:
        """Write bytes to the wire as-is (no Noise record)."""
        self._pipe.write(data)

    def send_plaintext(self, data: bytes) -> None:
        """Seal ``data`` into records, bypassing HTTP/2."""
        self._pipe.write(self._records.seal(data))

    # -- requests ------------------------------------------------------------------------

    async def open_stream(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
        *,
        content_length: bool = True,
        authority: str = "unused",
    ) -> ClientStream:
        """Send a request (body streamed with flow control in the background)."""
        if self._closed:
            raise ConnectionClosed(self.close_reason)
        sid = self._h2.get_next_available_stream_id()
        st = ClientStream(self, sid)
        self._streams[sid] = st
        hdrs = [
            (":method", method),
            (":scheme", "https"),
            (":authority", authority),
            (":path", path),
            ("user-agent", "pyheadscale-testclient"),
        ]
        if content_length:
            hdrs.append(("content-length", str(len(body))))
        hdrs += [(k.lower(), v) for k, v in headers or ()]
        self._h2.send_headers(sid, hdrs, end_stream=not body)
        self._flush()
        if body:
            asyncio.get_running_loop().create_task(self._send_body(st, body))
        return st

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
        *,
        content_length: bool = True,
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """One complete request; returns (status, headers, body)."""
        st = await self.open_stream(method, path, body, headers, content_length=content_length)
        status, hdrs = await st.response()
        data = await st.read()
        return status, hdrs, data

    async def stream_map(
        self, body: bytes, path: str = "/machine/map"
    ) -> AsyncIterator[dict[str, Any]]:
        """POST a streaming map request and yield decoded map frames until the stream ends.

        Closing the generator early resets the stream.
        """
        st = await self.open_stream("POST", path, body)
        status, _ = await st.response()
        if status != 200:
            body_text = await st.read()
            raise StreamResetError(st.stream_id, -status) from ValueError(
                f"map request answered {status}: {body_text[:200]!r}"
            )
        dec = MapFrameDecoder()
        try:
            async for chunk in st.chunks():
                for frame in dec.feed(chunk):
                    yield frame
        finally:
            if not st.done:
                st.reset()

    # -- internals -----------------------------------------------------------------------

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data and not self._closed:
            # Sealing and queueing in one synchronous step keeps records in order.
            self._pipe.write(self._records.seal(data))

    def _ack(self, sid: int, flow: int) -> None:
        if self._closed or not flow:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.acknowledge_received_data(flow, sid)
            self._flush()

    def _reset(self, st: ClientStream, code: int) -> None:
        if st.done:
            return
        st.reset_code = code
        st._wake()
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.reset_stream(st.stream_id, code)
            self._flush()

    async def _send_body(self, st: ClientStream, body: bytes) -> None:
        view = memoryview(body)
        try:
            while view:
                if st.done:
                    return
                window = min(
                    self._h2.local_flow_control_window(st.stream_id),
                    self._h2.max_outbound_frame_size,
                )
                if window <= 0:
                    st._window.clear()
                    await st._window.wait()
                    continue
                self._h2.send_data(st.stream_id, bytes(view[:window]))
                view = view[window:]
                self._flush()
                await self._pipe.drain()
            self._h2.end_stream(st.stream_id)
            self._flush()
        except h2.exceptions.ProtocolError:
            return  # the server closed or reset the stream (e.g. 413): stop sending

    def _mark_closed(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self.close_reason = reason
        for st in self._streams.values():
            st._wake()

    async def _read_loop(self) -> None:
        reason = "server closed the connection"
        try:
            while True:
                data = await self._pipe.read()
                if not data:
                    break
                for pt in self._records.feed(data):
                    self._on_plaintext(pt)
                self._flush()
                await self._pipe.drain()
        except (RecordError, h2.exceptions.ProtocolError, ValueError) as e:
            reason = f"protocol error: {e!r}"
        finally:
            self._mark_closed(reason)

    def _on_plaintext(self, pt: bytes) -> None:
        if not self._pre_done:
            # The first plaintext may be an early payload: ff ff ff 'T' 'S' + u32 BE + JSON.
            self._pre += pt
            if len(self._pre) < 5 and EARLY_MAGIC.startswith(bytes(self._pre)):
                return
            if self._pre[:5] == EARLY_MAGIC:
                if len(self._pre) < 9:
                    return
                n = int.from_bytes(self._pre[5:9], "big")
                if n > MAX_EARLY:
                    raise ValueError("early payload too large")
                if len(self._pre) < 9 + n:
                    return
                self.early_payload = json.loads(bytes(self._pre[9 : 9 + n]))
                pt = bytes(self._pre[9 + n :])
            else:
                pt = bytes(self._pre)
            self._pre_done = True
            self._pre = bytearray()
        for ev in self._h2.receive_data(pt):
            self._on_event(ev)

    def _on_event(self, ev: h2.events.Event) -> None:
        sid = getattr(ev, "stream_id", 0) or 0
        st = self._streams.get(sid)
        if isinstance(ev, h2.events.ResponseReceived) and st is not None:
            hdrs = [(_s(k), _s(v)) for k, v in ev.headers or ()]
            st.status = int(dict(hdrs)[":status"])
            st.headers = [(k, v) for k, v in hdrs if not k.startswith(":")]
            st._wake()
        elif isinstance(ev, h2.events.DataReceived):
            if st is None or st.reset_code is not None:
                self._ack(sid, ev.flow_controlled_length or 0)
            else:
                st._chunks.append((ev.data or b"", ev.flow_controlled_length or 0))
                st._wake()
        elif isinstance(ev, h2.events.StreamEnded) and st is not None:
            st.ended = True
            st._wake()
        elif isinstance(ev, h2.events.StreamReset) and st is not None:
            if not st.ended:
                st.reset_code = ev.error_code
            st._wake()
        elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            for s in [st] if st is not None else self._streams.values():
                s._window.set()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._mark_closed(f"server sent GOAWAY (error code {ev.error_code})")


async def connect(
    base_url: str,
    machine_private_key: bytes,
    capver: int = 113,
    *,
    server_public_key: bytes | None = None,
    websocket: bool = False,
    dial_timeout: float = 10.0,
    local_addr: tuple[str, int] | None = None,
) -> ControlConnection:
    """Open a control connection (``async with await connect(...) as conn``).

    ``local_addr`` binds the TCP connection's source (HTTP upgrade only)."""
    base_url = base_url.rstrip("/")
    if server_public_key is None:
        server_public_key = await fetch_key(base_url, capver)
    ini = Initiator(machine_private_key, server_public_key, capver)
    opening = (open_websocket(base_url, ini) if websocket
               else open_http(base_url, ini, local_addr))
    pipe, hs = await asyncio.wait_for(opening, dial_timeout)
    return ControlConnection(base_url, pipe, hs, machine_private_key)
