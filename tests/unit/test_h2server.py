"""H2ControlConnection driven in memory: a Noise+h2 client harness talks to it directly."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest

from pyheadscale.control.h2server import H2ControlConnection
from pyheadscale.control.types import ControlRequest, ResponseStream, StreamGone
from pyheadscale.noise import Initiator, RecordLayer, generate_private_key, public_key, respond


class MemorySink:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.closed = False
        self.event = asyncio.Event()

    async def write(self, data: bytes) -> None:
        self.chunks.append(data)
        self.event.set()

    def ready(self) -> bool:
        return not self.closed

    def write_nowait(self, data: bytes) -> None:
        self.chunks.append(data)
        self.event.set()

    async def close(self) -> None:
        self.closed = True
        self.event.set()

    def abort(self) -> None:
        self.closed = True
        self.event.set()

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks.clear()
        return data


Handler = Callable[[ControlRequest, ResponseStream], Awaitable[None]]


class Harness:
    """Client side: seals h2 client frames, opens the server's records."""

    def __init__(self, dispatch: Handler, max_body: int = 1 << 20, **kw: Any) -> None:
        skey = generate_private_key()
        self.machine = generate_private_key()
        ini = Initiator(self.machine, public_key(skey), 131)
        res = respond(skey, ini.initiation())
        self.client_records: RecordLayer = ini.finish(res.message).records()
        self.preamble = res.message
        self.sink = MemorySink()
        self.conn = H2ControlConnection(
            records=res.records(),
            sink=self.sink,
            dispatch=dispatch,
            machine_key=res.peer_static,
            capver=res.version,
            conn_id=7,
            max_body=max_body,
            **kw,
        )
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.events: list[h2.events.Event] = []
        self.plain = bytearray()
        self._got_preamble = False

    def start(self) -> None:
        self.conn.start(preamble=self.preamble)
        self.h2.initiate_connection()
        self.send()

    def send(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.conn.feed(self.client_records.seal(data))

    async def pump(self, rounds: int = 5) -> None:
        for _ in range(rounds):
            await asyncio.sleep(0)
        wire = self.sink.take()
        if not self._got_preamble and wire:
            assert wire[:51] == self.preamble
            wire = wire[51:]
            self._got_preamble = True
        for pt in self.client_records.feed(wire):
            self.plain += pt
            self.events += self.h2.receive_data(pt)
        self.send()

    def request(self, path: str, body: bytes = b"", *, cl: bool = True) -> int:
        sid = self.h2.get_next_available_stream_id()
        hdrs = [
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", "unused"),
            (":path", path),
            ("ts-lb", "a"),
            ("ts-lb", "b"),
        ]
        if cl:
            hdrs.append(("content-length", str(len(body))))
        self.h2.send_headers(sid, hdrs, end_stream=not body)
        if body:
            self.h2.send_data(sid, body, end_stream=True)
        self.send()
        return sid

    def of(self, sid: int, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind) and e.stream_id == sid]

    def status(self, sid: int) -> int | None:
        for e in self.of(sid, h2.events.ResponseReceived):
            return int(dict(e.headers)[b":status"])
        return None

    def body(self, sid: int) -> bytes:
        return b"".join(e.data for e in self.of(sid, h2.events.DataReceived))

    def ended(self, sid: int) -> bool:
        return bool(self.of(sid, h2.events.StreamEnded))


async def until(h: Harness, cond: Callable[[], bool], rounds: int = 200) -> None:
    for _ in range(rounds):
        await h.pump()
        if cond():
            return
    raise AssertionError("condition not reached")


async def test_settings_first_and_request_fields() -> None:
    seen: list[ControlRequest] = []

    async def dispatch(req: ControlRequest, resp: ResponseStream) -> None:
        seen.append(req)
        await resp.start(200, [("Content-Type", "application/json")])
        await resp.end(b"{}")

    h = Harness(dispatch)
    h.conn.start(preamble=h.preamble)
    await asyncio.sleep(0)
    wire = h.sink.take()
    assert wire[:51] == h.preamble
    first = h.client_records.feed(wire[51:])[0]
    # The first 9 plaintext bytes are an HTTP/2 frame header of a SETTINGS frame: the client
    # reads them before anything else.
    assert first[3] == 0x04 and first[4] == 0 and first[5:9] == b"\0\0\0\0"
    h._got_preamble = True
    h.h2.initiate_connection()
    h.events += h.h2.receive_data(first)
    h.send()
    sid = h.request("/machine/register?x=1", b'{"a":1}')
    await until(h, lambda: h.ended(sid))
    assert h.status(sid) == 200 and h.body(sid) == b"{}"
    req = seen[0]
    assert (req.method, req.path, req.query, req.body) == (
        "POST",
        "/machine/register",
        "x=1",
        b'{"a":1}',
    )
    assert req.headers["ts-lb"] == "a, b" and ("ts-lb", "b") in req.header_list
    assert req.machine_key == public_key(h.machine) and req.capver == 131 and req.conn_id == 7


async def test_error_before_start_is_500_and_after_start_resets() -> None:
    async def dispatch(req: ControlRequest, resp: ResponseStream) -> None:
        if req.path == "/late":
            await resp.start(200)
            await resp.write(b"partial")
        raise RuntimeError("boom")

    h = Harness(dispatch)
    h.start()
    a, b = h.request("/early"), h.request("/late")
    await until(h, lambda: h.ended(a) and bool(h.of(b, h2.events.StreamReset)))
    assert h.status(a) == 500 and b"internal server error" in h.body(a)
    resets = h.of(b, h2.events.StreamReset)
    assert h.status(b) == 200 and resets[0].error_code == h2.errors.ErrorCodes.INTERNAL_ERROR
    assert not h.conn.closing


async def test_client_reset_cancels_handler() -> None:
    cancelled = asyncio.Event()
    started = asyncio.Event()

    async def dispatch(req: ControlRequest, resp: ResponseStream) -> None:
        await resp.start(200)
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    h = Harness(dispatch)
    h.start()
    sid = h.request("/machine/map")
    await until(h, lambda: started.is_set())
    h.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    h.send()
    await until(h, cancelled.is_set)
    assert not h.conn.closing and h.conn.active_streams == 0


async def test_body_cap_413_connection_survives() -> None:
    async def dispatch(req: ControlRequest, resp: ResponseStream) -> None:
        await resp.end(b"ok %d" % len(req.body))

    h = Harness(dispatch, max_body=1000)
    h.start()
    big = h.request("/big", b"x" * 1001, cl=False)  # cap detected while reading DATA
    declared = h.request("/declared", b"y" * 2000)  # cap detected from content-length
    small = h.request("/small", b"z" * 1000)
    await until(h, lambda: h.ended(big) and h.ended(declared) and h.ended(small))
    assert h.status(big) == 413 and h.status(declared) == 413
    assert b"too large" in h.body(big)
    assert h.status(small) == 200 and h.body(small) == b"ok 1000"
    assert not h.conn.closing


async def test_outbound_flow_control_waits_for_window_update() -> None:
    size = 200_000
    done = asyncio.Event()

    async def dispatch(req: ControlRequest, resp: ResponseStream) -> None:
        await resp.start(200)
        await resp.write(bytes(range(256)) * (size // 256) + b"!" * (size % 256))
        await resp.end()
        done.set()

    h = Harness(dispatch)
    h.start()
    sid = h.request("/stream")
    for _ in range(10):
        await h.pump()
    # The client never acknowledged: the server must stop at the initial 65 535-byte window.
    assert len(h.body(sid)) == 65535 and not done.is_set()
    for _ in range(200):
        got = sum(e.flow_controlled_length for e in h.of(sid, h2.events.DataReceived))
        acked = getattr(h, "_acked", 0)
        if got > acked:
            h.h2.acknowledge_received_data(got - acked, sid)
            h._acked = got  # type: ignore[attr-defined]
            h.send()
        await h.pump()
        if h.ended(sid):
            break
    assert done.is_set() and len(h.body(sid)) == size


async def test_inbound_data_is_acknowledged() -> None:
    async def dispatch(req: ControlRequest, resp: ResponseStream) -> None:
        await resp.end(b"")

    h = Harness(dispatch)
    h.start()
    for _ in range(12):  # 12 * 10 000 > 65 535: would stall without WINDOW_UPDATEs
        sid = h.request("/machine/map", b"q" * 10_000)
        await until(h, lambda sid=sid: h.ended(sid))
    assert h.h2.outbound_flow_control_window >= 65535 - 10_000


async def test_write_after_reset_raises_stream_gone() -> None:
    streams: list[ResponseStream] = []

    async def dispatch(req: ControlRequest, resp: ResponseStream) -> None:
        await resp.start(200)
        streams.append(resp)
        await asyncio.sleep(3600)

    h = Harness(dispatch)
    h.start()
    sid = h.request("/x")
    await until(h, lambda: bool(streams))
    resp = streams[0]
    assert not resp.closed
    h.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    h.send()
    await h.pump()
    assert resp.closed
    with pytest.raises(StreamGone):
        await resp.write(b"late")  # e.g. a map poll writer in another task
    h.conn.close("test")
    await asyncio.wait_for(h.conn.wait_closed(), 2)
    assert h.sink.closed


@pytest.mark.parametrize("garbage", ["h2", "record", "type"])
async def test_garbage_closes_connection(garbage: str) -> None:
    async def dispatch(req: ControlRequest, resp: ResponseStream) -> None:
        await resp.end(b"ok")

    h = Harness(dispatch)
    h.start()
    sid = h.request("/ok")
    await until(h, lambda: h.ended(sid))
    if garbage == "h2":
        # A DATA frame on stream 0 is a connection error (PROTOCOL_ERROR).
        h.conn.feed(h.client_records.seal(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00X"))
    elif garbage == "record":
        h.conn.feed(b"\x04\x00\x20" + b"\x00" * 32)
    else:
        h.conn.feed(b"\x17\x03\x03\x00\x10" + b"\x00" * 16)
    await asyncio.wait_for(h.conn.wait_closed(), 2)
    assert h.conn.closing and h.sink.closed
    if garbage == "h2":  # one GOAWAY was sent before closing, saying why
        await h.pump()
        codes = [e.error_code for e in h.events if isinstance(e, h2.events.ConnectionTerminated)]
        assert codes == [h2.errors.ErrorCodes.PROTOCOL_ERROR]


def _raw_client(h: Harness) -> None:
    """Let the harness's client send heads h2 would refuse to send."""
    h.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False,
        normalize_outbound_headers=False))


async def test_host_beside_authority_is_dropped_not_compared() -> None:
    # tailscale-rs (hyper) sends `:authority host:port` and `host: host`: h2 alone refuses the
    # pair as mismatched; Go's server (Headscale's) takes :authority, and so do we.
    seen: list[ControlRequest] = []

    async def dispatch(req: ControlRequest, resp: ResponseStream) -> None:
        seen.append(req)
        await resp.end(b"ok")

    h = Harness(dispatch)
    _raw_client(h)
    h.start()
    for host in (b"198.51.100.1", b"other.example", b"198.51.100.1:8080"):
        sid = h.h2.get_next_available_stream_id()
        h.h2.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"),
                                (b":authority", b"198.51.100.1:8080"),
                                (b":path", b"/machine/register"), (b"host", host)],
                          end_stream=True)
        h.send()
        await until(h, lambda sid=sid: h.ended(sid))
        assert h.status(sid) == 200 and h.body(sid) == b"ok"
    assert not h.conn.closing
    assert [r.path for r in seen] == ["/machine/register"] * 3
    assert all("host" not in r.headers for r in seen)


@pytest.mark.parametrize("head", [
    # h2's own checks still hold for everything else in a request head.
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/x"),
     (b":authority", b"a"), (b"Upper", b"1")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/x"),
     (b":authority", b"a"), (b"connection", b"keep-alive")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a")],  # no :path
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/x")],  # no authority, no Host
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/x"),
     (b"host", b"a"), (b"host", b"b")],
], ids=["uppercase-name", "connection-header", "no-path", "no-authority", "two-hosts"])
async def test_malformed_request_head_closes_connection(head: list[tuple[bytes, bytes]]
                                                        ) -> None:
    called = False

    async def dispatch(req: ControlRequest, resp: ResponseStream) -> None:
        nonlocal called
        called = True
        await resp.end(b"ok")

    h = Harness(dispatch)
    _raw_client(h)
    h.start()
    h.h2.send_headers(h.h2.get_next_available_stream_id(), head, end_stream=True)
    h.send()
    await asyncio.wait_for(h.conn.wait_closed(), 2)
    await h.pump()
    goaway = [e.error_code for e in h.events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway == [h2.errors.ErrorCodes.PROTOCOL_ERROR]  # one GOAWAY, saying why
    assert not called and h.sink.closed
