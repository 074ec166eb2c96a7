"""The one authoritative tailnet in memory.

Reads (map generation, lookups) never touch the database. Every write is an async method that
validates against memory, persists in one DB transaction on a single DB thread (so writes stay
ordered and the event loop never blocks on SQL), swaps new objects into memory only after the
commit, and then publishes Changes on the bus. Node objects are replaced, never mutated, on
writes, so a reader holding one sees a consistent snapshot of that node.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from pyheadscale.auth import apikeys as ak
from pyheadscale.auth import preauthkeys as pk
from pyheadscale.config import Config
from pyheadscale.db import models as db
from pyheadscale.state import names, persist
from pyheadscale.state.changes import PATCH_FIELDS, Change, ChangeBus, ChangeKind, Field
from pyheadscale.state.ephemeral import EphemeralGC
from pyheadscale.state.ipam import IPAllocationError, IPAllocator
from pyheadscale.state.model import (
    TAGGED_DEVICES_USER_ID,
    ApiKey,
    IPNetwork,
    Node,
    PreAuthKey,
    User,
)

log = logging.getLogger("pyheadscale.state")
T = TypeVar("T")

ZERO_KEY = bytes(32)
EXIT_ROUTES = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
API_KEY_LAST_SEEN_PERSIST = 60.0  # seconds between last_seen writes per API key


# --- errors ----------------------------------------------------------------------------------


class StateError(Exception):
    """Base of all state errors; str() is the message shown to clients/admins."""


class NotFound(StateError):
    pass


class AlreadyExists(StateError):
    pass


class InvalidArgument(StateError):
    pass


class Conflict(StateError):
    """The write contradicts current state (user still has nodes, key held elsewhere...)."""


class PersistError(StateError):
    """The database refused the write; memory was left unchanged."""


class InvalidAuthKey(StateError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidAPIKey(StateError):
    pass


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _groups(groups: Iterable[str]) -> tuple[str, ...]:
    """IdP groups as stored on User: a tuple of strings (a bare string is one group)."""
    if isinstance(groups, str):
        return (groups,)
    out = tuple(groups)
    if not all(isinstance(g, str) for g in out):
        raise InvalidArgument("user groups must be strings")
    return out


def _digest(s: str) -> bytes:
    return hashlib.sha256(s.encode()).digest()


class Tailnet:
    def __init__(self, engine: Engine, cfg: Config, ipam: IPAllocator,
                 bus: ChangeBus | None = None) -> None:
        self.engine = engine
        self.cfg = cfg
        self.ipam = ipam
        self.bus = bus or ChangeBus(batch_delay=cfg.tuning.batch_change_delay.total_seconds())
        self.base_domain = cfg.dns.base_domain
        self.default_expiry = cfg.node.expiry.total_seconds()
        self.users: dict[int, User] = {}
        self.nodes: dict[int, Node] = {}
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
        self._verified_apikeys: dict[bytes, int] = {}
        self._apikey_persisted: dict[int, float] = {}
        self._lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pyheadscale-db")
        self.gc = EphemeralGC(cfg.node.ephemeral.inactivity_timeout.total_seconds(),
                              self._gc_delete)
        self.generation = 0  # bumped on every committed write
        self.listeners: list[Callable[[tuple[Change, ...]], None]] = []
        # May (user, node or None, tag) carry this tag at interactive registration? Set by
        # the control plane from the policy's tagOwners; None refuses every tag.
        self.tag_authorizer: Callable[[User, Node | None, str], bool] | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    @classmethod
    async def load(cls, engine: Engine, cfg: Config, bus: ChangeBus | None = None) -> Tailnet:
        loaded = await asyncio.to_thread(persist.load_all, engine)
        ipam = IPAllocator(cfg.prefixes.v4, cfg.prefixes.v6, cfg.prefixes.allocation)
        tn = cls(engine, cfg, ipam, bus)
        for u in loaded.users:
            tn.users[u.id] = u
        for k in loaded.preauth_keys:
            tn._put_pak(k)
        for a in loaded.api_keys:
            tn._put_apikey(a)
        for n in loaded.nodes:
            for addr in n.addresses:
                ipam.reserve(addr)
            tn._put_node(n)
            if n.ephemeral:
                # Nobody is connected right after a start: give each a fresh timer.
                tn.gc.schedule(n.id)
        return tn

    async def close(self) -> None:
        await self.gc.close()
        self.bus.close()
        async with self._lock:
            self._executor.shutdown(wait=True)

    async def ping_db(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, persist.ping,
                                                         self.engine)

    # --- write plumbing ----------------------------------------------------------------------

    async def _commit(self, fn: Callable[[persist.Tx], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, persist.run_tx, self.engine, fn)
        except (SQLAlchemyError, LookupError) as e:
            log.warning("database write failed: %s", e)
            raise PersistError(f"database write failed: {e}") from e

    async def run_in_tx(self, fn: Callable[[persist.Tx], T]) -> T:
        """One transaction on the DB thread, for stores that keep their own memory (OAuth)."""
        return await self._commit(fn)

    async def _serialized(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one write under the lock in its own task: a cancelled caller cannot stop a
        write between its commit and the memory update."""

        async def run() -> T:
            async with self._lock:
                result = await fn()
                self.generation += 1
                return result

        return await asyncio.shield(asyncio.ensure_future(run()))

    def _publish(self, *changes: Change) -> None:
        # Listeners (policy, routes) update derived state before any session sees the change.
        for listener in self.listeners:
            listener(changes)
        self.bus.publish(*changes)

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
        self._verified_paks = {d: i for d, i in self._verified_paks.items() if i != key_id}

    def _put_apikey(self, a: ApiKey) -> None:
        self.api_keys[a.id] = a
        self._apikey_by_prefix[a.prefix] = a.id

    def _drop_apikey(self, key_id: int) -> None:
        a = self.api_keys.pop(key_id, None)
        if a is None:
            return
        self._apikey_by_prefix.pop(a.prefix, None)
        self._verified_apikeys = {d: i for d, i in self._verified_apikeys.items()
                                  if i != key_id}

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
        n = self.nodes.get(node_id)
        if n is None:
            raise NotFound(f"node not found: {node_id}")
        return n

    def get_user(self, user_id: int) -> User:
        u = self.users.get(user_id)
        if u is None:
            raise NotFound("user not found")
        return u

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
        k = self.preauth_keys.get(key_id)
        if k is None:
            raise NotFound("auth-key not found")
        return k

    def get_api_key(self, key_id: int) -> ApiKey:
        a = self.api_keys.get(key_id)
        if a is None:
            raise NotFound("API key not found")
        return a

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

    def _taken_names(self, except_id: int | None = None) -> _TakenNames:
        return _TakenNames(self._by_given_name, except_id)

    def _default_expiry(self, now: datetime) -> datetime | None:
        return now + timedelta(seconds=self.default_expiry) if self.default_expiry > 0 else None

    # --- users -------------------------------------------------------------------------------

    async def create_user(self, name: str, display_name: str = "", email: str = "",
                          provider_identifier: str | None = None, provider: str = "",
                          profile_pic_url: str = "", groups: Iterable[str] = ()) -> User:
        if provider_identifier is None:
            try:
                names.validate_username(name)
            except names.InvalidName as e:
                raise InvalidArgument(str(e)) from None

        async def op() -> User:
            for u in self.users.values():
                same_local = provider_identifier is None and u.provider_identifier is None
                if (same_local and u.name == name) or (
                        provider_identifier is not None
                        and u.provider_identifier == provider_identifier):
                    raise AlreadyExists("user already exists")
            now = _utcnow()
            user = User(id=0, name=name, display_name=display_name, email=email,
                        provider_identifier=provider_identifier, provider=provider,
                        profile_pic_url=profile_pic_url, created_at=now,
                        groups=_groups(groups))
            vals = persist.user_values(user) | {"created_at": now, "updated_at": now}
            uid = await self._commit(lambda tx: tx.insert(db.User, vals))
            user = replace(user, id=uid)
            self.users[uid] = user
            self._publish(Change(ChangeKind.USER, user_id=uid))
            return user

        return await self._serialized(op)

    async def update_user(self, user_id: int, **fields: Any) -> User:
        """Update profile fields (display_name, email, profile_pic_url, ...) e.g. from OIDC."""
        allowed = {"name", "display_name", "email", "provider", "profile_pic_url", "groups"}
        if set(fields) - allowed:
            raise InvalidArgument(f"cannot update user fields {sorted(set(fields) - allowed)}")
        if "groups" in fields:
            fields["groups"] = _groups(fields["groups"])

        async def op() -> User:
            old = self.get_user(user_id)
            new = replace(old, **fields)
            if new == old:
                return old
            vals = persist.user_values(new) | {"updated_at": _utcnow()}
            await self._commit(lambda tx: tx.update(db.User, user_id, vals))
            self.users[user_id] = new
            self._publish(Change(ChangeKind.USER, user_id=user_id))
            return new

        return await self._serialized(op)

    async def rename_user(self, user_id: int, new_name: str) -> User:
        try:
            names.validate_username(new_name)
        except names.InvalidName as e:
            raise InvalidArgument(str(e)) from None

        async def op() -> User:
            old = self.get_user(user_id)
            if old.provider == "oidc":
                raise InvalidArgument("cannot edit OIDC user")
            if any(u.id != user_id and u.name == new_name and u.provider_identifier is None
                   for u in self.users.values()) and old.provider_identifier is None:
                raise AlreadyExists("user already exists")
            new = replace(old, name=new_name)
            vals = {"name": new_name, "updated_at": _utcnow()}
            await self._commit(lambda tx: tx.update(db.User, user_id, vals))
            self.users[user_id] = new
            self._publish(Change(ChangeKind.USER, user_id=user_id))
            return new

        return await self._serialized(op)

    async def delete_user(self, user_id: int) -> None:
        async def op() -> None:
            self.get_user(user_id)
            if any(n.user_id == user_id for n in self.nodes.values()):
                raise Conflict("user not empty: node(s) found")
            key_ids = [k.id for k in self.preauth_keys.values() if k.user_id == user_id]

            def tx_fn(tx: persist.Tx) -> None:
                for kid in key_ids:
                    tx.clear_auth_key_refs(kid)
                    tx.delete(db.PreAuthKey, kid)
                tx.delete(db.User, user_id)

            await self._commit(tx_fn)
            for kid in key_ids:
                self._drop_pak(kid)
                self._clear_node_key_refs(kid)
            del self.users[user_id]
            self._publish(Change(ChangeKind.USER, user_id=user_id))

        await self._serialized(op)

    def _clear_node_key_refs(self, key_id: int) -> None:
        for n in list(self.nodes.values()):
            if n.auth_key_id == key_id:
                self._put_node(replace(n, auth_key_id=None))

    # --- pre-auth keys -----------------------------------------------------------------------

    async def create_preauth_key(self, user_id: int | None, reusable: bool = False,
                                 ephemeral: bool = False, expiration: datetime | None = None,
                                 tags: Iterable[str] = (), description: str = "",
                                 ) -> tuple[PreAuthKey, str]:
        """Returns the key and its full "hskey-auth-..." text (shown once, never stored)."""
        try:
            tag_t = pk.validate_tags(list(tags))
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        if user_id is None and not tag_t:
            raise InvalidArgument(pk.ERR_NOT_TAGGED_OR_OWNED)
        full, prefix, secret = pk.new_key()
        hashed = await asyncio.to_thread(pk.hash_secret, secret)

        async def op() -> PreAuthKey:
            if user_id is not None:
                self.get_user(user_id)
            now = _utcnow()
            k = PreAuthKey(id=0, prefix=prefix, hash=hashed, legacy_key=None, user_id=user_id,
                           reusable=reusable, ephemeral=ephemeral, used=False, tags=tag_t,
                           created_at=now, expiration=expiration, description=description)
            vals = persist.pak_values(k)
            kid = await self._commit(lambda tx: tx.insert(db.PreAuthKey, vals))
            k = replace(k, id=kid)
            self._put_pak(k)
            return k

        return await self._serialized(op), full

    async def expire_preauth_key(self, key_id: int, at: datetime | None = None) -> PreAuthKey:
        async def op() -> PreAuthKey:
            k = self.get_preauth_key(key_id)
            new = replace(k, expiration=at or _utcnow())
            await self._commit(lambda tx: tx.update(db.PreAuthKey, key_id,
                                                    {"expiration": new.expiration}))
            self._put_pak(new)
            return new

        return await self._serialized(op)

    async def revoke_preauth_key(self, key_id: int, at: datetime | None = None) -> PreAuthKey:
        """Soft-revoke (what a v2 DELETE does): the key stays, unusable, until it is reaped.
        Revoking an already revoked key is NotFound, as Headscale answers."""

        async def op() -> PreAuthKey:
            k = self.get_preauth_key(key_id)
            if k.revoked is not None:
                raise NotFound("pre-auth key not found")
            new = replace(k, revoked=at or _utcnow())
            await self._commit(lambda tx: tx.update(db.PreAuthKey, key_id,
                                                    {"revoked": new.revoked}))
            self._put_pak(new)
            return new

        return await self._serialized(op)

    async def reap_revoked_preauth_keys(self, before: datetime) -> int:
        """Delete keys revoked before `before` (nodes keep working: their key link is cleared)."""

        async def op() -> int:
            dead = [k.id for k in self.preauth_keys.values()
                    if k.revoked is not None and k.revoked < before]
            if not dead:
                return 0

            def tx_fn(tx: persist.Tx) -> None:
                for kid in dead:
                    tx.clear_auth_key_refs(kid)
                    tx.delete(db.PreAuthKey, kid)

            await self._commit(tx_fn)
            for kid in dead:
                self._drop_pak(kid)
                self._clear_node_key_refs(kid)
            return len(dead)

        return await self._serialized(op)

    async def delete_preauth_key(self, key_id: int) -> None:
        async def op() -> None:
            self.get_preauth_key(key_id)

            def tx_fn(tx: persist.Tx) -> None:
                tx.clear_auth_key_refs(key_id)
                tx.delete(db.PreAuthKey, key_id)

            await self._commit(tx_fn)
            self._drop_pak(key_id)
            self._clear_node_key_refs(key_id)

        await self._serialized(op)

    async def find_preauth_key(self, key: str) -> PreAuthKey:
        """The stored key matching `key` (bcrypt-checked), else InvalidAuthKey(unknown)."""
        try:
            parsed = pk.parse_key(key)
        except pk.KeyFormatError:
            raise InvalidAuthKey(pk.ERR_UNKNOWN) from None
        if parsed.prefix is None:
            kid = self._pak_by_legacy.get(key)
            if kid is None:
                raise InvalidAuthKey(pk.ERR_UNKNOWN)
            return self.preauth_keys[kid]
        kid = self._pak_by_prefix.get(parsed.prefix)
        if kid is None:
            raise InvalidAuthKey(pk.ERR_UNKNOWN)
        d = _digest(key)
        if self._verified_paks.get(d) != kid:
            stored = self.preauth_keys[kid]
            if not await asyncio.to_thread(pk.check_secret, parsed.secret, stored.hash):
                raise InvalidAuthKey(pk.ERR_UNKNOWN)
            if kid not in self.preauth_keys:  # deleted while we were hashing
                raise InvalidAuthKey(pk.ERR_UNKNOWN)
            self._verified_paks[d] = kid
        return self.preauth_keys[kid]

    async def validate_preauth_key(self, key: str, machine_key: bytes | None = None,
                                   now: datetime | None = None) -> PreAuthKey:
        """Usable for registration? A single-use key already used by this same machine
        counts as usable (clients resend the key they registered with)."""
        pak = await self.find_preauth_key(key)
        reason = pk.unusable_reason(pak, now or _utcnow())
        if reason == pk.ERR_USED and machine_key is not None and any(
                n.auth_key_id == pak.id for n in self.nodes_by_machine_key(machine_key)):
            reason = None
        if reason is not None:
            raise InvalidAuthKey(reason)
        return pak

    # --- api keys ----------------------------------------------------------------------------

    async def create_api_key(self, expiration: datetime | None = None,
                             user_id: int | None = None) -> tuple[ApiKey, str]:
        full, prefix, secret = ak.new_key()
        hashed = await asyncio.to_thread(ak.hash_secret, secret)

        async def op() -> ApiKey:
            if user_id is not None:
                self.get_user(user_id)
            a = ApiKey(id=0, prefix=prefix, hash=hashed, created_at=_utcnow(),
                       expiration=expiration, user_id=user_id)
            vals = persist.apikey_values(a)
            kid = await self._commit(lambda tx: tx.insert(db.ApiKey, vals))
            a = replace(a, id=kid)
            self._put_apikey(a)
            return a

        return await self._serialized(op), full

    async def expire_api_key(self, key_id: int, at: datetime | None = None) -> ApiKey:
        async def op() -> ApiKey:
            a = self.get_api_key(key_id)
            new = replace(a, expiration=at or _utcnow())
            await self._commit(lambda tx: tx.update(db.ApiKey, key_id,
                                                    {"expiration": new.expiration}))
            self._put_apikey(new)
            return new

        return await self._serialized(op)

    async def delete_api_key(self, key_id: int) -> None:
        async def op() -> None:
            self.get_api_key(key_id)
            await self._commit(lambda tx: tx.delete(db.ApiKey, key_id))
            self._drop_apikey(key_id)

        await self._serialized(op)

    async def validate_api_key(self, key: str, now: datetime | None = None) -> ApiKey:
        """The API key for a Bearer token; records last_seen (persisted at most once a minute)."""
        try:
            parsed = ak.parse_api_key(key)
        except ak.KeyFormatError:
            raise InvalidAPIKey("failed to parse ApiKey") from None
        kid = self._apikey_by_prefix.get(parsed.prefix)
        if kid is None:
            raise InvalidAPIKey("API key not found")
        d = _digest(key)
        if self._verified_apikeys.get(d) != kid:
            if not await asyncio.to_thread(ak.check_secret, parsed.secret,
                                           self.api_keys[kid].hash):
                raise InvalidAPIKey("invalid API key")
            if kid not in self.api_keys:
                raise InvalidAPIKey("API key not found")
            self._verified_apikeys[d] = kid
        now = now or _utcnow()
        a = self.api_keys[kid]
        if a.is_expired(now):
            raise InvalidAPIKey("API key expired")
        a = replace(a, last_seen=now)
        self._put_apikey(a)
        loop_now = asyncio.get_running_loop().time()
        if loop_now - self._apikey_persisted.get(kid, -1e18) >= API_KEY_LAST_SEEN_PERSIST:
            self._apikey_persisted[kid] = loop_now

            async def op() -> None:
                if kid in self.api_keys:
                    await self._commit(lambda tx: tx.update(db.ApiKey, kid, {"last_seen": now}))

            try:
                await self._serialized(op)
            except PersistError:
                pass  # last_seen is informational; never refuse a request over it
        return a

    # --- node registration -------------------------------------------------------------------

    def _existing_for_pak(self, machine_key: bytes, pak: PreAuthKey) -> Node | None:
        """Headscale findExistingNodeForPAK: the node this machine already has for the key's
        owner (or a tagged one); a tagged key may convert a single user-owned node."""
        nodes = self.nodes_by_machine_key(machine_key)
        tagged = [n for n in nodes if n.is_tagged]
        if pak.user_id is not None:
            for n in nodes:
                if n.user_id == pak.user_id and not n.is_tagged:
                    return n
            if tagged:
                return tagged[0]
            if not pak.tags:
                return None
        if pak.tags:
            if tagged:
                return tagged[0]
            owned = [n for n in nodes if n.user_id is not None and not n.is_tagged]
            if len(owned) == 1:
                return owned[0]
            if len(owned) > 1:
                raise Conflict("machine key maps to ambiguous node ownership")
        return None

    def _check_node_key_free(self, node_key: bytes, machine_key: bytes) -> None:
        holder = self.node_by_node_key(node_key)
        if holder is not None and holder.machine_key != machine_key:
            raise Conflict("node key already in use by another machine")

    @staticmethod
    def _merge_hostinfo(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        # Clients >= 1.66 omit NetInfo when unchanged; keep the one we have.
        if "NetInfo" not in new and "NetInfo" in old:
            return {**new, "NetInfo": old["NetInfo"]}
        return dict(new)

    async def register_with_authkey(
        self, machine_key: bytes, node_key: bytes, old_node_key: bytes | None,
        hostinfo: dict[str, Any] | None, key: str, requested_expiry: datetime | None = None,
        ephemeral: bool = False, capver: int = 0, now: datetime | None = None,
    ) -> Node:
        """Register (or re-register) the machine with a pre-auth key (Headscale
        HandleNodeFromPreAuthKey). The client's Ephemeral flag is ignored as in Headscale:
        ephemerality comes from the key."""
        pak_found = await self.find_preauth_key(key)
        hostinfo = dict(hostinfo or {})
        hostname = str(hostinfo.get("Hostname") or "")

        async def op() -> Node:
            now_ = now or _utcnow()
            pak = self.preauth_keys.get(pak_found.id)
            if pak is None:
                raise InvalidAuthKey(pk.ERR_UNKNOWN)
            existing = self._existing_for_pak(machine_key, pak)
            if existing is None and old_node_key:
                # A rotation from a node this machine owns keeps that node.
                prev = self.node_by_node_key(old_node_key)
                if prev is not None and prev.machine_key == machine_key:
                    existing = prev
            converting = existing is not None and bool(pak.tags) and not existing.is_tagged
            skip = (existing is not None and existing.node_key == node_key
                    and not existing.is_expired(now_) and not converting)
            if not skip:
                reason = pk.unusable_reason(pak, now_)
                if (reason == pk.ERR_USED and existing is not None
                        and existing.auth_key_id == pak.id and not existing.is_expired(now_)):
                    reason = None  # the same machine presenting its key again
                if reason is not None:
                    raise InvalidAuthKey(reason)
            if pak.user_id is None and not pak.tags:
                raise InvalidAuthKey(pk.ERR_INVALID)  # its user was deleted
            if pak.user_id is not None and not pak.tags and pak.user_id not in self.users:
                raise InvalidAuthKey(pk.ERR_INVALID)
            self._check_node_key_free(node_key, machine_key)
            mark_used = not pak.reusable and not pak.used
            if existing is not None:
                return await self._reregister(existing, pak, node_key, hostinfo, hostname,
                                              requested_expiry, converting, mark_used, now_,
                                              capver)
            return await self._create_node(machine_key, node_key, hostinfo, hostname, pak,
                                           requested_expiry, mark_used, now_, capver)

        return await self._serialized(op)

    async def _reregister(self, old: Node, pak: PreAuthKey, node_key: bytes,
                          hostinfo: dict[str, Any], hostname: str,
                          requested_expiry: datetime | None, converting: bool,
                          mark_used: bool, now: datetime, capver: int) -> Node:
        fields: set[Field] = set()
        new = replace(old, node_key=node_key, hostname=hostname,
                      hostinfo=self._merge_hostinfo(old.hostinfo, hostinfo),
                      register_method="authkey", auth_key_id=pak.id, last_seen=now,
                      updated_at=now, capver=capver or old.capver)
        if converting:
            new = replace(new, tags=pak.tags, user_id=None, expiry=None)
            fields |= {Field.TAGS, Field.USER}
        if not new.is_tagged:
            new = replace(new, expiry=requested_expiry or self._default_expiry(now))
        if hostname != old.hostname and names.is_auto_derived(old.given_name, old.hostname):
            new = replace(new, given_name=names.unique_given_name(
                names.given_name_base(hostname), self._taken_names(old.id)))
        differs = {Field.NODE_KEY: new.node_key != old.node_key,
                   Field.HOSTNAME: new.hostname != old.hostname,
                   Field.HOSTINFO: new.hostinfo != old.hostinfo,
                   Field.EXPIRY: new.expiry != old.expiry,
                   Field.GIVEN_NAME: new.given_name != old.given_name}
        fields |= {f for f, changed in differs.items() if changed}
        new.version = old.version + 1
        vals = persist.node_values(new)

        def tx_fn(tx: persist.Tx) -> None:
            tx.update(db.Node, old.id, vals)
            if mark_used:
                tx.update(db.PreAuthKey, pak.id, {"used": True})

        await self._commit(tx_fn)
        if mark_used:
            self._put_pak(replace(pak, used=True))
        self._put_node(new)
        if Field.USER in fields:
            self._publish(Change(ChangeKind.POLICY))
        self._publish(Change(ChangeKind.NODE_CHANGED, new.id, frozenset(fields)))
        return new

    async def _create_node(self, machine_key: bytes, node_key: bytes, hostinfo: dict[str, Any],
                           hostname: str, pak: PreAuthKey | None,
                           requested_expiry: datetime | None, mark_used: bool,
                           now: datetime, capver: int, user_id: int | None = None,
                           register_method: str = "authkey",
                           tags: tuple[str, ...] = ()) -> Node:
        if pak is not None:
            tags = pak.tags
            user_id = None if pak.tags else pak.user_id
        tagged = bool(tags)
        try:
            v4, v6 = self.ipam.allocate()
        except IPAllocationError as e:
            raise StateError(str(e)) from None
        node = Node(
            id=0, machine_key=machine_key, node_key=node_key, disco_key=None,
            hostname=hostname,
            given_name=names.unique_given_name(names.given_name_base(hostname),
                                               self._taken_names()),
            user_id=None if tagged else user_id, ipv4=v4, ipv6=v6,
            register_method=register_method, created_at=now, updated_at=now, tags=tags,
            auth_key_id=pak.id if pak is not None else None,
            expiry=None if tagged else (requested_expiry or self._default_expiry(now)),
            last_seen=now, hostinfo=hostinfo,
            ephemeral=pak.ephemeral if pak is not None else False, capver=capver, version=1,
        )
        vals = persist.node_values(node)

        def tx_fn(tx: persist.Tx) -> int:
            nid = tx.insert(db.Node, vals)
            if mark_used and pak is not None:
                tx.update(db.PreAuthKey, pak.id, {"used": True})
            return nid

        try:
            nid = await self._commit(tx_fn)
        except BaseException:
            self.ipam.release(v4, v6)
            raise
        node = replace(node, id=nid)
        if mark_used and pak is not None:
            self._put_pak(replace(pak, used=True))
        self._put_node(node)
        self._publish(Change(ChangeKind.NODE_ADDED, nid))
        return node

    async def register_for_user(
        self, machine_key: bytes, node_key: bytes, user_id: int,
        hostinfo: dict[str, Any] | None, requested_expiry: datetime | None = None,
        register_method: str = "cli", capver: int = 0, now: datetime | None = None,
    ) -> Node:
        """Interactive/OIDC completion: the machine's node for this user is re-keyed in
        place, or a new user-owned node is created. Hostinfo.RequestTags (`--advertise-tags`)
        tags the node when `tag_authorizer` allows every tag for this user (else
        InvalidArgument); re-auth without them returns a tagged node to the user."""
        hostinfo = dict(hostinfo or {})
        hostname = str(hostinfo.get("Hostname") or "")
        requested = _request_tags(hostinfo)

        async def op() -> Node:
            now_ = now or _utcnow()
            user = self.get_user(user_id)
            self._check_node_key_free(node_key, machine_key)
            existing = next((n for n in self.nodes_by_machine_key(machine_key)
                             if n.user_id == user_id or n.is_tagged), None)
            allowed = self.tag_authorizer
            rejected = [t for t in requested
                        if allowed is None or not allowed(user, existing, t)]
            if rejected:
                raise InvalidArgument(f"requested tags [{' '.join(rejected)}] are invalid or "
                                      "not permitted")
            if existing is None:
                return await self._create_node(machine_key, node_key, hostinfo, hostname, None,
                                               requested_expiry, False, now_, capver,
                                               user_id=user_id,
                                               register_method=register_method,
                                               tags=requested)
            new = replace(existing, node_key=node_key, hostname=hostname,
                          hostinfo=self._merge_hostinfo(existing.hostinfo, hostinfo),
                          register_method=register_method, last_seen=now_, updated_at=now_,
                          capver=capver or existing.capver,
                          version=existing.version + 1)
            fields = {Field.NODE_KEY, Field.EXPIRY, Field.HOSTINFO}
            if requested:
                new = replace(new, tags=requested, user_id=None, expiry=None)
            elif existing.is_tagged:
                # Back to its user (Headscale); no longer tied to the tagged key, so a node
                # joined with a tagged ephemeral key is not garbage-collected as the user's.
                new = replace(new, tags=(), user_id=user_id, auth_key_id=None, ephemeral=False)
            if not new.is_tagged:
                new = replace(new, expiry=requested_expiry or self._default_expiry(now_))
            if (new.tags, new.user_id) != (existing.tags, existing.user_id):
                fields |= {Field.TAGS, Field.USER}
            node = await self._write_node(existing, new, ChangeKind.NODE_CHANGED, fields)
            if Field.TAGS in fields:
                self._publish(Change(ChangeKind.POLICY))
            return node

        return await self._serialized(op)

    async def _write_node(self, old: Node, new: Node, kind: ChangeKind,
                          fields: Iterable[Field]) -> Node:
        vals = persist.node_values(new)
        await self._commit(lambda tx: tx.update(db.Node, old.id, vals))
        self._put_node(new)
        self._publish(Change(kind, new.id, frozenset(fields)))
        return new

    def _bump(self, n: Node, **changes: Any) -> Node:
        return replace(n, **changes, version=n.version + 1)

    # --- node lifecycle ----------------------------------------------------------------------

    async def backfill_node_ips(self) -> list[str]:
        """Give every node an address in each configured prefix and drop addresses of a
        family no longer configured (Headscale's `nodes backfillips`); returns what changed."""
        async def op() -> list[str]:
            done: list[str] = []
            for old in sorted(self.nodes.values(), key=lambda n: n.id):
                v4, v6, notes = old.ipv4, old.ipv6, []
                if self.ipam.v4 is not None and v4 is None:
                    v4 = self.ipam.allocate_v4()
                    notes.append(f"assigned IPv4 {v4} to Node({old.id}) {old.hostname}")
                if self.ipam.v6 is not None and v6 is None:
                    v6 = self.ipam.allocate_v6()
                    notes.append(f"assigned IPv6 {v6} to Node({old.id}) {old.hostname}")
                if self.ipam.v4 is None and v4 is not None:
                    notes.append(f"removing IPv4 {v4} from Node({old.id}) {old.hostname}")
                    v4 = None
                if self.ipam.v6 is None and v6 is not None:
                    notes.append(f"removing IPv6 {v6} from Node({old.id}) {old.hostname}")
                    v6 = None
                if not notes:
                    continue
                new = self._bump(old, ipv4=v4, ipv6=v6, updated_at=_utcnow())
                try:
                    await self._write_node(old, new, ChangeKind.NODE_CHANGED, {Field.ADDRESSES})
                except PersistError:
                    self.ipam.release(*(a for a in (v4, v6) if a not in (old.ipv4, old.ipv6)))
                    raise
                done.extend(notes)
            return done

        return await self._serialized(op)

    async def rotate_node_key(self, node_id: int, new_node_key: bytes) -> Node:
        async def op() -> Node:
            old = self.get_node(node_id)
            if old.node_key == new_node_key:
                return old
            self._check_node_key_free(new_node_key, old.machine_key)
            new = self._bump(old, node_key=new_node_key, updated_at=_utcnow())
            return await self._write_node(old, new, ChangeKind.NODE_CHANGED, {Field.NODE_KEY})

        return await self._serialized(op)

    async def logout(self, node_id: int, at: datetime | None = None) -> Node | None:
        """Client logout: expire the key (delete ephemeral nodes); None if deleted."""
        async def op() -> Node | None:
            old = self.get_node(node_id)
            if old.ephemeral:
                await self._delete_node_locked(old)
                return None
            now = _utcnow()
            expiry = min(at, now) if at is not None else now
            new = self._bump(old, expiry=expiry, updated_at=now)
            return await self._write_node(old, new, ChangeKind.NODE_KEY_EXPIRY, {Field.EXPIRY})

        return await self._serialized(op)

    async def set_expiry(self, node_id: int, expiry: datetime | None) -> Node:
        """Admin expire (a time, now) or disable expiry (None)."""
        async def op() -> Node:
            old = self.get_node(node_id)
            new = self._bump(old, expiry=expiry, updated_at=_utcnow())
            return await self._write_node(old, new, ChangeKind.NODE_KEY_EXPIRY, {Field.EXPIRY})

        return await self._serialized(op)

    async def expire_node(self, node_id: int, at: datetime | None = None) -> Node:
        return await self.set_expiry(node_id, at or _utcnow())

    async def rename_node(self, node_id: int, new_name: str) -> Node:
        try:
            names.validate_given_name(new_name, self.base_domain)
        except names.InvalidName as e:
            raise InvalidArgument(str(e)) from None

        async def op() -> Node:
            old = self.get_node(node_id)
            holder = self._by_given_name.get(new_name)
            if holder is not None and holder != node_id:
                raise AlreadyExists(f"node name is not unique: {new_name}")
            if old.given_name == new_name:
                return old
            new = self._bump(old, given_name=new_name, updated_at=_utcnow())
            return await self._write_node(old, new, ChangeKind.NODE_CHANGED, {Field.GIVEN_NAME})

        return await self._serialized(op)

    async def delete_node(self, node_id: int) -> None:
        async def op() -> None:
            await self._delete_node_locked(self.get_node(node_id))

        await self._serialized(op)

    async def _delete_node_locked(self, node: Node) -> None:
        await self._commit(lambda tx: tx.delete(db.Node, node.id))
        self._drop_node(node.id)
        self.ipam.release(node.ipv4, node.ipv6)
        self.gc.cancel(node.id)
        self._publish(Change(ChangeKind.NODE_REMOVED, node.id))

    async def _gc_delete(self, node_id: int) -> None:
        async def op() -> None:
            n = self.nodes.get(node_id)
            if n is not None and n.ephemeral and not n.online:
                log.info("deleting inactive ephemeral node %d (%s)", n.id, n.given_name)
                await self._delete_node_locked(n)

        await self._serialized(op)

    async def set_tags(self, node_id: int, tags: Iterable[str]) -> Node:
        """Admin SetTags: a non-empty set of "tag:" tags; makes the node tagged (no user,
        no expiry). Whether the tags exist in the policy is checked by the caller."""
        tag_list = list(tags)
        if not tag_list:
            raise InvalidArgument("cannot set empty tags")
        try:
            tag_t = pk.validate_tags(tag_list)
        except ValueError as e:
            raise InvalidArgument(str(e).replace("auth-key tag", "tag")) from None

        async def op() -> Node:
            old = self.get_node(node_id)
            if old.tags == tag_t:
                return old
            new = self._bump(old, tags=tag_t, user_id=None, expiry=None,
                             updated_at=_utcnow())
            node = await self._write_node(old, new, ChangeKind.NODE_CHANGED,
                                          {Field.TAGS, Field.USER, Field.EXPIRY})
            self._publish(Change(ChangeKind.POLICY))
            return node

        return await self._serialized(op)

    async def approve_routes(self, node_id: int, routes: Iterable[str | IPNetwork]) -> Node:
        """Replace the approved routes. Approving either exit route approves both."""
        parsed: set[IPNetwork] = set()
        for r in routes:
            try:
                parsed.add(ipaddress.ip_network(r, strict=False))
            except (ValueError, TypeError):
                raise InvalidArgument(f"invalid route {r!r}") from None
        if parsed & set(EXIT_ROUTES):
            parsed |= set(EXIT_ROUTES)
        ordered = tuple(sorted(parsed, key=lambda n: (n.version, n.network_address,
                                                      n.prefixlen)))

        async def op() -> Node:
            old = self.get_node(node_id)
            if old.approved_routes == ordered:
                return old
            new = self._bump(old, approved_routes=ordered, updated_at=_utcnow())
            return await self._write_node(old, new, ChangeKind.NODE_CHANGED,
                                          {Field.APPROVED_ROUTES})

        return await self._serialized(op)

    # --- runtime updates from the node itself ------------------------------------------------

    async def update_from_map_request(
        self, node_id: int, *, endpoints: Iterable[str] | None = None,
        disco_key: bytes | None = None, hostinfo: dict[str, Any] | None = None,
        capver: int | None = None,
    ) -> frozenset[Field]:
        """Apply a MapRequest's endpoints, disco key (non-zero only) and hostinfo; returns
        what changed (ENDPOINTS, DISCO_KEY, HOME_DERP, HOSTINFO, HOSTNAME, GIVEN_NAME,
        ROUTES). Empty values never overwrite known ones."""
        eps = tuple(endpoints) if endpoints is not None else ()

        async def op() -> frozenset[Field]:
            old = self.get_node(node_id)
            changes: dict[str, Any] = {}
            fields: set[Field] = set()
            if eps and eps != old.endpoints:
                changes["endpoints"] = eps
                fields.add(Field.ENDPOINTS)
            if disco_key and disco_key != ZERO_KEY and disco_key != old.disco_key:
                changes["disco_key"] = disco_key
                fields.add(Field.DISCO_KEY)
            if hostinfo:
                hi = self._merge_hostinfo(old.hostinfo, hostinfo)
                if hi != old.hostinfo:
                    changes["hostinfo"] = hi
                    if _derp(hi) != _derp(old.hostinfo):
                        fields.add(Field.HOME_DERP)
                    if hi.get("RoutableIPs") != old.hostinfo.get("RoutableIPs"):
                        fields.add(Field.ROUTES)
                    rest_old = {k: v for k, v in old.hostinfo.items() if k != "NetInfo"}
                    rest_new = {k: v for k, v in hi.items() if k != "NetInfo"}
                    if rest_old != rest_new or _netinfo_rest(hi) != _netinfo_rest(old.hostinfo):
                        fields.add(Field.HOSTINFO)
                    hn = hi.get("Hostname")
                    if isinstance(hn, str) and hn and hn != old.hostname:
                        changes["hostname"] = hn
                        fields.add(Field.HOSTNAME)
                        if names.is_auto_derived(old.given_name, old.hostname):
                            gn = names.unique_given_name(names.given_name_base(hn),
                                                         self._taken_names(old.id))
                            if gn != old.given_name:
                                changes["given_name"] = gn
                                fields.add(Field.GIVEN_NAME)
            if capver and capver != old.capver and not fields:
                # Live-only: no DB write, no peer-visible change.
                self.nodes[node_id] = replace(old, capver=capver)
                return frozenset()
            if not changes:
                return frozenset()
            new = self._bump(old, **changes, capver=capver or old.capver, updated_at=_utcnow())
            kind = ChangeKind.NODE_PATCH if fields <= PATCH_FIELDS else ChangeKind.NODE_CHANGED
            await self._write_node(old, new, kind, fields)
            return frozenset(fields)

        return await self._serialized(op)

    async def set_online(self, node_id: int, online: bool, at: datetime | None = None) -> bool:
        """Mark a node online/offline (with last_seen); returns whether the flag flipped.
        Offline ephemeral nodes are scheduled for deletion; reconnecting cancels it."""
        async def op() -> bool:
            old = self.nodes.get(node_id)
            if old is None:
                return False
            now = at or _utcnow()
            if online:
                self.gc.cancel(node_id)
            elif old.ephemeral:
                self.gc.schedule(node_id)
            if old.online == online:
                return False
            new = self._bump(old, online=online, last_seen=now)
            try:
                await self._commit(lambda tx: tx.update(db.Node, node_id, {"last_seen": now}))
            except PersistError:
                # Online state is runtime-only; a lost last_seen write must not hide it.
                log.warning("could not persist last_seen for node %d", node_id)
            self._put_node(new)
            self._publish(Change(ChangeKind.NODE_ONLINE, node_id,
                                 frozenset({Field.ONLINE if online else Field.OFFLINE})))
            return True

        return await self._serialized(op)


def _request_tags(hi: dict[str, Any]) -> tuple[str, ...]:
    tags = hi.get("RequestTags") or ()
    if not isinstance(tags, list | tuple):
        return ()
    return tuple(sorted({str(t) for t in tags if t}))


def _derp(hi: dict[str, Any]) -> Any:
    ni = hi.get("NetInfo")
    return ni.get("PreferredDERP") if isinstance(ni, dict) else None


def _netinfo_rest(hi: dict[str, Any]) -> Any:
    ni = hi.get("NetInfo")
    if not isinstance(ni, dict):
        return {}
    return {k: v for k, v in ni.items() if k != "PreferredDERP"}


class _TakenNames:
    """`in` view of the given-name index that ignores one node (its own current name)."""

    def __init__(self, index: dict[str, int], except_id: int | None) -> None:
        self.index = index
        self.except_id = except_id

    def __contains__(self, name: object) -> bool:
        holder = self.index.get(name) if isinstance(name, str) else None
        return holder is not None and holder != self.except_id
