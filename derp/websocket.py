"""A byte stream carried in WebSocket binary messages (wsproto), as an asyncio transport.

DERP over WebSocket and the ``/ts2021`` WebSocket variant both treat the WebSocket as one
byte stream: message boundaries mean nothing.  ``WebSocketTransport`` sits on the real
transport as its protocol and presents itself to the inner protocol (a DERP connection, a
Noise connection) as that protocol's transport, so the inner code is the same over a raw
socket and over WebSocket.  The front door has already completed the handshake.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.frame_protocol import CloseReason

log = logging.getLogger("derp.websocket")


class WebSocketTransport(asyncio.Transport, asyncio.Protocol):
    """Protocol of the real transport; transport of the inner byte-stream protocol."""

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self._t: asyncio.Transport | None = transport
        self._ws = Connection(ConnectionType.SERVER)
        self._inner: asyncio.Protocol | asyncio.BufferedProtocol | None = None

    def attach(self, inner: asyncio.BaseProtocol, surplus: bytes) -> None:
        """Start delivering to ``inner``; ``surplus`` arrived right after the handshake."""
        assert isinstance(inner, asyncio.Protocol | asyncio.BufferedProtocol)
        self._inner = inner
        if surplus:
            self.data_received(surplus)

    # -- protocol side (the real transport calls these) ------------------------------------

    def data_received(self, data: bytes) -> None:
        t = self._t
        if t is None:
            return
        self._ws.receive_data(data)
        out: list[bytes] = []
        for ev in self._ws.events():
            if isinstance(ev, BytesMessage):
                out.append(bytes(ev.data))
            elif isinstance(ev, Ping):
                t.write(self._ws.send(ev.response()))
            elif isinstance(ev, CloseConnection):
                self._deliver(out)
                out = []
                if self._ws.state is ConnectionState.REMOTE_CLOSING:
                    t.write(self._ws.send(ev.response()))
                t.close()
                return
            elif isinstance(ev, TextMessage):
                self._deliver(out)
                self._fail(CloseReason.UNSUPPORTED_DATA, "binary messages only")
                return
        self._deliver(out)

    def _deliver(self, chunks: list[bytes]) -> None:
        inner = self._inner
        if not chunks or inner is None:
            return
        if isinstance(inner, asyncio.Protocol):
            inner.data_received(b"".join(chunks))
            return
        # A BufferedProtocol (the DERP connection) takes bytes into buffers it hands out.
        for chunk in chunks:
            view = memoryview(chunk)
            while view and self._t is not None:
                buf = memoryview(inner.get_buffer(len(view)))
                k = min(len(buf), len(view))
                buf[:k] = view[:k]
                inner.buffer_updated(k)
                view = view[k:]

    def _fail(self, code: CloseReason, reason: str) -> None:
        t = self._t
        if t is None:
            return
        if self._ws.state is ConnectionState.OPEN:
            t.write(self._ws.send(CloseConnection(code=code, reason=reason)))
        t.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._t = None
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    # -- transport side (the inner protocol calls these) -----------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        t = self._t
        if t is not None and data and self._ws.state is ConnectionState.OPEN:
            t.write(self._ws.send(BytesMessage(data=bytes(data))))

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        self._fail(CloseReason.NORMAL_CLOSURE, "")

    def abort(self) -> None:
        if self._t is not None:
            self._t.abort()

    def is_closing(self) -> bool:
        return self._t is None or self._t.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default if self._t is None else self._t.get_extra_info(name, default)

    def pause_reading(self) -> None:
        if self._t is not None:
            self._t.pause_reading()

    def resume_reading(self) -> None:
        if self._t is not None:
            self._t.resume_reading()

    def is_reading(self) -> bool:
        return self._t is not None and self._t.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._t is not None:
            self._t.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return 0 if self._t is None else self._t.get_write_buffer_size()

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._inner is not None
        return self._inner

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._inner = protocol
