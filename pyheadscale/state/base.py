"""The tailnet's memory, indices and write plumbing, shared by the parts that write.

Reads (map generation, lookups) never touch the database. Every write is a `@serialized`
method: one at a time under the lock, it validates against memory, persists in one DB
transaction on a single DB thread (so writes stay ordered and the event loop never blocks on
SQL), swaps new objects into memory only after the commit, and then publishes Changes. Node
objects are replaced, never mutated, so a reader holding one sees a consistent snapshot.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from pyheadscale.auth import apikeys as ak
from pyheadscale.config import Config
from pyheadscale.db import models as db
from pyheadscale.state import persist
from pyheadscale.state.changelog import ChangeLog, Stale
from pyheadscale.state.changes import Change, ChangeBus, ChangeKind, Field
from pyheadscale.state.ephemeral import EphemeralGC
from pyheadscale.state.errors import Conflict, NotFound, PersistError, Unavailable
from pyheadscale.state.ipam import IPAllocator
from pyheadscale.state.membership import Membership
from pyheadscale.state.model import TAGGED_DEVICES_USER_ID, ApiKey, Node, PreAuthKey, User
from pyheadscale.state.nodetable import NodeTable

log = logging.getLogger("pyheadscale.state")
T = TypeVar("T")
P = ParamSpec("P")
S = TypeVar("S", bound="TailnetBase")
# The open transaction of a write re-run under the append lock (see serialized); only the
# task running that write sees it.
HELD: ContextVar[persist.Held | None] = ContextVar("pyheadscale_held_tx", default=None)


def utcnow() -> datetime:
    return datetime.now(UTC)


def digest(s: str) -> bytes:
    return hashlib.sha256(s.encode()).digest()


def _forget_checks(verified: dict[bytes, int], key_id: int) -> None:
    """Drop the remembered secret checks (digest -> key id) that passed for `key_id`."""
    for d in [d for d, i in verified.items() if i == key_id]:
        del verified[d]


def serialized(
    write: Callable[Concatenate[S, P], Awaitable[T]],
) -> Callable[Concatenate[S, P], Awaitable[T]]:
    """Make `write` one write of the tailnet: under its lock (one write at a time), in a task
    of its own (a cancelled caller cannot stop it between its commit and the memory update);
    a write that returns bumps `generation`. Not re-entrant: a serialized write calls the
    plain helpers, never another serialized method.

    With other instances on the database, a write that finds a change it has not applied yet
    (`Stale`, before anything is written) runs again inside one transaction that holds the
    append lock from the start: memory catches up in it, so no newer change can slip in
    (re-running optimistically would livelock while other instances write all the time)."""

    @functools.wraps(write)
    async def one_write(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        async def run() -> T:
            async with self._lock:
                try:
                    result = await write(self, *args, **kwargs)
                except Stale:
                    result = await self._write_holding_lock(write, args, kwargs)
                self.generation += 1
                return result

        return await asyncio.shield(asyncio.ensure_future(run()))

    return one_write


def _found(table: Mapping[int, T], key: int, missing: str) -> T:
    """table[key], or NotFound(missing): the message admins and clients see."""
    item = table.get(key)
    if item is None:
        raise NotFound(missing)
    return item


class TakenNames:
    """`in` view of the given-name index that ignores one node (its own current name)."""

    def __init__(self, index: dict[str, int], except_id: int | None) -> None:
        self.index = index
        self.except_id = except_id

    def __contains__(self, name: object) -> bool:
        holder = self.index.get(name) if isinstance(name, str) else None
        return holder is not None and holder != self.except_id


class TailnetBase:
    """Users, nodes and keys in memory with their indices; how a write commits and
    publishes. The write methods live in the parts (users, keys, registration, nodes,
    online, replica) that Tailnet puts together."""

    def __init__(self, engine: Engine, cfg: Config, ipam: IPAllocator,
                 bus: ChangeBus | None = None, changelog: ChangeLog | None = None) -> None:
        self.engine = engine
        # Several instances on one PostgreSQL: every commit is logged for the others, and
        # they tell us theirs (replica.py). None: this instance is alone.
        self.changelog = changelog
        self.membership = Membership(changelog.instance_id if changelog else "",
                                     clustered=changelog is not None)
        # Cluster mode: node id -> the instance holding its map session (online nodes only).
        self.presence: dict[int, str] = {}
        # Write-behind: node id -> the `nodes` columns whose newest value lives only in
        # memory (what map requests and session starts report; online.py flushes them).
        self.unsaved: dict[int, set[str]] = {}
        self.membership.on_leadership(self._leading)
        self.cfg = cfg
        self.ipam = ipam
        self.bus = bus or ChangeBus(batch_delay=cfg.tuning.batch_change_delay.total_seconds())
        self.base_domain = cfg.dns.base_domain
        self.default_expiry = cfg.node.expiry.total_seconds()
        self.users: dict[int, User] = {}
        self.nodes: NodeTable = NodeTable()
        self.preauth_keys: dict[int, PreAuthKey] = {}
        self.api_keys: dict[int, ApiKey] = {}
        self._by_node_key: dict[bytes, int] = {}
        self._by_machine_key: dict[bytes, set[int]] = {}
        self._by_given_name: dict[str, int] = {}
        self._pak_by_prefix: dict[str, int] = {}
        self._pak_by_legacy: dict[str, int] = {}
        self._apikey_by_prefix: dict[str, int] = {}
        # sha256(full key) -> key id for keys whose bcrypt check already passed.
        self._verified_paks: dict[bytes, int] = {}
        self._pak_checks: dict[bytes, asyncio.Future[bool]] = {}  # bcrypt checks in flight
        self._verified_apikeys: dict[bytes, int] = {}
        self._apikey_persisted: dict[int, float] = {}
        self._lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pyheadscale-db")
        self.gc = EphemeralGC(cfg.node.ephemeral.inactivity_timeout.total_seconds(),
                              self._gc_delete)
        self.generation = 0  # bumped on every committed write
        self.listeners: list[Callable[[tuple[Change, ...]], None]] = []
        # Told of every published write and how long its listeners and fan-out took (the
        # NodeStore metrics; app.py sets it, state/ imports no metrics).
        self.write_observer: Callable[[tuple[Change, ...], float], None] | None = None
        # Cluster mode: rooms that keep a table in memory, told when another instance wrote it.
        self.table_hooks: dict[str, list[Callable[[set[str] | None], None]]] = {}
        # May (user, node or None, tag) carry this tag at interactive registration? Set by
        # the control plane from the policy's tagOwners; None refuses every tag.
        self.tag_authorizer: Callable[[User, Node | None, str], bool] | None = None

    async def close(self) -> None:
        await self.gc.close()
        self.bus.close()
        async with self._lock:
            self._executor.shutdown(wait=True)

    async def ping_db(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, persist.ping,
                                                         self.engine)

    # --- write plumbing ----------------------------------------------------------------------

    async def _commit(self, fn: Callable[[persist.Tx], T], *, check: bool = True) -> T:
        """Run `fn` in one transaction on the DB thread. In cluster mode the change is logged
        and, with `check` (serialized writes), refused as Stale if memory is behind."""
        loop = asyncio.get_running_loop()
        cl = self.changelog
        held = HELD.get() if check else None
        try:
            if held is not None:
                result, entry = await loop.run_in_executor(self._executor, held.run, fn)
                return result  # type: ignore[no-any-return]
            result, entry = await loop.run_in_executor(
                self._executor, persist.run_tx, self.engine, fn, cl, check)
        except Stale:
            raise
        except (DBAPIError, SQLAlchemyError, LookupError) as e:
            log.warning("database write failed: %s", e)
            if isinstance(e, DBAPIError) and e.connection_invalidated or isinstance(
                    e, OperationalError | InterfaceError):
                raise Unavailable(f"database unavailable: {e.__class__.__name__}: "
                                  f"{str(e).splitlines()[0]}") from e
            raise PersistError(f"database write failed: {e}") from e
        if cl is not None and check and entry is not None:
            # Nothing was left to apply under the append lock: ours is the next change.
            cl.applied = max(cl.applied, entry)
        return result  # type: ignore[no-any-return]

    async def run_in_tx(self, fn: Callable[[persist.Tx], T]) -> T:
        """One transaction on the DB thread, for stores that keep their own memory (OAuth,
        the policy). Not checked against the log: these writes never read the tailnet."""
        return await self._commit(fn, check=False)

    async def _catch_up_locked(self, held: persist.Held | None = None) -> int:
        """Apply what other instances committed (replica.py), reading in `held` when given;
        the caller holds the lock."""
        return 0

    async def _write_holding_lock(self, write: Callable[..., Awaitable[T]],
                                  args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        """Run `write` in one transaction that takes the append lock first and catches up in
        it: its statements then commit together, after memory already took them (so a
        failed final commit reloads memory from the database)."""
        cl = self.changelog
        assert cl is not None
        loop = asyncio.get_running_loop()
        try:
            held = await loop.run_in_executor(self._executor, persist.Held.open, self.engine, cl)
        except SQLAlchemyError as e:
            raise Unavailable(f"database unavailable: {str(e).splitlines()[0]}") from e
        token = HELD.set(held)
        try:
            await self._catch_up_locked(held)
            result = await write(self, *args, **kwargs)
            await loop.run_in_executor(self._executor, held.commit)
        except BaseException as e:
            await loop.run_in_executor(self._executor, held.rollback)
            if held.entries:  # memory took statements that were never committed
                log.error("a write failed after changing memory; reloading from the database")
                asyncio.get_running_loop().create_task(self._resync_later())
            if isinstance(e, SQLAlchemyError):
                raise Unavailable(f"database write failed: {str(e).splitlines()[0]}") from e
            raise
        finally:
            HELD.reset(token)
        if held.entries:
            cl.applied = max(cl.applied, *held.entries)
        return result

    async def _resync_later(self) -> None:
        """Reload everything (replica.py)."""

    def _publish(self, *changes: Change) -> None:
        # Listeners (policy, routes) update derived state before any session sees the change.
        start = time.perf_counter()
        for listener in self.listeners:
            listener(changes)
        self.bus.publish(*changes)
        if self.write_observer is not None:
            self.write_observer(changes, time.perf_counter() - start)

    async def _write_node(self, old: Node, new: Node, kind: ChangeKind,
                          fields: Iterable[Field]) -> Node:
        vals = persist.node_values(new)
        await self._commit(lambda tx: tx.update(db.Node, old.id, vals))
        self.unsaved.pop(new.id, None)  # the whole row is written: nothing left behind
        self._put_node(new)
        self._publish(Change(kind, new.id, frozenset(fields)))
        return new

    async def _delete_node_locked(self, node: Node) -> None:
        await self._commit(lambda tx: tx.delete(db.Node, node.id))
        self._drop_node(node.id)
        self.ipam.release(node.ipv4, node.ipv6)
        self.gc.cancel(node.id)
        self._publish(Change(ChangeKind.NODE_REMOVED, node.id))

    def _leading(self, leader: bool) -> None:
        """A new leader restarts the GC timers of offline ephemeral nodes (the old leader's
        were lost with it; every instance keeps timers, only the leader deletes)."""
        if leader:
            for n in self.nodes.values():
                if n.ephemeral and not n.online:
                    self.gc.schedule(n.id)

    @serialized
    async def _gc_delete(self, node_id: int) -> None:
        """The ephemeral GC's verdict: delete the node if it is still offline. Every instance
        keeps the timers; only the leader deletes (a new leader restarts them)."""
        if not self.membership.is_leader:
            return
        n = self.nodes.get(node_id)
        if n is not None and n.ephemeral and not n.online:
            log.info("deleting inactive ephemeral node %d (%s)", n.id, n.given_name)
            await self._delete_node_locked(n)

    def _clear_node_key_refs(self, key_id: int) -> None:
        for n in list(self.nodes.values()):
            if n.auth_key_id == key_id:
                self._put_node(replace(n, auth_key_id=None))

    @staticmethod
    def _bump(n: Node, **changes: Any) -> Node:
        return replace(n, **changes, version=n.version + 1)

    def _check_node_key_free(self, node_key: bytes, machine_key: bytes) -> None:
        holder = self.node_by_node_key(node_key)
        if holder is not None and holder.machine_key != machine_key:
            raise Conflict("node key already in use by another machine")

    def _taken_names(self, except_id: int | None = None) -> TakenNames:
        return TakenNames(self._by_given_name, except_id)

    def _default_expiry(self, now: datetime) -> datetime | None:
        return now + timedelta(seconds=self.default_expiry) if self.default_expiry > 0 else None

    # --- index maintenance -------------------------------------------------------------------

    def _put_node(self, n: Node) -> None:
        old = self.nodes.get(n.id)
        if old is not None:
            self._unindex_node(old)
        self.nodes[n.id] = n
        self._by_node_key[n.node_key] = n.id
        self._by_machine_key.setdefault(n.machine_key, set()).add(n.id)
        if n.given_name:
            self._by_given_name.setdefault(n.given_name, n.id)

    def _unindex_node(self, n: Node) -> None:
        if self._by_node_key.get(n.node_key) == n.id:
            del self._by_node_key[n.node_key]
        ids = self._by_machine_key.get(n.machine_key)
        if ids is not None:
            ids.discard(n.id)
            if not ids:
                del self._by_machine_key[n.machine_key]
        if self._by_given_name.get(n.given_name) == n.id:
            del self._by_given_name[n.given_name]

    def _drop_node(self, node_id: int) -> Node | None:
        n = self.nodes.pop(node_id, None)
        if n is not None:
            self._unindex_node(n)
        return n

    def _put_pak(self, k: PreAuthKey) -> None:
        self.preauth_keys[k.id] = k
        if k.prefix:
            self._pak_by_prefix[k.prefix] = k.id
        elif k.legacy_key:
            self._pak_by_legacy[k.legacy_key] = k.id

    def _drop_pak(self, key_id: int) -> None:
        k = self.preauth_keys.pop(key_id, None)
        if k is None:
            return
        self._pak_by_prefix.pop(k.prefix, None)
        if k.legacy_key:
            self._pak_by_legacy.pop(k.legacy_key, None)
        _forget_checks(self._verified_paks, key_id)

    def _put_apikey(self, a: ApiKey) -> None:
        self.api_keys[a.id] = a
        self._apikey_by_prefix[a.prefix] = a.id

    def _drop_apikey(self, key_id: int) -> None:
        a = self.api_keys.pop(key_id, None)
        if a is None:
            return
        self._apikey_by_prefix.pop(a.prefix, None)
        _forget_checks(self._verified_apikeys, key_id)

    # --- reads -------------------------------------------------------------------------------

    def node_by_node_key(self, node_key: bytes) -> Node | None:
        nid = self._by_node_key.get(node_key)
        return self.nodes.get(nid) if nid is not None else None

    def nodes_by_machine_key(self, machine_key: bytes) -> list[Node]:
        return [self.nodes[i] for i in sorted(self._by_machine_key.get(machine_key, ()))]

    def node_by_machine_key(self, machine_key: bytes) -> Node | None:
        ns = self.nodes_by_machine_key(machine_key)
        return ns[0] if ns else None

    def node_by_given_name(self, name: str) -> Node | None:
        nid = self._by_given_name.get(name)
        return self.nodes.get(nid) if nid is not None else None

    def get_node(self, node_id: int) -> Node:
        return _found(self.nodes, node_id, f"node not found: {node_id}")

    def get_user(self, user_id: int) -> User:
        return _found(self.users, user_id, "user not found")

    def user_by_name(self, name: str) -> User | None:
        for u in self.users.values():
            if u.name == name:
                return u
        return None

    def list_users(self) -> list[User]:
        return [self.users[i] for i in sorted(self.users)]

    def list_nodes(self, user_id: int | None = None) -> list[Node]:
        ns = (self.nodes[i] for i in sorted(self.nodes))
        return [n for n in ns if user_id is None or n.user_id == user_id]

    def list_preauth_keys(self, user_id: int | None = None) -> list[PreAuthKey]:
        ks = (self.preauth_keys[i] for i in sorted(self.preauth_keys))
        return [k for k in ks if user_id is None or k.user_id == user_id]

    def list_api_keys(self) -> list[ApiKey]:
        return [self.api_keys[i] for i in sorted(self.api_keys)]

    def get_preauth_key(self, key_id: int) -> PreAuthKey:
        return _found(self.preauth_keys, key_id, "auth-key not found")

    def get_api_key(self, key_id: int) -> ApiKey:
        return _found(self.api_keys, key_id, "API key not found")

    def api_key_by_prefix(self, prefix: str) -> ApiKey | None:
        try:
            prefix = ak.parse_display_prefix(prefix)
        except ak.KeyFormatError:
            return None
        i = self._apikey_by_prefix.get(prefix)
        return self.api_keys.get(i) if i is not None else None

    @staticmethod
    def username(u: User) -> str:
        """Headscale's User.Username(): email, else name, else provider id, else the ID."""
        return u.email or u.name or (u.provider_identifier or "") or str(u.id)

    def user_profile(self, node: Node) -> dict[str, Any]:
        """tailcfg.UserProfile-shaped dict for the node's owner (tagged-devices if tagged)."""
        u = self.users.get(node.user_id) if node.user_id is not None else None
        if node.is_tagged or u is None:
            return {"ID": TAGGED_DEVICES_USER_ID, "LoginName": "tagged-devices",
                    "DisplayName": "Tagged Devices", "ProfilePicURL": ""}
        login = self.username(u)
        return {"ID": u.id, "LoginName": login, "DisplayName": u.display_name or login,
                "ProfilePicURL": u.profile_pic_url}
