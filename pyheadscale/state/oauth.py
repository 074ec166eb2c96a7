"""OAuth clients and access tokens of the v2 API, in memory and in the database.

Like API keys, both are held in memory (loaded at start) and written through the Tailnet's one
DB thread, so the event loop never blocks on SQL and writes stay ordered. A presented secret is
checked with Argon2id once; later requests with the same credential are matched by its SHA-256
digest, while expiry and revocation are checked on every request.

Deleting a client deletes the tokens it minted (Tailscale removes OAuth clients outright; only
auth keys are soft-revoked). Expired tokens are reaped by `reap()`, which the server runs hourly.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from sqlalchemy import Engine, delete, select
from sqlmodel import Session

from pyheadscale.auth import oauth as oa
from pyheadscale.auth import preauthkeys as pk
from pyheadscale.db import models as db
from pyheadscale.state import persist
from pyheadscale.state.errors import InvalidArgument, NotFound, StateError

log = logging.getLogger("pyheadscale.oauth")
T = TypeVar("T")
V = TypeVar("V")

MAX_DESCRIPTION = 50  # Tailscale's limit on a key's description
# Argon2id costs 19 MiB per check and the token endpoint is unauthenticated: bound how many
# run at once so a flood of attempts cannot exhaust memory.
HASH_CONCURRENCY = 2


class InvalidCredential(StateError):
    """A client secret or access token that is malformed, unknown, expired or revoked."""


class Writer(Protocol):
    """What the store needs from the Tailnet: one transaction on its DB thread."""

    async def run_in_tx(self, fn: Callable[[persist.Tx], T]) -> T: ...


@dataclass(frozen=True)
class OAuthClient:
    id: int
    client_id: str
    secret_hash: bytes
    scopes: tuple[str, ...]
    tags: tuple[str, ...]
    description: str
    user_id: int | None
    created_at: datetime
    revoked: datetime | None = None


@dataclass(frozen=True)
class AccessToken:
    id: int
    prefix: str
    hash: bytes
    client_id: str
    scopes: tuple[str, ...]
    tags: tuple[str, ...]
    expiration: datetime | None
    created_at: datetime

    def expired(self, now: datetime) -> bool:
        return self.expiration is not None and self.expiration <= now


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _strs(v: Any) -> tuple[str, ...]:
    return tuple(x for x in (v or ()) if isinstance(x, str))


def _client_from_row(r: db.OAuthClient) -> OAuthClient:
    return OAuthClient(
        id=int(r.id or 0), client_id=r.client_id or "", secret_hash=r.secret_hash or b"",
        scopes=_strs(r.scopes), tags=_strs(r.tags), description=r.description or "",
        user_id=r.user_id, created_at=_aware(r.created_at) or _now(),
        revoked=_aware(r.revoked))


def _token_from_row(r: db.OAuthAccessToken) -> AccessToken:
    return AccessToken(
        id=int(r.id or 0), prefix=r.prefix or "", hash=r.hash or b"",
        client_id=r.client_id or "", scopes=_strs(r.scopes), tags=_strs(r.tags),
        expiration=_aware(r.expiration), created_at=_aware(r.created_at) or _now())


def _load(engine: Engine | None) -> tuple[list[OAuthClient], list[AccessToken]]:
    if engine is None:
        return [], []
    with Session(engine) as s:
        clients = [_client_from_row(r) for r in s.execute(select(db.OAuthClient)).scalars()]
        tokens = [_token_from_row(r) for r in s.execute(select(db.OAuthAccessToken)).scalars()]
    return clients, tokens


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """Known scope names, deduplicated and sorted; an unknown one is an error."""
    out = sorted(set(scopes))
    bad = [s for s in out if s not in oa.KNOWN_SCOPES]
    if bad:
        raise InvalidArgument(f"unknown scope {bad[0]!r}")
    return tuple(out)


def check_tags(tags: Iterable[str]) -> tuple[str, ...]:
    try:
        return pk.validate_tags(list(tags))
    except ValueError as e:
        raise InvalidArgument(str(e)) from None


def _check_grant(scopes: Iterable[str], tags: Iterable[str],
                 description: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    scope_t, tag_t = check_scopes(scopes), check_tags(tags)
    if not scope_t:
        raise InvalidArgument("an OAuth client must declare at least one scope")
    if oa.requires_tags(scope_t) and not tag_t:
        raise InvalidArgument("tags are required when scopes include devices:core or auth_keys")
    if len(description) > MAX_DESCRIPTION:
        raise InvalidArgument(f"description must be at most {MAX_DESCRIPTION} characters")
    return scope_t, tag_t


class OAuthStore:
    def __init__(self, writer: Writer) -> None:
        self._writer = writer
        self.clients: dict[str, OAuthClient] = {}  # by client id
        self.tokens: dict[str, AccessToken] = {}  # by prefix
        # sha256(full credential) -> client id / token prefix whose Argon2id check passed
        self._verified_clients: dict[bytes, str] = {}
        self._verified_tokens: dict[bytes, str] = {}
        self._lock = asyncio.Lock()
        self._hashing = asyncio.Semaphore(HASH_CONCURRENCY)
        self.engine: Engine | None = None
        self._reloading: asyncio.Task[None] | None = None

    @classmethod
    async def load(cls, engine: Engine, writer: Writer) -> OAuthStore:
        store = cls(writer)
        store.engine = engine
        await store.reload()
        return store

    async def reload(self) -> None:
        """Everything from the database again (another instance wrote OAuth rows)."""
        clients, tokens = await asyncio.to_thread(_load, self.engine)

        async def op() -> None:
            self.clients = {c.client_id: c for c in clients if c.client_id}
            self.tokens = {t.prefix: t for t in tokens if t.prefix}
            self._verified_clients = {d: i for d, i in self._verified_clients.items()
                                      if i in self.clients}
            self._verified_tokens = {d: p for d, p in self._verified_tokens.items()
                                     if p in self.tokens}

        await self._serialized(op)

    def reload_soon(self) -> None:
        """Reload in the background (a change-log hook cannot wait)."""
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.get_running_loop().create_task(self.reload())

    async def _hash(self, secret: str) -> bytes:
        async with self._hashing:
            return await asyncio.to_thread(oa.hash_secret, secret)

    async def _check(self, secret: str, hashed: bytes) -> bool:
        async with self._hashing:
            return await asyncio.to_thread(oa.check_secret, secret, hashed)

    async def _verified(self, table: dict[str, V], hash_of: Callable[[V], bytes],
                        seen: dict[bytes, str], text: str, key: str, secret: str) -> V | None:
        """`table[key]` if `secret` matches its hash (Argon2id, skipped when this exact
        credential text already passed for `key`) and it still exists after hashing."""
        entry = table.get(key)
        if entry is None:
            return None
        d = _digest(text)
        if seen.get(d) != key:
            if not await self._check(secret, hash_of(entry)):
                return None
            seen[d] = key
        return table.get(key)  # deleted while we were hashing?

    async def _serialized(self, fn: Callable[[], Awaitable[T]]) -> T:
        """One write under the lock in its own task, so a cancelled caller cannot stop it
        between the commit and the memory update."""

        async def run() -> T:
            async with self._lock:
                return await fn()

        return await asyncio.shield(asyncio.ensure_future(run()))

    # --- clients -----------------------------------------------------------------------------

    def list_clients(self) -> list[OAuthClient]:
        return sorted(self.clients.values(), key=lambda c: c.id)

    def get_client(self, client_id: str) -> OAuthClient:
        c = self.clients.get(client_id)
        if c is None:
            raise NotFound("oauth client not found")
        return c

    async def create_client(self, scopes: Iterable[str], tags: Iterable[str],
                            description: str = "", user_id: int | None = None,
                            ) -> tuple[OAuthClient, str]:
        """Returns the client and its secret (shown once, never stored)."""
        scope_t, tag_t = _check_grant(scopes, tags, description)
        full, client_id, secret = oa.new_client_secret()
        hashed = await self._hash(secret)

        async def op() -> OAuthClient:
            c = OAuthClient(id=0, client_id=client_id, secret_hash=hashed, scopes=scope_t,
                            tags=tag_t, description=description, user_id=user_id,
                            created_at=_now())
            vals = {"client_id": c.client_id, "secret_hash": c.secret_hash,
                    "scopes": list(c.scopes), "tags": list(c.tags),
                    "description": c.description, "user_id": c.user_id,
                    "created_at": c.created_at}
            cid = await self._writer.run_in_tx(lambda tx: tx.insert(db.OAuthClient, vals))
            c = replace(c, id=cid)
            self.clients[c.client_id] = c
            return c

        return await self._serialized(op), full

    async def update_client(self, client_id: str, scopes: Iterable[str], tags: Iterable[str],
                            description: str) -> OAuthClient:
        """Replace a client's scopes, tags and description. Tokens it already minted keep
        what they were granted until they expire, as Tailscale's."""
        scope_t, tag_t = _check_grant(scopes, tags, description)

        async def op() -> OAuthClient:
            c = replace(self.get_client(client_id), scopes=scope_t, tags=tag_t,
                        description=description)
            await self._writer.run_in_tx(lambda tx: tx.update(db.OAuthClient, c.id, {
                "scopes": list(scope_t), "tags": list(tag_t), "description": description}))
            self.clients[client_id] = c
            return c

        return await self._serialized(op)

    async def delete_client(self, client_id: str) -> None:
        """Remove a client and every token it minted."""

        async def op() -> None:
            self.get_client(client_id)

            def tx_fn(tx: persist.Tx) -> None:
                tx.s.execute(delete(db.OAuthAccessToken)
                             .where(db.OAuthAccessToken.client_id == client_id))  # type: ignore[arg-type]
                tx.s.execute(delete(db.OAuthClient)
                             .where(db.OAuthClient.client_id == client_id))  # type: ignore[arg-type]
                tx.touch("oauth_clients")
                tx.touch("oauth_access_tokens")

            await self._writer.run_in_tx(tx_fn)
            self.clients.pop(client_id, None)
            gone = {p for p, t in self.tokens.items() if t.client_id == client_id}
            for p in gone:
                del self.tokens[p]
            self._verified_clients = {d: i for d, i in self._verified_clients.items()
                                      if i != client_id}
            self._verified_tokens = {d: p for d, p in self._verified_tokens.items()
                                     if p not in gone}

        await self._serialized(op)

    async def authenticate_client(self, secret_text: str) -> OAuthClient:
        """The live client a presented secret belongs to."""
        try:
            client_id, secret = oa.parse_client_secret(secret_text)
        except oa.KeyFormatError:
            raise InvalidCredential("invalid client credentials") from None
        c = await self._verified(self.clients, lambda c: c.secret_hash, self._verified_clients,
                                 secret_text.partition("?")[0], client_id, secret)
        if c is None or c.revoked is not None:
            raise InvalidCredential("invalid client credentials")
        return c

    # --- access tokens -----------------------------------------------------------------------

    async def mint_token(self, client_id: str, scopes: Iterable[str], tags: Iterable[str],
                         ttl: timedelta = timedelta(seconds=oa.TOKEN_TTL_S),
                         ) -> tuple[AccessToken, str]:
        """Store a token for a live client with already-narrowed scopes and tags."""
        full, prefix, secret = oa.new_access_token()
        hashed = await self._hash(secret)

        async def op() -> AccessToken:
            c = self.clients.get(client_id)
            if c is None or c.revoked is not None:
                raise InvalidCredential("invalid client credentials")
            now = _now()
            t = AccessToken(id=0, prefix=prefix, hash=hashed, client_id=client_id,
                            scopes=tuple(scopes), tags=tuple(tags), expiration=now + ttl,
                            created_at=now)
            vals = {"prefix": t.prefix, "hash": t.hash, "client_id": t.client_id,
                    "scopes": list(t.scopes), "tags": list(t.tags),
                    "expiration": t.expiration, "created_at": t.created_at}
            tid = await self._writer.run_in_tx(lambda tx: tx.insert(db.OAuthAccessToken, vals))
            t = replace(t, id=tid)
            self.tokens[prefix] = t
            return t

        return await self._serialized(op), full

    async def authenticate_token(self, text: str, now: datetime | None = None) -> AccessToken:
        try:
            prefix, secret = oa.parse_access_token(text)
        except oa.KeyFormatError:
            raise InvalidCredential("invalid access token") from None
        t = await self._verified(self.tokens, lambda t: t.hash, self._verified_tokens, text,
                                 prefix, secret)
        if t is None or t.expired(now or _now()):
            raise InvalidCredential("invalid access token")
        c = self.clients.get(t.client_id)
        if c is None or c.revoked is not None:  # a token dies with its client
            raise InvalidCredential("invalid access token")
        return t

    async def reap(self, now: datetime | None = None) -> int:
        """Delete expired tokens; returns how many."""
        cutoff = now or _now()

        async def op() -> int:
            dead = [t for t in self.tokens.values() if t.expired(cutoff)]
            if not dead:
                return 0
            ids = [t.id for t in dead]
            def tx_fn(tx: persist.Tx) -> None:
                tx.s.execute(delete(db.OAuthAccessToken).where(
                    db.OAuthAccessToken.id.in_(ids)))  # type: ignore[union-attr]
                tx.touch("oauth_access_tokens")

            await self._writer.run_in_tx(tx_fn)
            gone = {t.prefix for t in dead}
            for p in gone:
                self.tokens.pop(p, None)
            self._verified_tokens = {d: p for d, p in self._verified_tokens.items()
                                     if p not in gone}
            return len(dead)

        return await self._serialized(op)
