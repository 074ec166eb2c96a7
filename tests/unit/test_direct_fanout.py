"""A parked map stream's frame built and written inside the bus's fan-out (poll._Direct,
H2ResponseStream.write_now): frames reach the client whole and in order whichever path
writes them, and nothing is written at once that would have to wait."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import h2.settings
import pytest

from pyheadscale.control import poll as poll_mod
from pyheadscale.control.h2data import data_frames
from pyheadscale.control.poll import MapPoll, stream_maps
from pyheadscale.control.types import ControlRequest, ResponseStream
from pyheadscale.mapper import MapContext, PeerCache
from pyheadscale.mapper.encode import decode_frame
from pyheadscale.mapper.fanout import SharedDeltas
from pyheadscale.state.changes import Change, ChangeBus, ChangeKind, Field
from pyheadscale.state.model import Node
from tests.unit._statefix import make_node
from tests.unit.test_h2data import SlowSink, _pair, _received
from tests.unit.test_h2server import Harness, until


def _frames(body: bytes) -> list[dict[str, Any]]:
    out = []
    while body:
        value, body = decode_frame(body)
        out.append(value)
    return out


def test_whole_takes_all_of_it_or_nothing() -> None:
    server, client, sid = _pair()
    window = server.local_flow_control_window(sid)
    assert data_frames(server, sid, memoryview(b"x" * (window + 1)), whole=True) == (b"", 0)
    assert server.local_flow_control_window(sid) == window  # nothing taken
    built = data_frames(server, sid, memoryview(b"x" * window), whole=True)
    assert built is not None and built[1] == window
    assert _received(client, built[0])[0] == b"x" * window


class _Session:
    """One map stream of node 1 on a real connection; node 2 is its peer."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.nodes: dict[int, Node] = {
            i: make_node(i, node_key=bytes([i]) * 32, machine_key=bytes([i + 10]) * 32,
                         disco_key=bytes([i + 20]) * 32, online=True, capver=131,
                         endpoints=("192.0.2.1:41641",))
            for i in (1, 2)}
        self.bus = ChangeBus(batch_delay=0.01)
        tn = SimpleNamespace(nodes=self.nodes, users={}, bus=self.bus,
                             get_node=self.nodes.__getitem__)
        ctx = MapContext()
        self.poll = MapPoll(tn, lambda: ctx, PeerCache(), SharedDeltas(),  # type: ignore[arg-type]
                            lambda _nid: None)
        self.task_frames = 0
        real = poll_mod._send_batch

        async def counted(*args: Any, **kw: Any) -> bool:
            self.task_frames += 1
            return await real(*args, **kw)

        monkeypatch.setattr(poll_mod, "_send_batch", counted)

        async def dispatch(req: ControlRequest, resp: ResponseStream) -> None:
            sub = self.bus.subscribe(1)
            await resp.start(200)
            await stream_maps(self.poll, 1, sub, resp)

        self.h = Harness(dispatch)
        self.sink = SlowSink()
        self.h.conn.sink = self.h.sink = self.sink
        self.h.start()
        # Windows far larger than any frame here: only the socket can hold a frame back.
        self.h.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 24})
        self.h.h2.increment_flow_control_window((1 << 24) - 65535)
        self.h.send()
        self.sid = self.h.request("/machine/map")

    def move(self, port: int) -> None:
        self.nodes[2] = replace(self.nodes[2], endpoints=(f"192.0.2.2:{port}",))
        self.bus.publish(Change(ChangeKind.NODE_PATCH, 2, frozenset({Field.ENDPOINTS})))

    def ports(self) -> list[str]:
        return [p["Endpoints"][0].split(":")[1] for f in _frames(self.h.body(self.sid))
                for p in f.get("PeersChangedPatch", ())]


async def test_a_parked_stream_writes_its_frame_inside_the_fanout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    s = _Session(monkeypatch)
    await until(s.h, lambda: len(_frames(s.h.body(s.sid))) == 1)  # the first map
    await asyncio.sleep(0.02)  # parked
    through = s.sink.through
    s.move(1001)
    await asyncio.sleep(0.05)
    assert s.sink.through == through + 1  # one socket write, made in the fan-out
    await until(s.h, lambda: s.ports() == ["1001"])
    assert s.task_frames == 0  # the stream's task never built a frame


async def test_a_frame_the_socket_cannot_take_now_is_written_by_the_task_in_order(
        monkeypatch: pytest.MonkeyPatch) -> None:
    s = _Session(monkeypatch)
    await until(s.h, lambda: len(_frames(s.h.body(s.sid))) == 1)
    await asyncio.sleep(0.02)
    s.sink.full = True  # the socket holds output: the fan-out must not write
    s.move(1002)
    await asyncio.sleep(0.05)
    s.move(1003)  # the writer still waits on the socket: held for the task again
    await asyncio.sleep(0.05)
    assert s.ports() == [] and not s.h.conn.closing
    s.sink.full = False
    await until(s.h, lambda: len(s.ports()) == 2)
    assert s.ports() == ["1002", "1003"]
    # Parked again with a socket that takes data: back to the fan-out's writes.
    await asyncio.sleep(0.02)
    through = s.sink.through
    s.move(1004)
    await asyncio.sleep(0.05)
    assert s.sink.through == through + 1
    await until(s.h, lambda: len(s.ports()) == 3)
    assert s.ports()[-1] == "1004"


async def test_write_now_writes_nothing_that_would_wait_for_a_window() -> None:
    """A body larger than the stream's window is refused whole (no DATA taken off the
    windows); write() then sends it as the windows open, after what went before."""
    outcome: list[bool] = []
    go = asyncio.Event()

    async def dispatch(req: ControlRequest, resp: ResponseStream) -> None:
        await resp.start(200)
        outcome.append(resp.write_now(b"a" * 100))  # fits: written at once
        outcome.append(resp.write_now(b"b" * 70_000))  # beyond the 65 535-byte window
        await go.wait()
        await resp.write(b"b" * 70_000)
        await resp.end()

    h = Harness(dispatch)
    h.start()
    sid = h.request("/machine/map")
    await until(h, lambda: len(outcome) == 2)
    assert outcome == [True, False]
    assert h.conn.h2.local_flow_control_window(sid) == 65535 - 100
    go.set()
    got = 0
    for _ in range(200):  # the client gives window back as it reads
        await h.pump()
        body = len(h.body(sid))
        if body > got:
            h.h2.acknowledge_received_data(body - got, sid)
            got = body
            h.send()
        if h.ended(sid):
            break
    assert h.body(sid) == b"a" * 100 + b"b" * 70_000


async def test_frames_written_in_the_fanout_put_the_keepalive_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A keep-alive follows silence, not the task's own last write: frames the fan-out
    wrote while the task waited count."""
    monkeypatch.setattr(poll_mod, "KEEPALIVE_BASE_S", 0.4)
    monkeypatch.setattr(poll_mod, "KEEPALIVE_JITTER_S", 0.0)
    s = _Session(monkeypatch)
    await until(s.h, lambda: len(_frames(s.h.body(s.sid))) == 1)

    def keepalives() -> int:
        return sum(1 for f in _frames(s.h.body(s.sid)) if f == {"KeepAlive": True})

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for port in range(2001, 2008):  # a frame every 0.1 s for 0.7 s, all written in fan-outs
        s.move(port)
        await asyncio.sleep(0.1)
        await s.h.pump()
    assert loop.time() - t0 > 0.6 and keepalives() == 0 and s.task_frames == 0
    await asyncio.sleep(0.6)  # silence: the keep-alive is due 0.4 s after the last frame
    await until(s.h, lambda: keepalives() == 1)
    assert len(s.ports()) == 7
