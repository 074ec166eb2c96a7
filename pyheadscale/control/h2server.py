"""HTTP/2 server (python-hyper ``h2``) running inside one Noise transport connection.

Transport-agnostic: feed it the ciphertext received from the peer (``feed``/``feed_eof``)
and give it a ``ByteSink`` to write ciphertext to.  It works the same over the raw socket
aiohttp hands over after the 101 and over WebSocket binary messages.

Rules it keeps (docs/protocol.md, "HTTP/2 inside Noise" and "Noise handshake and records"):

* SETTINGS go out right after the handshake response, before reading anything.
* DataReceived is acknowledged at once while the connection's buffered bodies are under
  their caps, so the 65 535-byte connection window never runs dry however many lite updates
  arrive; past the caps window is granted again as handlers take their bodies (h2limits.py
  has every bound a peer meets).
* Outbound DATA respects the peer's windows and max frame size; writers wait for
  WINDOW_UPDATE.
* Records are sealed in order by the connection's writer task or, while it is idle and the
  sink takes data at once, where output is queued (no task wakeup per map frame in a storm);
  handlers only queue plaintext h2 frames.
* Each request runs in its own task; RST_STREAM cancels it; bad records or garbage HTTP/2
  close this connection only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from pyheadscale.control.h2limits import (
    MAX_UNSENT_OUTPUT,
    BodyBudget,
    H2Limits,
    request_headers,
)
from pyheadscale.control.h2response import HIGH_WATER, H2ResponseStream
from pyheadscale.control.h2settings import SETTINGS_CLASS
from pyheadscale.control.types import (
    MAX_REQUEST_BODY,
    ByteSink,
    ControlRequest,
    Dispatch,
    StreamGone,
)
from pyheadscale.noise.records import RecordError, RecordLayer

log = logging.getLogger(__name__)


_conn_ids = itertools.count(1)


def _text(b: bytes | str) -> str:
    return b if isinstance(b, str) else b.decode("utf-8", "replace")


class _Stream:
    __slots__ = ("sid", "headers", "body", "declared_len", "rejected", "task", "response",
                 "unacked", "deadline")

    def __init__(self, sid: int, headers: list[tuple[str, str]]) -> None:
        self.sid = sid
        self.headers = headers
        self.body = bytearray()
        self.declared_len: int | None = None
        self.rejected = False
        self.task: asyncio.Task[None] | None = None
        self.response: H2ResponseStream | None = None
        self.unacked = 0  # flow-controlled bytes received but not yet given back as window
        self.deadline: asyncio.TimerHandle | None = None  # for the rest of the body


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
        limits: H2Limits | None = None,
        budget: BodyBudget | None = None,
        is_registered: Callable[[bytes], bool] | None = None,
        remote: str = "",
    ) -> None:
        self.records = records
        self.sink = sink
        self.dispatch = dispatch
        self.machine_key = machine_key
        self.capver = capver
        self.conn_id = next(_conn_ids) if conn_id is None else conn_id
        self.max_body = max_body
        self.limits = limits or H2Limits()
        self.budget = budget or BodyBudget()
        self.is_registered = is_registered or (lambda _key: True)
        self.remote = remote
        self.h2 = h2.connection.H2Connection(
            # Request heads are checked by request_headers() instead.
            h2.config.H2Configuration(client_side=False, header_encoding=None,
                                      validate_inbound_headers=False)
        )
        # Current at once (not pending an ACK), so h2 enforces it from the first stream.
        # CompactSettings where h2 fits it: h2's own without a deque per setting (~9 KiB per
        # connection).
        self.h2.local_settings = SETTINGS_CLASS(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.limits.max_concurrent_streams,
        })
        self.h2.remote_settings = SETTINGS_CLASS(client=True)  # the defaults h2 set
        self.buffered = 0  # request-body bytes held for streams not yet handed to a handler
        self._reactive = 0  # output queued in answer to the peer since the socket last took some
        self._queued_total = 0
        self._preface_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._abort = False  # close by dropping the socket: the peer does not read
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
        self._writer_idle = False  # parked with nothing sealed in flight: write-through is safe
        self._held = 0  # responses queueing a head/body/end together: no write-through yet
        self._flush_soon = False

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, preamble: bytes = b"") -> None:
        """Queue ``preamble`` (sent raw, e.g. the 51-byte handshake response) and SETTINGS.

        Must be called from within the event loop; starts the writer task.
        """
        self._raw_out += preamble
        self.h2.initiate_connection()
        self.flush()
        loop = asyncio.get_running_loop()
        self._writer = loop.create_task(self._write_loop(), name=f"noise-writer-{self.conn_id}")
        self._preface_timer = loop.call_later(
            self.limits.handshake_timeout, self._fail, "no HTTP/2 preface before the deadline")
        self._arm_idle()

    def _arm_idle(self) -> None:
        """(Re)start the idle clock: it runs while the connection has no open stream."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = asyncio.get_running_loop().call_later(
            self.limits.unregistered_idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self.closing or self._streams:
            return  # re-armed when the last stream goes
        if self.is_registered(self.machine_key):
            self._arm_idle()
            return
        self._fail("idle without a registered node")

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
        for timer in (self._preface_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        # A GOAWAY already queued (h2's own for a protocol error, or ours) says why; a second
        # one would tell the peer NO_ERROR last.
        if self.h2.state_machine.state is not h2.connection.ConnectionState.CLOSED:
            try:
                self.h2.close_connection()
            except h2.exceptions.ProtocolError:
                pass
        self.flush()
        for st in list(self._streams.values()):
            self._release(st, grant=False)
            if st.response is not None:
                st.response._mark_gone()
            if st.task is not None:
                st.task.cancel()
        self.budget.forget(self.conn_id)
        self._drained.set()
        self._wake.set()
        if self._writer is None:  # never started: nothing will close the sink for us
            self._closed.set()
        elif self._abort:
            self._writer.cancel()  # it may be stuck in a write the peer never takes

    def _fail(self, reason: str, *, abort: bool = False) -> None:
        log.info("control connection %d closed: %s", self.conn_id, reason)
        self._abort = self._abort or abort
        self.close(reason)

    # -- output --------------------------------------------------------------------------

    def flush(self) -> None:
        """Move pending h2 output to the writer's queue."""
        self._flush_soon = False
        data = self.h2.data_to_send()
        if data:
            self.queue(data)

    def flush_soon(self) -> None:
        """Flush h2's output on the next loop turn if nothing does first (a head then leaves
        with the body written right after it)."""
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self.flush)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """What is queued inside leaves as one record at the exit (a small response is one
        segment, not one per frame). Await inside it only within ``released()``."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
            self._push()

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """Around a wait in ``hold()``: held output leaves now (the peer's WINDOW_UPDATE may
        wait for it) and other streams write through meanwhile."""
        self._held -= 1
        self._push()
        try:
            yield
        finally:
            self._held += 1

    def _push(self) -> None:
        if self._held or not self._plain_out or self.closing:
            return
        if self._writer_idle and self.sink.ready():
            self._write_through()
        else:
            self._wake.set()

    def can_write_through(self) -> bool:
        """Output queued now would be sealed and handed to the socket at once."""
        return self._writer_idle and not (self._held or self.closing) and self.sink.ready()

    def queue(self, data: bytes) -> None:
        """Plaintext h2 frames to send after all queued before (flush h2's output first)."""
        self._plain_out += data
        if self.can_write_through():
            self._write_through()
            return
        self._queued_total += len(data)  # what feed() counts as waiting for the socket
        if len(self._plain_out) > HIGH_WATER:
            self._drained.clear()
            if len(self._plain_out) > MAX_UNSENT_OUTPUT and not self.closing:
                self._plain_out.clear()  # the peer does not read: nothing will flow
                self._fail("peer does not read its output", abort=True)
                return
        elif self._held:
            return  # the holder's exit sends it
        self._wake.set()

    def _write_through(self) -> None:
        # The writer holds nothing sealed, so sealing here keeps record N the N-th on the wire.
        try:
            out = bytes(self._raw_out) + self.records.seal(bytes(self._plain_out))
            self._raw_out.clear()
            self._plain_out.clear()
            self._reactive = 0
            self._drained.set()
            self.sink.write_nowait(out)
        except Exception as e:  # the socket went away (or the nonce ran out)
            log.debug("control connection %d write failed: %r", self.conn_id, e)
            self.close("write failed")

    async def wait_writable(self) -> None:
        if not self._drained.is_set():
            with self.released() if self._held else contextlib.nullcontext():
                await self._drained.wait()

    async def _write_loop(self) -> None:
        try:
            while True:
                while not (self._plain_out or self._raw_out or self.closing):
                    self._wake.clear()
                    self._writer_idle = True
                    try:
                        await self._wake.wait()
                    finally:
                        self._writer_idle = False
                if not (self._plain_out or self._raw_out):
                    break  # closing and nothing left to send
                # Sealed and handed to the sink in one step, as _write_through does.
                out = bytes(self._raw_out) + self.records.seal(bytes(self._plain_out))
                self._raw_out.clear()
                self._plain_out.clear()
                self._drained.set()
                await self.sink.write(out)
                # The writer then waits, often for hours: the chunk just written (a whole
                # sealed first map) must not stay referenced from this frame meanwhile.
                del out
                self._reactive = 0  # the socket takes data again
        except asyncio.CancelledError:
            pass
        except Exception as e:  # the socket went away; nothing else can be sent
            log.debug("control connection %d write failed: %r", self.conn_id, e)
        finally:
            if not self.closing:
                self.close("write failed")
            try:
                if self._abort:
                    self.sink.abort()
                else:
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
        queued_before = self._queued_total
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
        # Output the peer made us queue (acknowledgements, resets) while we cannot send.
        self._reactive += self._queued_total - queued_before
        if self._reactive > self.limits.max_reactive_output and not self.closing:
            self._fail("too many queued control frames: the peer does not read", abort=True)

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
            if self._preface_timer is not None:  # the client's preface ends with SETTINGS
                self._preface_timer.cancel()
                self._preface_timer = None
            self._wake_all()  # INITIAL_WINDOW_SIZE / MAX_FRAME_SIZE may have grown
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._fail(f"peer sent GOAWAY (error code {ev.error_code})")

    def _wake_all(self) -> None:
        for st in self._streams.values():
            if st.response is not None:
                st.response._window_changed()

    def _on_request(self, ev: h2.events.RequestReceived) -> None:
        sid = ev.stream_id
        try:
            raw = request_headers(ev.headers or ())
        except h2.exceptions.ProtocolError as e:  # what h2's own check would have done
            self.h2.close_connection(error_code=h2.errors.ErrorCodes.PROTOCOL_ERROR)
            self._fail(f"HTTP/2 protocol error: {e!r}")
            return
        headers = [(_text(k), _text(v)) for k, v in raw]
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
        elif not ev.stream_ended:
            st.deadline = asyncio.get_running_loop().call_later(
                self.limits.body_timeout, self._body_too_slow, sid)

    def _on_data(self, ev: h2.events.DataReceived) -> None:
        st = self._streams.get(ev.stream_id)
        if st is None or st.rejected:
            # Discarded data still gives its window back, or the connection window runs dry.
            self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            return
        data = ev.data or b""
        st.body += data
        self.buffered += len(data)
        self.budget.take(len(data))
        if self._under_caps():
            self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        else:  # window comes back when a handler takes a body (_release)
            st.unacked += ev.flow_controlled_length
            self.budget.wait(self.conn_id, self._grant_deferred)
        if len(st.body) > self.max_body:
            self._reject_too_large(st)

    def _under_caps(self) -> bool:
        # Never below one maximal body, or a single large request could not complete.
        cap = max(self.limits.max_buffered_body, self.max_body)
        return self.buffered <= cap and not self.budget.exhausted

    def _release(self, st: _Stream, grant: bool = True) -> None:
        """`st` no longer holds its body here: count it out and give its window back."""
        if st.deadline is not None:
            st.deadline.cancel()
            st.deadline = None
        n = len(st.body)
        st.body = bytearray()
        self.buffered -= n
        if st.unacked and not self.closing:
            # Also for a closed stream: h2 then restores the connection window only.
            self.h2.acknowledge_received_data(st.unacked, st.sid)
        st.unacked = 0
        if n:
            self.budget.release(n)
        if grant:
            self._grant_deferred()

    def _grant_deferred(self) -> None:
        if self.closing:
            return
        for st in self._streams.values():
            if st.unacked and self._under_caps():
                self.h2.acknowledge_received_data(st.unacked, st.sid)
                st.unacked = 0
        if any(st.unacked for st in self._streams.values()):
            self.budget.wait(self.conn_id, self._grant_deferred)
        self.flush()

    def _body_too_slow(self, sid: int) -> None:
        st = self._streams.pop(sid, None)
        if st is None:
            return
        st.deadline = None
        log.info("control connection %d: stream %d body not finished in %.0fs", self.conn_id,
                 sid, self.limits.body_timeout)
        if st.response is not None:
            st.response._mark_gone()
        try:
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self._release(st)
        self._stream_gone()

    def _stream_gone(self) -> None:
        if not self._streams and not self.closing:
            self._arm_idle()

    def _reject_too_large(self, st: _Stream) -> None:
        st.rejected = True
        self._release(st)
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
        self._stream_gone()
        self.flush()

    def _on_end(self, sid: int) -> None:
        st = self._streams.get(sid)
        if st is None or st.rejected or st.task is not None:
            return
        if st.deadline is not None:
            st.deadline.cancel()
            st.deadline = None
        st.task = asyncio.get_running_loop().create_task(
            self._run(st), name=f"control-stream-{self.conn_id}-{sid}"
        )

    def _on_reset(self, sid: int) -> None:
        st = self._streams.pop(sid, None)
        if st is None:
            return
        self._release(st)
        if st.response is not None:
            st.response._mark_gone()
        if st.task is not None:
            st.task.cancel()
        self._stream_gone()

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
            remote=self.remote,
        )

    async def _run(self, st: _Stream) -> None:
        resp = st.response
        assert resp is not None
        try:
            req = self._build_request(st)
            self._release(st)  # the handler has the body now
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
                self._stream_gone()

    @staticmethod
    async def _send_error(resp: H2ResponseStream, status: int, text: str) -> None:
        body = text.encode()
        await resp.start(
            status,
            [("content-type", "text/plain; charset=utf-8"), ("content-length", str(len(body)))],
        )
        await resp.end(body)
