"""DATA frames written without h2's send_data (control/h2data.py) and the connection's
write-through: an h2 client must read them as h2's own, h2's flow-control accounting must
stay exact, and records must stay in order whichever path seals them."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Awaitable, Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import pytest

from pyheadscale.control import h2server
from pyheadscale.control.h2data import data_frames
from pyheadscale.control.h2response import HIGH_WATER
from pyheadscale.control.types import ControlRequest, ResponseStream, StreamGone
from pyheadscale.control.upgrade import _NoiseStream
from tests.unit.test_h2server import Harness, MemorySink, until


def _pair(client_window: int = 65535,
          client_frame: int = 16384) -> tuple[h2.connection.H2Connection,
                                              h2.connection.H2Connection, int]:
    """A server and a client h2 connection with one request open (stream 1)."""
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.local_settings = h2.settings.Settings(client=True, initial_values={
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: client_window,
        h2.settings.SettingCodes.MAX_FRAME_SIZE: client_frame})
    client.initiate_connection()
    server.initiate_connection()
    client.send_headers(1, [(":method", "POST"), (":scheme", "https"), (":authority", "x"),
                            (":path", "/machine/map")], end_stream=True)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())  # the SETTINGS ACK
    server.send_headers(1, [(":status", "200")])
    client.receive_data(server.data_to_send())
    return server, client, 1


def _received(client: h2.connection.H2Connection, wire: bytes) -> tuple[bytes, list[int]]:
    events = client.receive_data(wire)
    data = [e for e in events if isinstance(e, h2.events.DataReceived)]
    return b"".join(e.data for e in data), [len(e.data) for e in data]


def test_frames_read_as_h2s_own_and_windows_stay_exact() -> None:
    server, client, sid = _pair(client_window=1 << 20)
    payload = bytes(range(256)) * 200  # 51 200 bytes: four frames at 16 384
    before = server.local_flow_control_window(sid)
    built = data_frames(server, sid, memoryview(payload))
    assert built is not None
    frames, n = built
    assert n == len(payload)
    data, sizes = _received(client, frames)
    assert data == payload and max(sizes) <= 16384 and len(sizes) == 4
    # h2 counts what it did not send itself: the connection window (65 535) bounds it.
    assert server.outbound_flow_control_window == 65535 - n
    assert server.local_flow_control_window(sid) == before - n
    # h2 keeps working on the same stream afterwards (its own DATA and END_STREAM).
    server.send_data(sid, b"tail", end_stream=True)
    events = client.receive_data(server.data_to_send())
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)


def test_takes_only_what_the_windows_allow() -> None:
    server, client, sid = _pair()
    built = data_frames(server, sid, memoryview(b"x" * 100_000))
    assert built is not None and built[1] == 65535  # the peer's initial stream window
    assert _received(client, built[0])[0] == b"x" * 65535
    assert data_frames(server, sid, memoryview(b"more")) == (b"", 0)  # exhausted: nothing
    assert server.local_flow_control_window(sid) == 0
    client.increment_flow_control_window(1000, sid)
    client.increment_flow_control_window(3000)  # the connection's: the stream's bounds it
    server.receive_data(client.data_to_send())
    built = data_frames(server, sid, memoryview(b"y" * 5000))
    assert built is not None and built[1] == 1000
    assert _received(client, built[0])[0] == b"y" * 1000
    assert server.outbound_flow_control_window == 2000


def test_closed_stream_or_connection_is_left_to_h2() -> None:
    server, client, sid = _pair()
    client.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    server.receive_data(client.data_to_send())
    assert data_frames(server, sid, memoryview(b"late")) is None
    with pytest.raises(h2.exceptions.StreamClosedError):
        server.send_data(sid, b"late")  # what the caller's fallback then raises
    assert data_frames(server, 99, memoryview(b"never opened")) is None
    server2, _, sid2 = _pair()
    server2.close_connection()
    assert data_frames(server2, sid2, memoryview(b"after GOAWAY")) is None


def test_a_stream_ended_by_us_is_left_to_h2() -> None:
    server, _, sid = _pair()
    server.end_stream(sid)
    assert data_frames(server, sid, memoryview(b"after END_STREAM")) is None


class SlowSink(MemorySink):
    """A socket whose buffer is full while ``full`` is set: the writer task's writes wait
    for it to drain, and nothing is written at once (write-through)."""

    def __init__(self) -> None:
        super().__init__()
        self.through = 0  # writes taken at once (write-through)
        self._room = asyncio.Event()
        self._room.set()

    @property
    def full(self) -> bool:
        return not self._room.is_set()

    @full.setter
    def full(self, value: bool) -> None:
        if value:
            self._room.clear()
        else:
            self._room.set()

    async def write(self, data: bytes) -> None:
        self.chunks.append(data)  # the transport buffers it, the peer reads it once drained
        await self._room.wait()

    def take(self) -> bytes:
        return b"" if self.full else super().take()

    def ready(self) -> bool:
        return not self.full and not self.closed

    def write_nowait(self, data: bytes) -> None:
        assert not self.full
        self.through += 1
        super().write_nowait(data)


def _slow(dispatch: Callable[[ControlRequest, ResponseStream], Awaitable[None]]
          ) -> tuple[Harness, SlowSink]:
    h = Harness(dispatch)
    sink = SlowSink()
    h.conn.sink = sink
    h.sink = sink
    h.start()
    return h, sink


async def test_records_stay_in_order_across_write_through_and_writer() -> None:
    """Frames alternate between a sink that takes them at once and one that is full (the
    writer task then seals them): every record must still open in order on the client."""
    parts = [bytes([i]) * (100 + i) for i in range(40)]
    wrote = asyncio.Event()

    async def dispatch(req: ControlRequest, resp: ResponseStream) -> None:
        await resp.start(200)
        for part in parts:
            await resp.write(part)
            await asyncio.sleep(0)
        await resp.end()
        wrote.set()

    h, sink = _slow(dispatch)
    sid = h.request("/machine/map")
    for i in range(400):
        sink.full = i % 3 == 0
        await h.pump(rounds=1)  # the client's record layer refuses any record out of order
        if h.ended(sid):
            break
    assert wrote.is_set() and h.body(sid) == b"".join(parts)
    assert sink.through > 0 and not h.conn.closing


async def test_slow_reader_holds_output_until_it_reads() -> None:
    """A peer whose socket stays full: past what the socket and the connection may hold
    (twice HIGH_WATER) the handler's write waits, nothing is written at once, and
    everything arrives once the socket drains."""
    size = 3 * HIGH_WATER
    done = asyncio.Event()

    async def dispatch(req: ControlRequest, resp: ResponseStream) -> None:
        await resp.start(200)
        await resp.write(b"z" * size)
        await resp.end()
        done.set()

    h, sink = _slow(dispatch)
    # Windows far larger than the body: only the socket can hold the handler back.
    h.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 24})
    h.h2.increment_flow_control_window((1 << 24) - 65535)
    h.send()
    await h.pump()
    through = sink.through
    sink.full = True
    sid = h.request("/machine/map")
    for _ in range(10):
        await h.pump()
    assert not done.is_set() and sink.through == through and not h.conn.closing
    sink.full = False
    await until(h, lambda: h.ended(sid))
    assert done.is_set() and h.body(sid) == b"z" * size


async def test_two_streams_share_an_exhausted_connection_window() -> None:
    size = 50_000  # two of them exceed the 65 535-byte connection window
    finished: list[int] = []

    async def dispatch(req: ControlRequest, resp: ResponseStream) -> None:
        await resp.start(200)
        await resp.write(b"a" * size)
        await resp.end()
        finished.append(resp.stream_id)

    h = Harness(dispatch)
    h.start()
    a, b = h.request("/one"), h.request("/two")
    for _ in range(10):
        await h.pump()
    # The first stream fits; the second stops where the connection window ran out.
    assert len(h.body(a)) + len(h.body(b)) == 65535 and finished == [a]
    acked: dict[int, int] = {a: 0, b: 0}
    for _ in range(200):
        for sid in (a, b):
            got = sum(e.flow_controlled_length for e in h.of(sid, h2.events.DataReceived))
            if got > acked[sid]:
                h.h2.acknowledge_received_data(got - acked[sid], sid)
                acked[sid] = got
        h.send()
        await h.pump()
        if h.ended(a) and h.ended(b):
            break
    assert sorted(finished) == [a, b] and h.body(a) == h.body(b) == b"a" * size


async def test_stream_reset_while_waiting_for_window_raises_stream_gone() -> None:
    """A map poll's writer waits for window when the client resets its stream: the write
    ends with StreamGone, and the connection serves the next request."""
    streams: list[ResponseStream] = []

    async def dispatch(req: ControlRequest, resp: ResponseStream) -> None:
        await resp.start(200)
        if req.path == "/after":
            await resp.end()
            return
        streams.append(resp)
        await asyncio.sleep(3600)

    h = Harness(dispatch)
    h.start()
    sid = h.request("/machine/map")
    await until(h, lambda: bool(streams))
    writer = asyncio.create_task(streams[0].write(b"w" * 100_000))
    await until(h, lambda: len(h.body(sid)) == 65535)
    assert not writer.done()  # waiting for a WINDOW_UPDATE that never comes
    h.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    h.send()
    await h.pump()
    with pytest.raises(StreamGone):
        await asyncio.wait_for(writer, 2)
    assert not h.conn.closing
    other = h.request("/after")
    await until(h, lambda: h.ended(other))
    assert h.status(other) == 200
    h.conn.close("test")
    await asyncio.wait_for(h.conn.wait_closed(), 2)


class CountingSink(MemorySink):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    async def write(self, data: bytes) -> None:
        self.writes += 1
        await super().write(data)

    def write_nowait(self, data: bytes) -> None:
        self.writes += 1
        super().write_nowait(data)


async def _writes_for(dispatch: Callable[[ControlRequest, ResponseStream], Awaitable[None]]
                      ) -> tuple[int, Harness, int]:
    h = Harness(dispatch)
    sink = CountingSink()
    h.conn.sink = sink
    h.sink = sink
    h.start()
    await h.pump()
    before = sink.writes
    sid = h.request("/machine/x")
    await until(h, lambda: h.status(sid) is not None)
    await h.pump()
    return sink.writes - before, h, sid


async def test_a_small_response_is_one_write() -> None:
    """Head, body and END_STREAM of a register-sized answer leave in one record and one
    socket write (each write is a TCP segment with TCP_NODELAY)."""
    async def dispatch(req: ControlRequest, resp: ResponseStream) -> None:
        await resp.start(200, [("content-type", "application/json")])
        await resp.end(b'{"ok":true}')

    writes, h, sid = await _writes_for(dispatch)
    assert writes == 1 and h.ended(sid) and h.body(sid) == b'{"ok":true}'
    assert h.status(sid) == 200


async def test_a_first_map_is_one_write() -> None:
    """A map stream's head and its first frame: one write; the stream stays open."""
    frame = b"m" * 3000
    release = asyncio.Event()

    async def dispatch(req: ControlRequest, resp: ResponseStream) -> None:
        await resp.start(200, [("content-type", "application/json")])
        await resp.write(frame)
        await release.wait()
        await resp.end()

    writes, h, sid = await _writes_for(dispatch)
    assert writes == 1 and h.status(sid) == 200 and h.body(sid) == frame
    assert not h.ended(sid)
    release.set()
    await until(h, lambda: h.ended(sid))


async def test_a_head_alone_still_goes_out() -> None:
    """A handler that starts its response and then waits: the head is not held back."""
    async def dispatch(req: ControlRequest, resp: ResponseStream) -> None:
        await resp.start(200)
        await asyncio.sleep(3600)

    writes, h, sid = await _writes_for(dispatch)
    assert writes == 1 and h.status(sid) == 200


async def test_a_peer_that_never_reads_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a real socket whose peer never reads: the transport pauses (ready() turns false),
    output then queues in the connection, and past MAX_UNSENT_OUTPUT (made small here) the
    connection is aborted instead of holding ever more memory."""
    limit = 3 * HIGH_WATER
    monkeypatch.setattr(h2server, "MAX_UNSENT_OUTPUT", limit)
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
    stream = _NoiseStream(transport)  # type: ignore[arg-type]
    transport.set_protocol(stream)
    transport.set_write_buffer_limits(high=16 * 1024)

    async def dispatch(req: ControlRequest, resp: ResponseStream) -> None:
        await resp.start(200)
        await resp.write(b"q" * (2 * HIGH_WATER))
        await asyncio.sleep(3600)

    h = Harness(dispatch)
    h.conn.sink = stream
    stream.conn = h.conn
    try:
        h.start()
        h.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 24})
        h.h2.increment_flow_control_window((1 << 24) - 65535)
        h.send()
        paused_and_queued = 0
        for _ in range(8):
            h.request("/machine/map")
            for _ in range(20):
                await asyncio.sleep(0)
                if not stream.ready() and len(h.conn._plain_out) > HIGH_WATER:
                    paused_and_queued += 1
            if h.conn.closing:
                break
        await asyncio.wait_for(h.conn.wait_closed(), 5)
        assert paused_and_queued > 0
        assert h.conn.close_reason == "peer does not read its output"
        assert transport.is_closing() and len(h.conn._plain_out) < 100  # a GOAWAY at most
    finally:
        transport.abort()
        theirs.close()


@pytest.mark.parametrize("seed", range(30))
def test_frames_and_windows_match_h2s_send_data_on_a_twin(seed: int) -> None:
    """data_frames writes DATA frames beside h2 and moves h2's windows itself (h2 internals):
    for random payloads, window updates, SETTINGS changes (initial window, frame size), an
    identical twin connection sending through ``H2Connection.send_data`` must put the same
    bytes on the wire and end with the same windows. A release of h2 that changes how it
    frames or counts fails here."""
    rng = random.Random(seed)
    window, frame = rng.randint(0, 1 << 17), rng.choice([16384, 20000, 1 << 16])
    ours, our_client, sid = _pair(window, frame)
    twin, twin_client, _ = _pair(window, frame)
    for _ in range(12):
        payload = rng.randbytes(rng.randint(0, 150_000))
        built = data_frames(ours, sid, memoryview(payload))
        assert built is not None
        frames, n = built
        room = max(0, min(len(payload), twin.local_flow_control_window(sid)))
        step = twin.max_outbound_frame_size
        for at in range(0, room, step):
            twin.send_data(sid, payload[at:min(at + step, room)])
        twin_frames = twin.data_to_send()
        assert n == room and frames == twin_frames
        assert ours.local_flow_control_window(sid) == twin.local_flow_control_window(sid)
        assert ours.outbound_flow_control_window == twin.outbound_flow_control_window
        assert ours.max_outbound_frame_size == twin.max_outbound_frame_size
        # The peer opens windows or changes its settings, the same on both sides.
        k, grow = rng.randrange(4), rng.randint(1, 1 << 17)
        settings = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: rng.randint(0, 1 << 17),
                    h2.settings.SettingCodes.MAX_FRAME_SIZE: rng.choice([16384, 30000])}
        for client in (our_client, twin_client):
            if k == 0:
                client.increment_flow_control_window(grow, sid)
            elif k == 1:
                client.increment_flow_control_window(grow)
            elif k == 2:
                client.update_settings(settings)
        ours.receive_data(our_client.data_to_send())
        twin.receive_data(twin_client.data_to_send())
        assert ours.data_to_send() == twin.data_to_send()  # SETTINGS ACKs
        assert ours.local_flow_control_window(sid) == twin.local_flow_control_window(sid)
