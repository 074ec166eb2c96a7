"""HTTP/2 server (python-hyper ``h2``) running inside one Noise transport connection.

Transport-agnostic: feed it the ciphertext received from the peer (``feed``/``feed_eof``)
and give it a ``ByteSink`` to write ciphertext to.  It works the same over the raw socket
aiohttp hands over after the 101 and over WebSocket binary messages.

Rules it keeps (docs/protocol.md, "HTTP/2 inside Noise" and "Noise handshake and records"):

* SETTINGS go out right after the handshake response, before reading anything.
* Every DataReceived is acknowledged at once, so the 65 535-byte connection window never
  runs dry however many lite updates arrive.
* Outbound DATA respects the peer's windows and max frame size; writers wait for
  WINDOW_UPDATE.
* One writer task per connection seals records and writes them in order; handlers only
  queue plaintext h2 frames.
* Each request runs in its own task; RST_STREAM cancels it; bad records or garbage HTTP/2
  close this connection only.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from pyheadscale.control.types import (
    MAX_REQUEST_BODY,
    ControlRequest,
    Dispatch,
    StreamGone,
)
from pyheadscale.noise.records import RecordError, RecordLayer

log = logging.getLogger(__name__)

# Above this many queued plaintext bytes, response writers wait for the socket to drain.
HIGH_WATER = 256 * 1024

_conn_ids = itertools.count(1)


class ByteSink(Protocol):
    """Where a connection's ciphertext goes (a socket, a WebSocket, a test buffer)."""

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


def _text(b: bytes | str) -> str:
    return b if isinstance(b, str) else b.decode("utf-8", "replace")


class _Stream:
    __slots__ = ("sid", "headers", "body", "declared_len", "rejected", "task", "response")

    def __init__(self, sid: int, headers: list[tuple[str, str]]) -> None:
        self.sid = sid
        self.headers = headers
        self.body = bytearray()
        self.declared_len: int | None = None
        self.rejected = False
        self.task: asyncio.Task[None] | None = None
        self.response: H2ResponseStream | None = None


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


class H2ControlConnection:
    """One Noise-encrypted HTTP/2 server connection (after a successful handshake)."""

    def __init__(
        self,
        *,
        records: RecordLayer,
        sink: ByteSink,
        dispatch: Dispatch,
        machine_key: bytes,
        capver: int,
        conn_id: int | None = None,
        max_body: int = MAX_REQUEST_BODY,
    ) -> None:
        self.records = records
        self.sink = sink
        self.dispatch = dispatch
        self.machine_key = machine_key
        self.capver = capver
        self.conn_id = next(_conn_ids) if conn_id is None else conn_id
        self.max_body = max_body
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.closing = False
        self.close_reason = ""
        self._streams: dict[int, _Stream] = {}
        self._raw_out = bytearray()
        self._plain_out = bytearray()
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._closed = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, preamble: bytes = b"") -> None:
        """Queue ``preamble`` (sent raw, e.g. the 51-byte handshake response) and SETTINGS.

        Must be called from within the event loop; starts the writer task.
        """
        self._raw_out += preamble
        self.h2.initiate_connection()
        self.flush()
        self._writer = asyncio.get_running_loop().create_task(
            self._write_loop(), name=f"noise-writer-{self.conn_id}"
        )

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def close(self, reason: str = "closed") -> None:
        """Send GOAWAY (best effort), cancel every handler, then close the sink."""
        if self.closing:
            return
        self.closing = True
        self.close_reason = reason
        try:
            self.h2.close_connection()
        except h2.exceptions.ProtocolError:
            pass
        self.flush()
        for st in list(self._streams.values()):
            if st.response is not None:
                st.response._mark_gone()
            if st.task is not None:
                st.task.cancel()
        self._drained.set()
        self._wake.set()
        if self._writer is None:  # never started: nothing will close the sink for us
            self._closed.set()

    def _fail(self, reason: str) -> None:
        log.info("control connection %d closed: %s", self.conn_id, reason)
        self.close(reason)

    # -- output --------------------------------------------------------------------------

    def flush(self) -> None:
        """Move pending h2 output to the writer's queue."""
        data = self.h2.data_to_send()
        if data:
            self._plain_out += data
            if len(self._plain_out) > HIGH_WATER:
                self._drained.clear()
            self._wake.set()

    async def wait_writable(self) -> None:
        if not self._drained.is_set():
            await self._drained.wait()

    async def _write_loop(self) -> None:
        try:
            while True:
                while not (self._plain_out or self._raw_out or self.closing):
                    self._wake.clear()
                    await self._wake.wait()
                if not (self._plain_out or self._raw_out):
                    break  # closing and nothing left to send
                # Sealing happens only here, so record N is the N-th record on the wire.
                out = bytes(self._raw_out) + self.records.seal(bytes(self._plain_out))
                self._raw_out.clear()
                self._plain_out.clear()
                self._drained.set()
                await self.sink.write(out)
        except asyncio.CancelledError:
            pass
        except Exception as e:  # the socket went away; nothing else can be sent
            log.debug("control connection %d write failed: %r", self.conn_id, e)
        finally:
            if not self.closing:
                self.close("write failed")
            try:
                await self.sink.close()
            except Exception:  # closing a dead transport may fail; it is closed either way
                pass
            self._closed.set()

    # -- input ---------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Ciphertext from the peer.  Never raises: bad input closes the connection."""
        if self.closing or not data:
            return
        try:
            chunks = self.records.feed(data)
        except RecordError as e:
            self._fail(f"bad noise record: {e}")
            return
        try:
            for pt in chunks:
                try:
                    events = self.h2.receive_data(pt)
                except h2.exceptions.ProtocolError as e:
                    self.flush()  # h2 queued a GOAWAY explaining the error
                    self._fail(f"HTTP/2 protocol error: {e!r}")
                    return
                for ev in events:
                    self._handle(ev)
                    if self.closing:
                        return
        except Exception:
            log.exception("control connection %d: unexpected error", self.conn_id)
            self._fail("internal error")
            return
        self.flush()

    def feed_eof(self) -> None:
        self.close("peer closed the connection")

    def _handle(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            self._on_request(ev)
        elif isinstance(ev, h2.events.DataReceived):
            self._on_data(ev)
        elif isinstance(ev, h2.events.StreamEnded):
            self._on_end(ev.stream_id)
        elif isinstance(ev, h2.events.StreamReset):
            self._on_reset(ev.stream_id)
        elif isinstance(ev, h2.events.WindowUpdated):
            if ev.stream_id:
                st = self._streams.get(ev.stream_id)
                if st is not None and st.response is not None:
                    st.response._window_changed()
            else:
                self._wake_all()
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self._wake_all()  # INITIAL_WINDOW_SIZE / MAX_FRAME_SIZE may have grown
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._fail(f"peer sent GOAWAY (error code {ev.error_code})")

    def _wake_all(self) -> None:
        for st in self._streams.values():
            if st.response is not None:
                st.response._window_changed()

    def _on_request(self, ev: h2.events.RequestReceived) -> None:
        sid = ev.stream_id
        headers = [(_text(k), _text(v)) for k, v in ev.headers or ()]
        st = _Stream(sid, headers)
        st.response = H2ResponseStream(self, sid)
        self._streams[sid] = st
        for k, v in headers:
            if k == "content-length":
                try:
                    st.declared_len = int(v)
                except ValueError:
                    pass
        if st.declared_len is not None and st.declared_len > self.max_body:
            self._reject_too_large(st)

    def _on_data(self, ev: h2.events.DataReceived) -> None:
        # Acknowledge first, whatever happens to the data: an unacknowledged window stalls
        # the client once a few dozen lite updates have arrived.
        self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        st = self._streams.get(ev.stream_id)
        if st is None or st.rejected:
            return
        st.body += ev.data or b""
        if len(st.body) > self.max_body:
            self._reject_too_large(st)

    def _reject_too_large(self, st: _Stream) -> None:
        st.rejected = True
        st.body = bytearray()
        text = f"request body too large (limit {self.max_body} bytes)\n".encode()
        sid = st.sid
        try:
            self.h2.send_headers(
                sid,
                [
                    (":status", "413"),
                    ("content-type", "text/plain; charset=utf-8"),
                    ("content-length", str(len(text))),
                ],
            )
            if self.h2.local_flow_control_window(sid) >= len(text):
                self.h2.send_data(sid, text, end_stream=True)
            else:
                self.h2.end_stream(sid)
            # Tell the client to stop sending the rest of the body; the connection lives on.
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.NO_ERROR)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self._streams.pop(sid, None)
        self.flush()

    def _on_end(self, sid: int) -> None:
        st = self._streams.get(sid)
        if st is None or st.rejected or st.task is not None:
            return
        st.task = asyncio.get_running_loop().create_task(
            self._run(st), name=f"control-stream-{self.conn_id}-{sid}"
        )

    def _on_reset(self, sid: int) -> None:
        st = self._streams.pop(sid, None)
        if st is None:
            return
        if st.response is not None:
            st.response._mark_gone()
        if st.task is not None:
            st.task.cancel()

    # -- handlers ------------------------------------------------------------------------

    def _build_request(self, st: _Stream) -> ControlRequest:
        method = path = ""
        headers: dict[str, str] = {}
        header_list: list[tuple[str, str]] = []
        for k, v in st.headers:
            if k.startswith(":"):
                if k == ":method":
                    method = v
                elif k == ":path":
                    path = v
                continue
            header_list.append((k, v))
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        path, _, query = path.partition("?")
        return ControlRequest(
            method=method,
            path=path,
            query=query,
            headers=headers,
            body=bytes(st.body),
            machine_key=self.machine_key,
            capver=self.capver,
            conn_id=self.conn_id,
            stream_id=st.sid,
            header_list=header_list,
        )

    async def _run(self, st: _Stream) -> None:
        resp = st.response
        assert resp is not None
        try:
            req = self._build_request(st)
            st.body = bytearray()
            await self.dispatch(req, resp)
            if not resp.closed:
                if not resp.started:
                    log.error("handler for %s sent no response", req.path)
                    await self._send_error(resp, 500, "handler sent no response\n")
                else:
                    await resp.end()
        except asyncio.CancelledError:
            raise  # client reset the stream or the connection closed: nothing to send
        except StreamGone:
            pass
        except Exception:
            log.exception("control handler failed on stream %d", st.sid)
            if not resp.closed:
                if resp.started:
                    resp.reset()
                else:
                    try:
                        await self._send_error(resp, 500, "internal server error\n")
                    except (StreamGone, RuntimeError):
                        pass
        finally:
            if self._streams.get(st.sid) is st:
                del self._streams[st.sid]

    @staticmethod
    async def _send_error(resp: H2ResponseStream, status: int, text: str) -> None:
        body = text.encode()
        await resp.start(
            status,
            [("content-type", "text/plain; charset=utf-8"), ("content-length", str(len(body)))],
        )
        await resp.end(body)
