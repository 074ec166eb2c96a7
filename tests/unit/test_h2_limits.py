"""What a hostile peer can make one HTTP/2-over-Noise connection hold (control/h2limits.py)."""

from __future__ import annotations

import asyncio

import h2.errors
import h2.events

from pyheadscale.control.h2limits import BodyBudget, H2Limits
from pyheadscale.control.types import ControlRequest, ResponseStream
from tests.unit.test_h2server import Harness, until

CAP = 256 * 1024


async def echo_len(req: ControlRequest, resp: ResponseStream) -> None:
    await resp.end(str(len(req.body)).encode())


def open_body(h: Harness, sid_body: int | None = None) -> int:
    """Start a POST whose body never ends; returns its stream id."""
    sid = h.h2.get_next_available_stream_id()
    h.h2.send_headers(sid, [(":method", "POST"), (":scheme", "https"),
                            (":authority", "unused"), (":path", "/machine/map")])
    h.send()
    return sid


def push(h: Harness, sid: int, n: int) -> int:
    """Send up to n body bytes on sid, as far as the server's windows allow; returns sent."""
    sent = 0
    while sent < n:
        room = min(h.h2.local_flow_control_window(sid), h.h2.max_outbound_frame_size, n - sent)
        if room <= 0:
            break
        h.h2.send_data(sid, b"x" * room)
        sent += room
    h.send()
    return sent


async def test_unfinished_bodies_stall_on_their_window_not_in_memory() -> None:
    budget = BodyBudget(64 << 20)
    h = Harness(echo_len, max_body=CAP, limits=H2Limits(max_buffered_body=CAP), budget=budget)
    h.start()
    await h.pump()
    sent = {open_body(h): 0 for _ in range(20)}
    sids = list(sent)
    for _ in range(200):
        progress = 0
        for sid in sids:  # each body stays under max_body: only the connection cap binds
            n = push(h, sid, 200_000 - sent[sid])
            sent[sid] += n
            progress += n
        await h.pump()
        if progress == 0:
            break
    total = sum(sent.values())
    assert h.h2.outbound_flow_control_window == 0  # the client is stalled
    assert CAP < total <= CAP + 65535 and h.conn.buffered == total
    assert budget.used == total

    # A stream going away gives its bytes and the window back; the others proceed.
    h.h2.reset_stream(sids[0], h2.errors.ErrorCodes.CANCEL)
    h.send()
    await h.pump()
    assert h.conn.buffered < total and h.h2.outbound_flow_control_window > 0
    h.conn.close("test over")
    assert budget.used == 0


async def test_window_comes_back_when_a_handler_takes_its_body() -> None:
    h = Harness(echo_len, max_body=CAP, limits=H2Limits(max_buffered_body=CAP))
    h.start()
    await h.pump()
    first = open_body(h)
    left = 100_000
    while left:
        left -= push(h, first, left)
        await h.pump()
    second = open_body(h)
    left = 250_000
    for _ in range(50):
        left -= push(h, second, left)
        await h.pump()
    assert left > 0  # stalled: the two bodies together are over the connection's cap
    h.h2.end_stream(first)  # an empty END_STREAM needs no window
    h.send()
    await until(h, lambda: h.ended(first))
    assert h.body(first) == b"100000"
    for _ in range(50):  # the first handler took its body: window for the second again
        left -= push(h, second, left)
        await h.pump()
        if left == 0:
            break
    h.h2.end_stream(second)
    h.send()
    await until(h, lambda: h.ended(second))
    assert h.body(second) == b"250000" and h.conn.buffered == 0


async def test_a_body_that_does_not_finish_in_time_is_reset() -> None:
    h = Harness(echo_len, limits=H2Limits(body_timeout=0.2))
    h.start()
    await h.pump()
    sid = open_body(h)
    push(h, sid, 5000)
    await h.pump()
    assert h.conn.buffered == 5000
    await asyncio.sleep(0.3)
    await h.pump()
    resets = h.of(sid, h2.events.StreamReset)
    assert resets and resets[0].error_code == h2.errors.ErrorCodes.CANCEL
    assert h.conn.buffered == 0 and not h.conn.closing


async def test_max_concurrent_streams_is_advertised_and_enforced() -> None:
    h = Harness(echo_len, limits=H2Limits(max_concurrent_streams=3))
    h.start()
    for _ in range(5):  # before the client has seen our SETTINGS
        open_body(h)
    await h.pump()
    assert h.conn.closing and "HTTP/2 protocol error" in h.conn.close_reason
    h2c = Harness(echo_len, limits=H2Limits(max_concurrent_streams=3))
    h2c.start()
    await h2c.pump()
    assert h2c.h2.remote_settings.max_concurrent_streams == 3


class StuckSink:
    """A socket the peer never reads from: writes never complete."""

    def __init__(self) -> None:
        self.closed = False
        self.chunks: list[bytes] = []
        self.event = asyncio.Event()
        self._never = asyncio.Event()

    async def write(self, data: bytes) -> None:
        self.chunks.append(data)
        await self._never.wait()

    def ready(self) -> bool:
        return False  # never: every write goes through the (stuck) writer task

    def write_nowait(self, data: bytes) -> None:
        raise AssertionError("not ready, never written to at once")

    async def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks.clear()
        return data


async def test_pings_the_peer_never_reads_close_the_connection() -> None:
    h = Harness(echo_len, limits=H2Limits(max_queued_control_frames=1000))
    stuck = StuckSink()
    h.conn.sink = stuck
    h.sink = stuck  # type: ignore[assignment]
    h.start()
    await asyncio.sleep(0)
    for i in range(5000):
        h.h2.ping(i.to_bytes(8, "big"))
        if i % 100 == 0:
            h.send()
            await asyncio.sleep(0)
        if h.conn.closing:
            break
    assert h.conn.closing and "control frames" in h.conn.close_reason
    assert len(h.conn._plain_out) < 1000 * 17 * 2
    await asyncio.sleep(0)
    assert stuck.closed  # dropped at once: a graceful close would wait on the peer forever


async def test_no_preface_in_time_closes() -> None:
    h = Harness(echo_len, limits=H2Limits(handshake_timeout=0.1))
    h.conn.start(preamble=h.preamble)  # the client never speaks
    await asyncio.sleep(0.25)
    assert h.conn.closing and "preface" in h.conn.close_reason


async def test_idle_connections_of_unknown_machines_close() -> None:
    registered = {"yes": False}
    h = Harness(echo_len, limits=H2Limits(unregistered_idle_timeout=0.15),
                is_registered=lambda _mk: registered["yes"])
    h.start()
    sid = h.request("/machine/register", b"{}")
    await until(h, lambda: h.ended(sid))
    await asyncio.sleep(0.1)
    assert not h.conn.closing  # the clock started when the stream ended
    await asyncio.sleep(0.15)
    assert h.conn.closing and "idle" in h.conn.close_reason

    registered["yes"] = True
    k = Harness(echo_len, limits=H2Limits(unregistered_idle_timeout=0.1),
                is_registered=lambda _mk: registered["yes"])
    k.start()
    await k.pump()
    await asyncio.sleep(0.35)
    assert not k.conn.closing
    k.conn.close("test over")
