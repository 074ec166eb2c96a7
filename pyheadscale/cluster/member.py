"""This instance's place among the others on one PostgreSQL database.

A dedicated control connection (autocommit, TCP keep-alives) does four things:

* LISTENs on the change-log channel and catches the tailnet up when an id arrives, and every
  `POLL_S` anyway (a lost notification only delays a change);
* holds a session-level advisory lock named after this instance: while PostgreSQL sees it,
  the instance is alive (a SIGKILLed process's connection closes and the lock goes with it);
* tries for the leader lock every tick; its holder runs the duties that must run once. Losing
  the connection loses the lock, so a dead leader is replaced within a tick or two;
* as leader, drops instances whose liveness lock has been gone for `DEAD_AFTER_S` (their
  nodes go offline until they reconnect elsewhere) and prunes the change log.

On reconnecting (PostgreSQL restarted, or this instance was cut off) it catches up (or reloads
everything if the leader meanwhile dropped this instance and may have pruned what it missed)
and re-asserts which map sessions it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from sqlalchemy import Engine, select, text
from sqlmodel import Session, col

from pyheadscale.cluster import sql
from pyheadscale.db.cluster import ClusterInstance
from pyheadscale.state import persist
from pyheadscale.state.changelog import CHANNEL, ChangeLog
from pyheadscale.state.errors import PersistError
from pyheadscale.state.membership import Message
from pyheadscale.state.tailnet import Tailnet

log = logging.getLogger("pyheadscale.cluster")

TICK_S = 1.0  # heartbeat, leader attempt
POLL_S = 2.0  # catch up even without a notification
DEAD_AFTER_S = 5.0  # a liveness lock gone this long: the instance is dead
PRUNE_EVERY_S = 60.0
LOG_RETENTION_S = 600.0  # log entries kept at least this long
RECONNECT_S = (0.5, 1.0, 2.0, 3.0)  # back-off between reconnection attempts
STATEMENT_TIMEOUT_S = 5.0


def new_instance_id() -> str:
    return f"{socket.gethostname()[:32]}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class InstanceInfo:
    """A live instance as the others see it: its name and what its relay offers."""

    id: str
    name: str
    info: dict[str, Any] = field(default_factory=dict)


def first_value(engine: Engine, key: str, proposed: str) -> str:
    """The shared value under `key`: `proposed` if this instance is the first to set it,
    else what the first one set."""
    with Session(engine) as s, s.begin():
        s.execute(text("INSERT INTO cluster_state (key, value, updated_at) "
                       "VALUES (:k, :v, now()) ON CONFLICT (key) DO NOTHING"),
                  {"k": key, "v": orjson.dumps(proposed).decode()})
        value = orjson.loads(s.execute(text("SELECT value FROM cluster_state WHERE key = :k"),
                                       {"k": key}).scalar_one())
    if not isinstance(value, str):
        raise ValueError(f"cluster_state {key!r} does not hold text")
    return value


def shared_secret(engine: Engine, key: str) -> str:
    """A 32-byte hex secret every instance shares (the relay mesh key when none is
    configured): the first instance to ask creates it."""
    secret = first_value(engine, key, secrets.token_hex(32))
    if len(secret) != 64:
        raise ValueError(f"cluster_state {key!r} does not hold a 64-hex secret")
    return secret


def _conninfo(engine: Engine) -> str:
    url = engine.url.set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


class ClusterMember:
    def __init__(self, tailnet: Tailnet, *, name: str = "",
                 info: Callable[[], dict[str, Any]] = dict) -> None:
        if tailnet.changelog is None:
            raise ValueError("cluster mode needs a tailnet with a change log")
        self.tailnet = tailnet
        self.changelog: ChangeLog = tailnet.changelog
        self.id = self.changelog.instance_id
        self.name = name or self.id
        self.info = info  # what this instance offers the others (its relay), JSON-able
        self.instances: dict[str, InstanceInfo] = {}
        self.on_instances: list[Callable[[dict[str, InstanceInfo]], None]] = []
        self.connected = asyncio.Event()
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._catching: asyncio.Task[None] | None = None
        self._again = False
        self._missing: dict[str, float] = {}  # instance -> when its lock was first missed
        self._leader_since = 0.0
        self._pruned_at = 0.0
        self._closed = False
        tailnet.membership.sender = self.send
        tailnet.on_table("cluster_instances", lambda _keys: self._spawn_instances_reload())
        self._bg: set[asyncio.Task[Any]] = set()

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Join: the instance row (through the log, so the others learn of it), then the
        control connection. Raises if the database cannot be reached."""
        await self._register()
        await self._connect()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Leave: the others see this instance's nodes offline at once (they reconnect)."""
        self._closed = True
        for t in [self._task, self._catching, *self._bg]:
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        self.tailnet.membership.set_leader(False)
        with contextlib.suppress(PersistError):
            await self.tailnet.drop_instances([self.id])
        await self._close_conn()

    # --- the control connection -------------------------------------------------------------

    async def _register(self) -> None:
        info = orjson.loads(orjson.dumps(self.info()))
        me, name = self.id, self.name

        def upsert(tx: persist.Tx) -> None:
            now = datetime.now(UTC)
            row = tx.s.get(ClusterInstance, me)
            if row is None:
                tx.s.add(ClusterInstance(id=me, name=name, started_at=now, heartbeat_at=now,
                                         applied_id=self.changelog.applied, info=info))
            else:
                row.name, row.heartbeat_at, row.info = name, now, info
            tx.touch("cluster_instances", me)

        await self.tailnet.run_in_tx(upsert)
        await self._reload_instances()

    async def _connect(self) -> None:
        conn = await psycopg.AsyncConnection.connect(
            _conninfo(self.tailnet.engine), autocommit=True, connect_timeout=5,
            keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
            options=f"-c statement_timeout={int(STATEMENT_TIMEOUT_S * 1000)}")
        try:
            await conn.execute(f"LISTEN {CHANNEL}")
            await conn.execute(f"LISTEN {sql.MESSAGES}")
            await conn.execute(sql.TAKE_INSTANCE_LOCK, (sql.INSTANCE_NS, self.id))
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        self.connected.set()

    async def _close_conn(self) -> None:
        self.connected.clear()
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _run(self) -> None:
        attempt = 0
        while not self._closed:
            try:
                if self._conn is None:
                    await self._connect()
                    await self._rejoin()
                attempt = 0
                await self._session()
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError, TimeoutError, PersistError) as e:
                log.warning("cluster: lost the database (%s); serving from memory, "
                            "reconnecting", str(e).splitlines()[0] if str(e) else type(e))
            except Exception:  # keep the instance in the cluster whatever went wrong
                log.exception("cluster: control loop failed; reconnecting")
            self.tailnet.membership.set_leader(False)
            await self._close_conn()
            await asyncio.sleep(RECONNECT_S[min(attempt, len(RECONNECT_S) - 1)])
            attempt += 1

    async def _rejoin(self) -> None:
        """Back after losing the database: catch up (or reload everything when the leader
        dropped this instance meanwhile), then tell the others which sessions it holds."""
        dropped = not await self._heartbeat()
        if dropped:
            log.warning("cluster: this instance was taken for dead; reloading everything")
            await self.tailnet.resync()
            await self._register()
        else:
            await self.tailnet.catch_up()
        await self.tailnet.flush_unsaved()
        await self.tailnet.reassert_presence(self.tailnet.bus.subscribers())
        log.info("cluster: reconnected to the database")

    async def _session(self) -> None:
        conn = self._conn
        assert conn is not None
        next_tick = next_poll = time.monotonic()
        while not self._closed:
            async for n in conn.notifies(timeout=0.25):
                if n.channel == CHANNEL:
                    self.kick()
                elif n.channel == sql.MESSAGES:
                    self._deliver(n.payload)
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + POLL_S
                self.kick()
            if now >= next_tick:
                next_tick = now + TICK_S
                await self._tick()

    async def _tick(self) -> None:
        if not await self._heartbeat():
            await self._register()  # swept while we were slow: join again
        membership = self.tailnet.membership
        conn = self._conn
        assert conn is not None
        if not membership.is_leader:
            cur = await conn.execute(sql.TRY_LEADER, (sql.LEADER_LOCK,))
            row = await cur.fetchone()
            if row is not None and row[0]:
                self._leader_since = time.monotonic()
                self._missing.clear()
                membership.set_leader(True)
        if membership.is_leader:
            await self._sweep()
            if time.monotonic() - self._pruned_at >= PRUNE_EVERY_S:
                self._pruned_at = time.monotonic()
                await conn.execute(sql.PRUNE, (LOG_RETENTION_S,))
                await conn.execute(sql.PRUNE_REGISTRATIONS)

    async def _heartbeat(self) -> bool:
        """False when this instance's row is gone (the leader took it for dead)."""
        conn = self._conn
        assert conn is not None
        cur = await conn.execute(sql.HEARTBEAT, (self.changelog.applied, self.id))
        return cur.rowcount == 1

    async def _sweep(self) -> None:
        conn = self._conn
        assert conn is not None
        cur = await conn.execute(sql.UNLOCKED, (sql.INSTANCE_NS,))
        unlocked = {str(r[0]) for r in await cur.fetchall()} - {self.id}
        now = time.monotonic()
        self._missing = {i: self._missing.get(i, now) for i in unlocked}
        # A new leader first gives everyone time to come back (after a database restart
        # every lock is gone at once).
        grace_from = max(self._leader_since, 0.0)
        dead = [i for i, t in self._missing.items()
                if now - max(t, grace_from) >= DEAD_AFTER_S]
        if dead:
            gone = await self.tailnet.drop_instances(dead)
            log.info("cluster: instances %s are gone; %d nodes they held are offline",
                     ", ".join(sorted(dead)), len(gone))
            for i in dead:
                self._missing.pop(i, None)
            await self._reload_instances()

    # --- catching up ------------------------------------------------------------------------

    def kick(self) -> None:
        """Catch up soon (coalesced: one catch-up at a time, one more if asked meanwhile)."""
        if self._catching is not None and not self._catching.done():
            self._again = True
            return
        self._catching = asyncio.get_running_loop().create_task(self._catch_up())

    async def _catch_up(self) -> None:
        while True:
            self._again = False
            try:
                await self.tailnet.catch_up()
            except PersistError as e:
                log.warning("cluster: catching up failed: %s", e)
                return
            except Exception:  # the next notification or poll tries again
                log.exception("cluster: catching up failed")
                return
            if not self._again:
                return

    # --- instances --------------------------------------------------------------------------

    def _spawn_instances_reload(self) -> None:
        task = asyncio.get_running_loop().create_task(self._reload_instances())
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _reload_instances(self) -> None:
        def read(engine: Engine) -> dict[str, InstanceInfo]:
            with Session(engine) as s:
                rows = s.execute(select(ClusterInstance).order_by(
                    col(ClusterInstance.started_at), col(ClusterInstance.id))).scalars()
                return {r.id: InstanceInfo(r.id, r.name or r.id, dict(r.info or {}))
                        for r in rows}

        try:
            self.instances = await asyncio.to_thread(read, self.tailnet.engine)
        except Exception as e:  # keep the last list; the next change reloads it
            log.warning("cluster: reading the instance list failed: %s", e)
            return
        for cb in list(self.on_instances):
            try:
                cb(self.instances)
            except Exception:
                log.exception("cluster: instance list listener failed")

    # --- messages ---------------------------------------------------------------------------

    async def send(self, topic: str, message: Message) -> None:
        """NOTIFY every instance (this one too). Raises PersistError without a database."""
        payload = orjson.dumps({"t": topic, "from": self.id, "m": message}).decode()
        if len(payload) > 7900:  # NOTIFY payloads stop at 8000 bytes
            raise ValueError("cluster message too large")

        def notify(engine: Engine) -> None:
            with engine.begin() as c:
                c.execute(text("SELECT pg_notify(:c, :p)"), {"c": sql.MESSAGES, "p": payload})

        try:
            await asyncio.to_thread(notify, self.tailnet.engine)
        except Exception as e:
            raise PersistError(f"cluster message not sent: {e}") from e

    def _deliver(self, payload: str) -> None:
        try:
            msg = orjson.loads(payload)
            topic, body = msg["t"], msg["m"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("cluster: malformed message ignored")
            return
        if isinstance(topic, str) and isinstance(body, dict):
            self.tailnet.membership.deliver(topic, body)
