"""The fuzz run: one real pyheadscale Server in this process, every target against it, and the
checks that nothing crashed, leaked or was half-written.

A failure is anything the targets' parsers are not documented to raise, a 5xx answer, an
ERROR record from the server's loggers (handlers log unexpected exceptions there), or an
exception that reached the event loop. Resource figures are taken after a warm-up share of
every target and again at the end.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError
from sqlmodel import Session, select

from pyheadscale.app import Server
from pyheadscale.control.upgrade import get_server
from pyheadscale.db import models
from pyheadscale.memory import trim
from pyheadscale.noise.keys import generate_private_key, public_key
from pyheadscale.state.model import Node
from tests.inproc import server_config

WATCHED_LOGGERS = ("pyheadscale", "derp", "aiohttp", "asyncio")


@dataclass
class Failure:
    target: str
    index: int
    detail: str


class ErrorWatch(logging.Handler):
    """Every ERROR (or worse) record from the server's loggers is a failure."""

    def __init__(self, ctx: FuzzContext) -> None:
        super().__init__(logging.ERROR)
        self.ctx = ctx

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(WATCHED_LOGGERS):
            return
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            return  # aiohttp's own parser refusing a malformed request: answered with 400
        self.ctx.fail(f"log:{record.name}", -1, self.format(record)[:2000])


@dataclass
class Snapshot:
    rss_mib: float
    fds: int
    tasks: int
    noise_connections: int
    derp_connections: int
    pending: int

    @classmethod
    def take(cls, ctx: FuzzContext) -> Snapshot:
        gc.collect()
        trim()  # what the server's minutely trim would give back: a leak would stay
        rss = 0.0
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
        srv = ctx.server
        derp = srv.derp.server.connection_count() if srv.derp is not None else 0
        return cls(rss, len(os.listdir("/proc/self/fd")), len(asyncio.all_tasks()),
                   len(get_server(ctx.app).connections), derp, len(srv.control.pending))


@dataclass
class FuzzContext:
    server: Server
    tmp: Path
    seed: int
    authkey: str
    user_id: int
    nodes: list[tuple[bytes, bytes]]  # (machine key, node key) of registered nodes
    node_privs: list[bytes]  # their node private keys (DERP clients use them)
    failures: list[Failure] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def app(self) -> Any:
        return self.server.main.app

    def fail(self, target: str, index: int, detail: str) -> None:
        if len(self.failures) < 200:
            self.failures.append(Failure(target, index, detail))

    def rng(self, target: str, part: int) -> random.Random:
        return random.Random(f"{self.seed}:{target}:{part}")

    @property
    def url(self) -> str:
        return str(self.server.cfg.server_url)

    @property
    def socket_path(self) -> str:
        return str(self.server.cfg.unix_socket)

    def db_agrees(self) -> list[str]:
        """Differences between the database and the in-memory tailnet (nodes and users)."""
        tn = self.server.tailnet
        out = []
        with Session(self.server.engine) as s:
            rows = {int(r.id or 0): r for r in s.exec(select(models.Node)).all()}
            users = {int(u.id or 0) for u in s.exec(select(models.User)).all()}
        if set(rows) != set(tn.nodes):
            out.append(f"node ids: db {sorted(rows)} memory {sorted(tn.nodes)}")
        for nid, node in tn.nodes.items():
            r = rows.get(nid)
            if r is not None and ((r.host_info or {}) != node.hostinfo
                                  or r.hostname != node.hostname
                                  or (r.given_name or "") != node.given_name):
                out.append(f"node {nid}: db and memory differ")
        if users != set(tn.users):
            out.append(f"user ids: db {sorted(users)} memory {sorted(tn.users)}")
        return out


async def open_context(tmp: Path, seed: int) -> FuzzContext:
    cfg = server_config(tmp, overrides={
        "data_dir": str(tmp / "data"), "policy": {"mode": "database"}, "log": {"level": "warn"}})
    srv = Server(cfg)
    await srv.start()
    tn = srv.tailnet
    user = await tn.create_user("fuzz")
    _, key = await tn.create_preauth_key(user.id, reusable=True)
    nodes, privs = [], []
    for i in range(16):
        priv = generate_private_key()
        mk, nk = random.Random(f"{seed}:node:{i}").randbytes(32), public_key(priv)
        privs.append(priv)
        node: Node = await tn.register_with_authkey(
            machine_key=mk, node_key=nk, old_node_key=None, hostinfo={"Hostname": f"n{i}"},
            key=key)
        nodes.append((node.machine_key, node.node_key))
    return FuzzContext(srv, tmp, seed, key, user.id, nodes, privs)


Target = Callable[[FuzzContext, int, int], Awaitable[int]]  # (ctx, part, n) -> inputs run


@dataclass
class Report:
    count: int
    seed: int
    seconds: float
    per_target: dict[str, tuple[int, float]]
    warm: Snapshot
    end: Snapshot
    failures: list[Failure]
    db_differences: list[str]

    @property
    def inputs(self) -> int:
        return sum(n for n, _ in self.per_target.values())


async def run(targets: dict[str, tuple[float, Target]], count: int, seed: int,
              tmp: Path, warm_share: float = 0.1, verbose: bool = False) -> Report:
    """Give each target its share of `count`; a warm-up part first, then the rest."""
    ctx = await open_context(tmp, seed)
    gc.collect()  # what earlier code in this process left behind is not this run's finding
    watch = ErrorWatch(ctx)
    root = logging.getLogger()
    root.addHandler(watch)
    loop = asyncio.get_running_loop()
    old_handler = loop.get_exception_handler()
    loop.set_exception_handler(
        lambda _loop, c: ctx.fail("loop", -1, str(c.get("exception") or c.get("message"))))
    total_w = sum(w for w, _ in targets.values())
    shares = {name: max(1, round(count * w / total_w)) for name, (w, _) in targets.items()}
    per: dict[str, tuple[int, float]] = {}
    t0 = time.monotonic()
    try:
        for part, fraction in ((0, warm_share), (1, 1 - warm_share)):
            for name, (_, target) in targets.items():
                n = max(1, round(shares[name] * fraction))
                started = time.monotonic()
                done = await target(ctx, part, n)
                before = per.get(name, (0, 0.0))
                per[name] = (before[0] + done, before[1] + time.monotonic() - started)
                if verbose:
                    print(f"part {part} {name}: {done} inputs, {time.monotonic() - started:.1f}s,"
                          f" {Snapshot.take(ctx)}, nodes {len(ctx.server.tailnet.nodes)}",
                          flush=True)
            await asyncio.sleep(0.2)  # let closing connections finish
            if part == 0:
                warm = Snapshot.take(ctx)
        end = Snapshot.take(ctx)
        differences = ctx.db_agrees()
    finally:
        loop.set_exception_handler(old_handler)
        root.removeHandler(watch)
        await ctx.server.stop()
        shutil.rmtree(Path(ctx.server.cfg.unix_socket).parent, ignore_errors=True)
    return Report(count, seed, time.monotonic() - t0, per, warm, end, ctx.failures,
                  differences)
