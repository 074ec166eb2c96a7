"""POST /machine/map: the streaming map poll, lite updates and single map responses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pyheadscale import tailcfg
from pyheadscale.control.register import reply
from pyheadscale.control.types import ControlRequest, ResponseStream, StreamGone
from pyheadscale.mapper.delta import delta
from pyheadscale.mapper.encode import KEEPALIVE, encode_frame
from pyheadscale.mapper.full import full_map_and_peers

if TYPE_CHECKING:
    from pyheadscale.control.dispatch import ControlPlane

log = logging.getLogger("pyheadscale.poll")

# Clients kill a poll after 120 s without a frame; Headscale sends every 50 s + up to 9 s.
KEEPALIVE_BASE_S = 50.0
KEEPALIVE_JITTER_S = 9.0


async def handle_map(cp: ControlPlane, req: ControlRequest, resp: ResponseStream) -> None:
    try:
        mr = tailcfg.parse_map_request(req.body)
    except tailcfg.TailcfgError as e:
        await reply(resp, 400, f"bad map request: {e}")
        return
    if mr.version < cp.min_capver:
        await reply(resp, 400, f"unsupported client version: capability version {mr.version}")
        return
    tn = cp.tailnet
    node = tn.node_by_node_key(mr.node_key)
    if node is None or node.machine_key != req.machine_key:
        await reply(resp, 404, "node not found")
        return

    if not mr.stream:
        await tn.update_from_map_request(
            node.id, endpoints=mr.endpoints, disco_key=mr.disco_key, hostinfo=mr.hostinfo,
            capver=mr.version)
        if mr.omit_peers:
            await reply(resp, 200, "")
            return
        # A one-shot map (debug/test paths): exactly one frame, then the stream ends.
        msg, _ = full_map_and_peers(tn.nodes, tn.users, tn.get_node(node.id), cp.mapctx,
                                     datetime.now(UTC), cp.peer_cache)
        await resp.start(200, [("content-type", "application/json")])
        await resp.end(encode_frame(msg))
        return

    # Subscribe before building the full map so no change falls between the two.
    sub = tn.bus.subscribe(node.id)
    cp.sessions_opened += 1
    try:
        await tn.update_from_map_request(
            node.id, endpoints=mr.endpoints, disco_key=mr.disco_key, hostinfo=mr.hostinfo,
            capver=mr.version)
        await tn.set_online(node.id, True)
        await resp.start(200, [("content-type", "application/json")])
        await stream_maps(cp, node.id, sub, resp)
    except (StreamGone, ConnectionError):
        pass
    finally:
        sub.close()
        # A newer poll of the same node replaced this one: that one owns the online flag.
        if not tn.bus.subscribed(node.id) and node.id in tn.nodes:
            with contextlib.suppress(Exception):
                await asyncio.shield(tn.set_online(node.id, False))


async def stream_maps(cp: ControlPlane, node_id: int, sub, resp: ResponseStream) -> None:  # type: ignore[no-untyped-def]
    tn = cp.tailnet
    viewer = tn.get_node(node_id)
    msg, known = full_map_and_peers(tn.nodes, tn.users, viewer, cp.mapctx, datetime.now(UTC),
                                    cp.peer_cache)
    await resp.write(encode_frame(msg))
    it = sub.__aiter__()
    while True:
        timeout = KEEPALIVE_BASE_S + random.random() * KEEPALIVE_JITTER_S
        try:
            batch = await asyncio.wait_for(it.__anext__(), timeout)
        except TimeoutError:
            await resp.write(KEEPALIVE)
            continue
        except StopAsyncIteration:
            return  # replaced by a newer poll, or the node was deleted
        viewer_now = tn.nodes.get(node_id)
        if viewer_now is None:
            return
        update, known = delta(batch, tn.nodes, tn.users, viewer_now, cp.mapctx,
                              datetime.now(UTC), known, cp.peer_cache)
        # Server-initiated messages (HA PingRequests) ride on this frame, or on a keep-alive.
        extra = cp.routes.outbox.take(node_id)
        if extra:
            update = {**(update or {"KeepAlive": True}), **extra}
        if update is not None:
            await resp.write(encode_frame(update))
