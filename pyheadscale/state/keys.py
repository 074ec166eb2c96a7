"""Pre-auth keys and API keys: creation, expiry, revocation, and checking a presented key.

Secrets are stored as bcrypt hashes, so checking one costs a quarter of a second of CPU. It
runs in a thread, outside the write lock, and a key that passed once is remembered by the
SHA-256 of its full text: clients present the same key on every restart, UIs the same API
key on every request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import datetime
from typing import Any, TypeVar

from sqlmodel import SQLModel

from pyheadscale.auth import apikeys as ak
from pyheadscale.auth import preauthkeys as pk
from pyheadscale.db import models as db
from pyheadscale.state import persist
from pyheadscale.state.base import TailnetBase, digest, serialized, utcnow
from pyheadscale.state.errors import (
    InvalidAPIKey,
    InvalidArgument,
    InvalidAuthKey,
    NotFound,
    PersistError,
)
from pyheadscale.state.model import ApiKey, PreAuthKey

API_KEY_LAST_SEEN_PERSIST = 60.0  # seconds between last_seen writes per API key

K = TypeVar("K", PreAuthKey, ApiKey)


class KeyWrites(TailnetBase):
    # --- pre-auth keys -----------------------------------------------------------------------

    async def create_preauth_key(self, user_id: int | None, *, reusable: bool = False,
                                 ephemeral: bool = False, expiration: datetime | None = None,
                                 tags: Iterable[str] = (), description: str = "",
                                 ) -> tuple[PreAuthKey, str]:
        """Returns the key and its full "hskey-auth-..." text (shown once, never stored)."""
        # Taken before hashing (a thread hop that a busy machine makes slow), so a caller's
        # `now + lifetime` expiration is `lifetime` after the creation time it reports.
        created = utcnow()
        try:
            tag_t = pk.validate_tags(list(tags))
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        if user_id is None and not tag_t:
            raise InvalidArgument(pk.ERR_NOT_TAGGED_OR_OWNED)
        full, prefix, secret = pk.new_key()
        hashed = await asyncio.to_thread(pk.hash_secret, secret)
        key = PreAuthKey(id=0, prefix=prefix, hash=hashed, legacy_key=None, user_id=user_id,
                         reusable=reusable, ephemeral=ephemeral, used=False, tags=tag_t,
                         created_at=created, expiration=expiration, description=description)
        return await self._insert_key(key, db.PreAuthKey, persist.pak_values(key),
                                      self._put_pak), full

    @serialized
    async def _insert_key(self, key: K, table: type[SQLModel], values: dict[str, Any],
                          put: Callable[[K], None]) -> K:
        """Store a new key row, then hold it in memory (`put`) under the id it was given."""
        if key.user_id is not None:
            self.get_user(key.user_id)
        kid = await self._commit(lambda tx: tx.insert(table, values))
        key = replace(key, id=kid)
        put(key)
        return key

    async def _stamp(self, key: K, table: type[SQLModel], column: str, at: datetime | None,
                     put: Callable[[K], None]) -> K:
        """Set one time column of a key (`at`, default now) in the database and in memory."""
        change: dict[str, Any] = {column: at or utcnow()}
        new = replace(key, **change)
        await self._commit(lambda tx: tx.update(table, key.id, change))
        put(new)
        return new

    @serialized
    async def expire_preauth_key(self, key_id: int, at: datetime | None = None) -> PreAuthKey:
        k = self.get_preauth_key(key_id)
        return await self._stamp(k, db.PreAuthKey, "expiration", at, self._put_pak)

    @serialized
    async def revoke_preauth_key(self, key_id: int, at: datetime | None = None) -> PreAuthKey:
        """Soft-revoke (what a v2 DELETE does): the key stays, unusable, until it is reaped.
        Revoking an already revoked key is NotFound, as Headscale answers."""
        k = self.get_preauth_key(key_id)
        if k.revoked is not None:
            raise NotFound("pre-auth key not found")
        return await self._stamp(k, db.PreAuthKey, "revoked", at, self._put_pak)

    @serialized
    async def reap_revoked_preauth_keys(self, before: datetime) -> int:
        """Delete keys revoked before `before` (nodes keep working: their key link is cleared)."""
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

    @serialized
    async def delete_preauth_key(self, key_id: int) -> None:
        self.get_preauth_key(key_id)

        def tx_fn(tx: persist.Tx) -> None:
            tx.clear_auth_key_refs(key_id)
            tx.delete(db.PreAuthKey, key_id)

        await self._commit(tx_fn)
        self._drop_pak(key_id)
        self._clear_node_key_refs(key_id)

    async def find_preauth_key(self, key: str) -> PreAuthKey:
        """The stored key matching `key` (bcrypt-checked), else InvalidAuthKey(unknown)."""
        try:
            parsed = pk.parse_key(key)
        except pk.KeyFormatError:
            raise InvalidAuthKey(pk.ERR_UNKNOWN) from None
        kid = self._pak_id(key, parsed)
        if kid is None and self.changelog is not None:
            # Another instance may have created it a moment ago, before its notification
            # arrived here: read the change log once before calling it unknown.
            async with self._lock:
                await self._catch_up_locked()
            kid = self._pak_id(key, parsed)
        if kid is None:
            raise InvalidAuthKey(pk.ERR_UNKNOWN)
        if parsed.prefix is None:
            return self.preauth_keys[kid]
        d = digest(key)
        if self._verified_paks.get(d) != kid:
            stored = self.preauth_keys[kid]
            if not await self._check_once(d, parsed.secret, stored.hash):
                raise InvalidAuthKey(pk.ERR_UNKNOWN)
            if kid not in self.preauth_keys:  # deleted while we were hashing
                raise InvalidAuthKey(pk.ERR_UNKNOWN)
            self._verified_paks[d] = kid
        return self.preauth_keys[kid]

    async def _check_once(self, d: bytes, secret: str, hashed: bytes | None) -> bool:
        """One bcrypt check per distinct key string at a time: a connect storm of nodes
        presenting the same reusable key ran one check per registration in flight (bcrypt is
        slow on purpose: 4.4 of 5.7 CPU-seconds of a 200-node join) before the first result
        was cached; now they all wait for that one."""
        fut = self._pak_checks.get(d)
        if fut is None:
            fut = asyncio.ensure_future(asyncio.to_thread(pk.check_secret, secret, hashed))
            self._pak_checks[d] = fut
            fut.add_done_callback(lambda _: self._pak_checks.pop(d, None))
        return await asyncio.shield(fut)

    def _pak_id(self, key: str, parsed: pk.ParsedKey) -> int | None:
        if parsed.prefix is None:
            return self._pak_by_legacy.get(key)
        return self._pak_by_prefix.get(parsed.prefix)

    async def validate_preauth_key(self, key: str, machine_key: bytes | None = None,
                                   now: datetime | None = None) -> PreAuthKey:
        """Usable for registration? A single-use key already used by this same machine
        counts as usable (clients resend the key they registered with)."""
        pak = await self.find_preauth_key(key)
        reason = pk.unusable_reason(pak, now or utcnow())
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
        key = ApiKey(id=0, prefix=prefix, hash=hashed, created_at=utcnow(),
                     expiration=expiration, user_id=user_id)
        return await self._insert_key(key, db.ApiKey, persist.apikey_values(key),
                                      self._put_apikey), full

    @serialized
    async def expire_api_key(self, key_id: int, at: datetime | None = None) -> ApiKey:
        a = self.get_api_key(key_id)
        return await self._stamp(a, db.ApiKey, "expiration", at, self._put_apikey)

    @serialized
    async def delete_api_key(self, key_id: int) -> None:
        self.get_api_key(key_id)
        await self._commit(lambda tx: tx.delete(db.ApiKey, key_id))
        self._drop_apikey(key_id)

    async def validate_api_key(self, key: str, now: datetime | None = None) -> ApiKey:
        """The API key for a Bearer token; records last_seen (persisted at most once a minute)."""
        try:
            parsed = ak.parse_api_key(key)
        except ak.KeyFormatError:
            raise InvalidAPIKey("failed to parse ApiKey") from None
        kid = self._apikey_by_prefix.get(parsed.prefix)
        if kid is None:
            raise InvalidAPIKey("API key not found")
        d = digest(key)
        if self._verified_apikeys.get(d) != kid:
            if not await asyncio.to_thread(ak.check_secret, parsed.secret,
                                           self.api_keys[kid].hash):
                raise InvalidAPIKey("invalid API key")
            if kid not in self.api_keys:
                raise InvalidAPIKey("API key not found")
            self._verified_apikeys[d] = kid
        now = now or utcnow()
        a = self.api_keys[kid]
        if a.is_expired(now):
            raise InvalidAPIKey("API key expired")
        a = replace(a, last_seen=now)
        self._put_apikey(a)
        loop_now = asyncio.get_running_loop().time()
        if loop_now - self._apikey_persisted.get(kid, -1e18) >= API_KEY_LAST_SEEN_PERSIST:
            self._apikey_persisted[kid] = loop_now
            try:
                await self._persist_api_key_seen(kid, now)
            except PersistError:
                pass  # last_seen is informational; never refuse a request over it
        return a

    @serialized
    async def _persist_api_key_seen(self, key_id: int, at: datetime) -> None:
        if key_id in self.api_keys:
            await self._commit(lambda tx: tx.update(db.ApiKey, key_id, {"last_seen": at}))
