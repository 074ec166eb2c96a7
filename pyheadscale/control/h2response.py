"""The response side of one HTTP/2 stream on an H2ControlConnection."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import h2.errors
import h2.exceptions

from pyheadscale.control.types import StreamGone

if TYPE_CHECKING:
    from pyheadscale.control.h2server import H2ControlConnection


class H2ResponseStream:
    """``ResponseStream`` implementation for one h2 stream."""

    def __init__(self, conn: H2ControlConnection, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.started = False
        self.ended = False
        self.gone = False
        self._window = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self.ended or self.gone or self._conn.closing

    def _check(self) -> None:
        if self.gone or self._conn.closing:
            raise StreamGone(f"stream {self.stream_id} is gone")
        if self.ended:
            raise RuntimeError("response already ended")

    def _mark_gone(self) -> None:
        self.gone = True
        self._window.set()

    def _window_changed(self) -> None:
        self._window.set()

    async def start(self, status: int, headers: list[tuple[str, str]] | None = None) -> None:
        self._check()
        if self.started:
            raise RuntimeError("response already started")
        hdrs = [(":status", str(int(status)))]
        for k, v in headers or ():
            hdrs.append((k.lower(), v))
        try:
            self._conn.h2.send_headers(self.stream_id, hdrs)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
            self._mark_gone()
            raise StreamGone(str(e)) from None
        self.started = True
        self._conn.flush()

    async def write(self, data: bytes) -> None:
        if not self.started:
            await self.start(200)
        view = memoryview(data)
        conn = self._conn
        while view:
            self._check()
            try:
                window = conn.h2.local_flow_control_window(self.stream_id)
                n = min(len(view), window, conn.h2.max_outbound_frame_size)
                if n <= 0:
                    self._window.clear()
                    await self._window.wait()
                    continue
                conn.h2.send_data(self.stream_id, bytes(view[:n]))
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
                self._mark_gone()
                raise StreamGone(str(e)) from None
            view = view[n:]
            conn.flush()
            await conn.wait_writable()

    async def end(self, data: bytes = b"") -> None:
        if data:
            await self.write(data)
        elif not self.started:
            await self.start(200)
        if self.ended:
            return
        self._check()
        try:
            self._conn.h2.end_stream(self.stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
            self._mark_gone()
            raise StreamGone(str(e)) from None
        self.ended = True
        self._conn.flush()

    def reset(self, error_code: int = h2.errors.ErrorCodes.INTERNAL_ERROR) -> None:
        """Abort the stream with RST_STREAM (used when a handler fails mid-response)."""
        if self.gone or self._conn.closing:
            return
        self._mark_gone()
        try:
            self._conn.h2.reset_stream(self.stream_id, error_code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self._conn.flush()
