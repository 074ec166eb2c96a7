"""Register and map request bodies (JSON shaped by tailcfg's Go types, hostile inside)
straight into the control plane's handlers, as registered and as unknown machines."""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

from pyheadscale import tailcfg
from pyheadscale.control.types import ControlRequest, StreamGone
from pyheadscale.hostinfo import HOSTINFO
from tests.fuzz.gen import struct
from tests.fuzz.harness import FuzzContext
from tests.fuzz.mutate import mutate, mutate_json, to_json

TIMES = ["0001-01-01T00:00:00Z", "2001-01-01T00:00:00Z", "2099-01-01T00:00:00.5+02:00",
         "not a time", "", "2099-13-01T00:00:00Z"]


def _key(rng: random.Random, prefix: str, known: bytes | None) -> Any:
    r = rng.random()
    if r < 0.7 and known is not None:
        return prefix + known.hex()
    if r < 0.9:
        return prefix + os.urandom(32).hex()
    return rng.choice(["", prefix, prefix + "zz" * 32, "nodekey:" + "00" * 32, 5, None])


def live_node_key(ctx: FuzzContext, mk_index: int | None) -> bytes | None:
    """The current node key of a pool machine (registrations may have rotated it)."""
    if mk_index is None:
        return None
    nodes = ctx.server.tailnet.nodes_by_machine_key(ctx.nodes[mk_index][0])
    return nodes[0].node_key if nodes else ctx.nodes[mk_index][1]


def register_body(rng: random.Random, ctx: FuzzContext, mk_index: int | None) -> dict[str, Any]:
    d = struct(rng, tailcfg._REGISTER_REQUEST, wrong=0.05)
    nk = live_node_key(ctx, mk_index)
    if rng.random() < 0.9:
        d["NodeKey"] = _key(rng, "nodekey:", nk)
    d["Version"] = rng.choice((113, 130, 142, 1, -1)) if rng.random() < 0.9 else d.get("Version")
    if rng.random() < 0.3:
        # The real key only from pool machines: each of them has one node, so the node count
        # stays put (unknown machines with a good key would be new nodes, by design).
        good = mk_index is not None and rng.random() < 0.7
        d["Auth"] = {"AuthKey": ctx.authkey if good else "hskey-auth-x-y"}
    if rng.random() < 0.5:
        d["Expiry"] = rng.choice(TIMES)
    if rng.random() < 0.6:
        d["Hostinfo"] = struct(rng, HOSTINFO, wrong=0.02)
    for k in ("OldNodeKey", "NLKey"):
        if k in d and rng.random() < 0.7:
            d[k] = _key(rng, "nodekey:" if k == "OldNodeKey" else "nlpub:", None)
    return d


def map_body(rng: random.Random, ctx: FuzzContext, mk_index: int | None) -> dict[str, Any]:
    d = struct(rng, tailcfg._MAP_REQUEST, wrong=0.05)
    nk = live_node_key(ctx, mk_index)
    d["NodeKey"] = _key(rng, "nodekey:", nk)
    d["Version"] = rng.choice((113, 130, 142))
    d["Stream"] = rng.random() < 0.1
    if rng.random() < 0.7:
        d["Hostinfo"] = struct(rng, HOSTINFO, wrong=0.02)
    if "DiscoKey" in d:
        d["DiscoKey"] = _key(rng, "discokey:", None)
    return d


def request_body(rng: random.Random, ctx: FuzzContext, path: str, mk_index: int | None) -> bytes:
    if "register" in path:
        body: Any = register_body(rng, ctx, mk_index)
    elif "map" in path:
        body = map_body(rng, ctx, mk_index)
    else:
        body = mutate_json(rng, {"a": [1, {"b": "c"}]})
    raw = to_json(body)
    return mutate(rng, raw) if rng.random() < 0.1 else raw


class FakeResponse:
    """A client that reads one map frame and goes away."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.writes = 0
        self.ended = False

    @property
    def closed(self) -> bool:
        return self.ended

    async def start(self, status: int, headers: list[tuple[str, str]] | None = None) -> None:
        self.status = status

    async def write(self, data: bytes) -> None:
        if self.status is None:
            self.status = 200
        self.writes += 1
        if self.writes > 1:
            raise StreamGone("client went away")

    async def end(self, data: bytes = b"") -> None:
        if self.status is None:
            self.status = 200
        self.ended = True


async def run(ctx: FuzzContext, part: int, n: int) -> int:
    rng = ctx.rng("control", part)
    dispatch = ctx.server.control.dispatch
    for i in range(n):
        mk_index = rng.randrange(len(ctx.nodes)) if rng.random() < 0.5 else None
        machine = ctx.nodes[mk_index][0] if mk_index is not None else os.urandom(32)
        path = rng.choice(("/machine/register", "/machine/map"))
        req = ControlRequest(method="POST", path=path, query="", headers={},
                             body=request_body(rng, ctx, path, mk_index), machine_key=machine,
                             capver=130, conn_id=0, remote=f"203.0.113.{rng.randrange(8)}")
        resp = FakeResponse()
        try:
            await asyncio.wait_for(dispatch(req, resp), 0.5)  # a Followup waits: let it go
        except TimeoutError:
            pass
        except Exception as e:  # noqa: BLE001 (any exception out of a handler is the finding)
            ctx.fail("control", i, f"{path}: {e!r}")
        if resp.status is not None and resp.status >= 500:
            ctx.fail("control", i, f"{path}: HTTP {resp.status}")
    return n
