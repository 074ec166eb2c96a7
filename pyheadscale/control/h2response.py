"""The response side of one HTTP/2 stream on an H2ControlConnection."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import h2.errors
import h2.exceptions

from pyheadscale.control.h2data import data_frames
from pyheadscale.control.types import StreamGone

if TYPE_CHECKING:
    from pyheadscale.control.h2server import H2ControlConnection

# Queued plaintext above which a response writer waits for the socket (h2server's HIGH_WATER).
HIGH_WATER = 256 * 1024


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
        # Not flushed now: a body written before the next loop turn goes in the same record.
        self._conn.flush_soon()

    async def write(self, data: bytes) -> None:
        with self._conn.hold():  # head and the frames the windows take now: one record
            await self._write(data)

    async def _write(self, data: bytes) -> None:
        if not self.started:
            await self.start(200)
        view = memoryview(data)
        while view:
            self._check()
            try:
                n = self._send(view)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
                self._mark_gone()
                raise StreamGone(str(e)) from None
            if n <= 0:  # a window is exhausted: wait for the peer's WINDOW_UPDATE
                self._window.clear()
                with self._conn.released():
                    await self._window.wait()
                continue
            view = view[n:]
            await self._conn.wait_writable()

    def _send(self, view: memoryview) -> int:
        """Queue DATA frames for as much of ``view`` as the windows take; how much that was."""
        conn = self._conn
        conn.flush()  # h2's pending output (our HEADERS, acknowledgements) goes first
        # At most HIGH_WATER at a time: the caller then waits for the socket to take it, so
        # a large map in a large window never piles up unsent (MAX_UNSENT_OUTPUT).
        built = data_frames(conn.h2, self.stream_id, view[:HIGH_WATER])
        if built is not None:
            frames, n = built
            if n:
                conn.queue(frames)
            return n
        # Not a stream h2 holds open for sending: h2 itself raises the reason.
        n = min(len(view), conn.h2.local_flow_control_window(self.stream_id),
                conn.h2.max_outbound_frame_size)
        if n > 0:
            conn.h2.send_data(self.stream_id, bytes(view[:n]))
            conn.flush()
        return n

    def write_now(self, data: bytes) -> bool:
        """Write ``data`` whole at once if nothing has to wait: the head is out, both windows
        take all of it, and the connection's writer is idle on a socket that takes data now
        (so it is sealed here, in order). False: nothing was written; ``write`` it."""
        conn = self._conn
        if not (self.started and conn.can_write_through()) or self.ended or self.gone \
                or len(data) > HIGH_WATER:
            return False
        ahead = conn.h2.data_to_send()  # h2's pending output (acknowledgements) goes first
        built = data_frames(conn.h2, self.stream_id, memoryview(data), whole=True)
        done = built is not None and built[1] > 0
        out = ahead + built[0] if done and built is not None else ahead
        if out:
            conn.queue(out)
        return done

    async def end(self, data: bytes = b"") -> None:
        with self._conn.hold():  # a small response: head, body and END_STREAM in one record
            if data:
                await self._write(data)
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
