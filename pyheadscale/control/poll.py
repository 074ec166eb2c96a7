"""POST /machine/map: the streaming map poll, lite updates and single map responses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pyheadscale import metrics, tailcfg
from pyheadscale.control.admission import Admission, Refused
from pyheadscale.control.register import reply
from pyheadscale.control.types import MIN_CAPVER, ControlRequest, ResponseStream, StreamGone
from pyheadscale.logs import fields, trace
from pyheadscale.mapper.context import MapContext
from pyheadscale.mapper.encode import KEEPALIVE, encode_frame, plain_pieces, plain_size
from pyheadscale.mapper.fanout import SharedDeltas
from pyheadscale.mapper.full import KnownPeers, PeerCache
from pyheadscale.mapper.snapshot import Snapshot
from pyheadscale.state.changes import Change, Subscription
from pyheadscale.state.errors import PersistError
from pyheadscale.state.model import Node
from pyheadscale.state.tailnet import Tailnet

log = logging.getLogger("pyheadscale.poll")

# Clients kill a poll after 120 s without a frame; Headscale sends every 50 s + up to 9 s.
KEEPALIVE_BASE_S = 50.0
KEEPALIVE_JITTER_S = 9.0


@dataclass(frozen=True)
class MapPoll:
    """What the map poll uses."""

    tailnet: Tailnet
    context: Callable[[], MapContext]  # the current map context (replaced on every change)
    peer_cache: PeerCache  # encoded peer entries shared by every session
    deltas: SharedDeltas  # one encoding of each batch for every session it reaches alike
    # Server-initiated messages (HA PingRequests) waiting for a node's next frame.
    take_outbox: Callable[[int], dict[str, Any] | None]
    # New sessions open a few at a time (a reconnect storm after a restart).
    admission: Admission = field(default_factory=Admission)

    def snapshot(self) -> Snapshot:
        """What a map built now is made of."""
        tn = self.tailnet
        return Snapshot(tn.nodes, tn.users, self.context(), datetime.now(UTC), self.peer_cache)


async def handle_map(poll: MapPoll, req: ControlRequest, resp: ResponseStream) -> None:
    try:
        mr = tailcfg.parse_map_request(req.body)
    except tailcfg.TailcfgError as e:
        await reply(resp, 400, f"bad map request: {e}")
        return
    req.body = b""  # a poll lives for hours: keep the decoded request, not up to 1 MiB of it
    if mr.version < MIN_CAPVER:
        await reply(resp, 400, f"unsupported client version: capability version {mr.version}")
        return
    tn = poll.tailnet
    node = tn.node_by_node_key(mr.node_key)
    if node is None or node.machine_key != req.machine_key:
        await reply(resp, 404, "node not found")
        return

    if not mr.stream and mr.omit_peers:
        await _apply_request(tn, node.id, mr)
        await reply(resp, 200, "")
        metrics.mapresponse_endpoint_updates.labels("ok").inc()
        return
    # Whatever builds a full map waits for its turn (control/admission.py).
    asked = time.monotonic()
    ticket = await poll.admission.enter(node.id)
    waited_ms = round((time.monotonic() - asked) * 1000)
    if isinstance(ticket, Refused):  # waited too long, or a newer request took its turn
        log.debug("map request refused", extra=fields(
            node=node.id, conn=req.conn_id, reason=ticket.value, waited_ms=waited_ms,
            status=503))
        await reply(resp, 503, "busy opening other map sessions: poll again")
        return
    log.debug("map request admitted", extra=fields(node=node.id, conn=req.conn_id,
                                                   waited_ms=waited_ms))
    try:
        # The node may have been deleted or re-keyed while this request waited.
        node = tn.node_by_node_key(mr.node_key)
        if node is None or node.machine_key != req.machine_key:
            await reply(resp, 404, "node not found")
            return
        if not mr.stream:
            await _apply_request(tn, node.id, mr)
            # A one-shot map (debug/test paths): exactly one frame, then the stream ends.
            frame, _ = poll.deltas.first_frame(poll.snapshot(), tn.get_node(node.id))
            ticket.release()  # built: the write waits on the client, not on us
            await resp.start(200, [("content-type", "application/json")])
            await send_frame(resp, frame, zstd=mr.compress == "zstd")
            await resp.end()
            return
        await _stream(poll, node.id, mr, resp, ticket.release)
    finally:
        ticket.release()


async def _stream(poll: MapPoll, node_id: int, mr: tailcfg.MapRequest, resp: ResponseStream,
                  opened: Callable[[], None]) -> None:
    """The streaming poll; ``opened`` is called once its first map is built."""
    tn = poll.tailnet
    # Subscribe before building the full map so no change falls between the two.
    sub = tn.bus.subscribe(node_id)
    # "cancelled": a newer poll or the node's deletion ended it; "done": the client went.
    ended = "cancelled"
    try:
        await _apply_request(tn, node_id, mr)
        await tn.set_online(node_id, True)
        await resp.start(200, [("content-type", "application/json")])
        await stream_maps(poll, node_id, sub, resp, zstd=mr.compress == "zstd", opened=opened)
    except (StreamGone, ConnectionError):
        ended = "done"
    finally:
        metrics.mapresponse_ended.labels(ended).inc()
        sub.close()
        # A newer poll of the same node replaced this one: that one owns the online flag.
        if not tn.bus.subscribed(node_id) and node_id in tn.nodes:
            with contextlib.suppress(Exception):
                await asyncio.shield(tn.set_online(node_id, False))


async def _apply_request(tn: Tailnet, node_id: int, mr: tailcfg.MapRequest) -> None:
    """What the request reports, persisted. Without the database the map keeps flowing from
    memory: the report is dropped (the client sends it again when it changes next)."""
    try:
        await tn.update_from_map_request(
            node_id, endpoints=mr.endpoints, disco_key=mr.disco_key, hostinfo=mr.hostinfo,
            capver=mr.version)
    except PersistError as e:
        log.warning("node %d: map request not recorded: %s", node_id, e)


async def stream_maps(poll: MapPoll, node_id: int, sub: Subscription,
                      resp: ResponseStream, *, zstd: bool = True,
                      opened: Callable[[], None] | None = None) -> None:
    """`zstd`: the client asked for compressed frames (every official client does);
    `opened` is called once the first map is built, before it is written (the write waits
    on the client's reading)."""
    known = await _send_first(poll, node_id, resp, zstd, opened)
    direct = _Direct(poll, node_id, sub, known, resp)
    if zstd:  # an inflated frame is written a piece at a time, never at once
        sub.direct = direct
    it = sub.__aiter__()
    timeout = _keepalive_s()
    try:
        while True:
            try:
                # asyncio.timeout, not wait_for: no task per frame on every map stream.
                async with asyncio.timeout(timeout):
                    batch: list[Change] | None = await it.__anext__()
            except TimeoutError:
                batch = None
            except StopAsyncIteration:
                return  # replaced by a newer poll, or the node was deleted
            wrote = await direct.finish()
            timeout = _keepalive_s()
            if batch is None:
                # Frames the fan-out wrote while this task waited count as traffic: the
                # keep-alive is due only after that much silence since the last of them.
                quiet = time.monotonic() - direct.sent_at
                if wrote or quiet < KEEPALIVE_BASE_S:
                    timeout = max(0.0, timeout - (0.0 if wrote else quiet))
                    continue
                await write_frame(resp, KEEPALIVE, "keepalive", node_id, zstd)
                continue
            if batch and not await _send_batch(poll, node_id, batch, sub, known, resp, zstd):
                return
            del batch
    finally:
        sub.direct = None


def _keepalive_s() -> float:
    return KEEPALIVE_BASE_S + random.random() * KEEPALIVE_JITTER_S


class _Direct:
    """A parked stream's frame for a batch, built and written inside the bus's fan-out (no
    task wakeup per session and change) when the frame can go at once; a frame the
    connection cannot take whole now (windows, a busy socket) is held for the stream's task
    (``finish``), which the bus then sends no batch until it has written it."""

    __slots__ = ("poll", "node_id", "sub", "known", "resp", "held", "error", "sent_at")

    def __init__(self, poll: MapPoll, node_id: int, sub: Subscription, known: KnownPeers,
                 resp: ResponseStream) -> None:
        self.poll, self.node_id, self.sub, self.known, self.resp = (
            poll, node_id, sub, known, resp)
        self.held: tuple[bytes, str, float] | None = None
        self.error: BaseException | None = None
        self.sent_at = 0.0  # monotonic time of the last frame written in a fan-out

    def __call__(self, batch: list[Change], since: float) -> bool:
        if self.held is not None or self.error is not None:
            return False  # the task has not caught up yet: this batch waits for it
        try:
            viewer = self.poll.tailnet.nodes.get(self.node_id)
            if viewer is None:
                return False  # the task ends the stream
            built = _frame(self.poll, self.node_id, batch, viewer, self.known)
            if built is None:
                return True
            frame, kind = built
            if self.resp.write_now(frame):
                self.sent_at = time.monotonic()
                _sent(kind, self.node_id, len(frame))
                _delivered(kind, since)
                return True
            self.held = (frame, kind, since)
        except Exception as e:  # raised in the stream's task, as when it builds the frame
            self.error = e
        self.sub.nudge()
        return True

    async def finish(self) -> bool:
        """Write what the fan-out left for the task; True when a frame was written."""
        if self.error is not None:
            raise self.error
        if self.held is None:
            return False
        frame, kind, since = self.held
        self.held = None
        await write_frame(self.resp, frame, kind, self.node_id)
        _delivered(kind, since)
        return True


def _frame(poll: MapPoll, node_id: int, batch: list[Change], viewer: Node,
           known: KnownPeers) -> tuple[bytes, str] | None:
    """The viewer's frame for ``batch`` and its type (None: nothing for it); updates
    ``known``. Server-initiated messages (HA PingRequests) ride on it, or on a keep-alive."""
    snap = poll.snapshot()
    extra = poll.take_outbox(node_id)
    if extra:
        update = poll.deltas.delta(batch, snap, viewer, known)
        frame: bytes | None = encode_frame({**(update or {"KeepAlive": True}), **extra})
    else:
        frame = poll.deltas.frame(batch, snap, viewer, known)
    if frame is None:
        return None
    kind = metrics.response_type(poll.deltas.kinds(batch, snap, viewer), ping=bool(extra))
    metrics.labelled(metrics.mapresponse_generated, kind).inc()
    return frame, kind


def _sent(kind: str, node_id: int, size: int) -> None:
    """A frame written, counted as Headscale's mapresponse_sent (status, type)."""
    metrics.frame_sent(kind, node_id)
    trace(log, "map response sent", extra=fields(node=node_id, type=kind, bytes=size))


def _delivered(kind: str, since: float) -> None:
    """How long the change a frame carries took from publication to the wire."""
    metrics.labelled(metrics.change_delivery, kind).observe(time.monotonic() - since)


# The stream's frames are built in helpers: a stream waits for hours between batches, and
# what a frame was made of (a first map is megabytes at 10,000 nodes, and so is a FULL
# resend) must not stay referenced from its frame all that time.
async def _send_first(poll: MapPoll, node_id: int, resp: ResponseStream, zstd: bool,
                      built: Callable[[], None] | None) -> KnownPeers:
    viewer = poll.tailnet.get_node(node_id)
    with metrics.Timer(metrics.nodestore_peers_calculation):
        first, known = poll.deltas.first_frame(poll.snapshot(), viewer)
    metrics.mapresponse_generated.labels("full").inc()
    if built is not None:
        built()
    await write_frame(resp, first, "full", node_id, zstd)
    return known


async def _send_batch(poll: MapPoll, node_id: int, batch: list[Change], sub: Subscription,
                      known: KnownPeers, resp: ResponseStream, zstd: bool) -> bool:
    """The viewer's frame for ``batch``, if any; False when the viewer is gone."""
    viewer_now = poll.tailnet.nodes.get(node_id)
    if viewer_now is None:
        return False
    built = _frame(poll, node_id, batch, viewer_now, known)
    if built is not None:
        frame, kind = built
        await write_frame(resp, frame, kind, node_id, zstd)
        _delivered(kind, sub.batch_since)
    return True


async def write_frame(resp: ResponseStream, frame: bytes, kind: str, node_id: int,
                      zstd: bool = True) -> None:
    """Write one map frame, counted as Headscale's mapresponse_sent (status, type)."""
    try:
        sent = await send_frame(resp, frame, zstd=zstd)
    except (StreamGone, ConnectionError):
        metrics.frame_sent(kind, node_id, ok=False)
        raise
    _sent(kind, node_id, sent)


async def send_frame(resp: ResponseStream, frame: bytes, *, zstd: bool) -> int:
    """Write ``frame`` as it is, or inflated for a client that did not ask for zstd (a piece
    at a time: each write waits for the client's flow-control window). Returns the bytes."""
    if zstd:
        await resp.write(frame)
        return len(frame)
    # Learning the length inflates the whole frame: in a thread, not stalling every other
    # stream for the tens of ms a large first map takes.
    size = await asyncio.to_thread(plain_size, frame)
    sent = 0
    for piece in plain_pieces(frame, size):
        await resp.write(piece)
        sent += len(piece)
    return sent
