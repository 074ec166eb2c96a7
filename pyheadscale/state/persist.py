"""The DB side of state/: conversions between state.model and db.models, and the sync
SQL work each Tailnet write runs in one transaction (on the Tailnet's DB thread).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, delete, select, text, update
from sqlmodel import Session

from pyheadscale.db import models as db
from pyheadscale.state.model import ApiKey, Node, PreAuthKey, User
from pyheadscale.tailcfg import KeyKind, KeyParseError, encode_key, parse_key


def _aware(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _now() -> datetime:
    return datetime.now(UTC)


# --- users -----------------------------------------------------------------------------------


def user_from_row(r: db.User) -> User:
    return User(
        id=int(r.id or 0), name=r.name or "", display_name=r.display_name or "",
        email=r.email or "", provider_identifier=r.provider_identifier,
        provider=r.provider or "", profile_pic_url=r.profile_pic_url or "",
        created_at=_aware(r.created_at),
        groups=tuple(g for g in (r.idp_groups or ()) if isinstance(g, str)),
    )


def user_values(u: User) -> dict[str, Any]:
    return {
        "name": u.name, "display_name": u.display_name, "email": u.email,
        "provider_identifier": u.provider_identifier, "provider": u.provider,
        "profile_pic_url": u.profile_pic_url,
        # NULL rather than [] for "no groups", as on rows Headscale wrote.
        "idp_groups": list(u.groups) or None,
    }


# --- pre-auth keys ---------------------------------------------------------------------------


def pak_from_row(r: db.PreAuthKey) -> PreAuthKey:
    legacy = r.key or None
    return PreAuthKey(
        id=int(r.id or 0), prefix=r.prefix or "", hash=r.hash or None,
        legacy_key=legacy if not r.prefix else None, user_id=r.user_id,
        reusable=bool(r.reusable), ephemeral=bool(r.ephemeral), used=bool(r.used),
        tags=tuple(r.tags or ()), created_at=_aware(r.created_at) or _now(),
        expiration=_aware(r.expiration), description=r.description or "",
        revoked=_aware(r.revoked),
    )


def pak_values(k: PreAuthKey) -> dict[str, Any]:
    return {
        "key": k.legacy_key or "", "prefix": k.prefix, "hash": k.hash, "user_id": k.user_id,
        "reusable": k.reusable, "ephemeral": k.ephemeral, "used": k.used,
        "tags": list(k.tags), "expiration": k.expiration, "created_at": k.created_at,
        "description": k.description or None, "revoked": k.revoked,
    }


# --- api keys --------------------------------------------------------------------------------


def apikey_from_row(r: db.ApiKey) -> ApiKey:
    return ApiKey(
        id=int(r.id or 0), prefix=r.prefix or "", hash=r.hash or b"",
        created_at=_aware(r.created_at) or _now(), expiration=_aware(r.expiration),
        last_seen=_aware(r.last_seen), user_id=r.user_id,
    )


def apikey_values(k: ApiKey) -> dict[str, Any]:
    return {"prefix": k.prefix, "hash": k.hash, "expiration": k.expiration,
            "last_seen": k.last_seen, "created_at": k.created_at, "user_id": k.user_id}


# --- nodes -----------------------------------------------------------------------------------


def _key_or_none(kind: KeyKind, s: str | None) -> bytes | None:
    if not s:
        return None
    try:
        raw = parse_key(kind, s)
    except KeyParseError:
        return None
    return None if raw == bytes(32) else raw


def _ip(s: str | None, version: int) -> Any:
    if not s:
        return None
    try:
        a = ipaddress.ip_address(s)
    except ValueError:
        return None
    return a if a.version == version else None


def _routes(items: Iterable[str] | None) -> tuple[Any, ...]:
    out = []
    for r in items or ():
        try:
            out.append(ipaddress.ip_network(r, strict=False))
        except (ValueError, TypeError):
            continue
    return tuple(out)


def node_from_row(r: db.Node, ephemeral_keys: set[int]) -> Node:
    mk = _key_or_none(KeyKind.MACHINE, r.machine_key) or bytes(32)
    nk = _key_or_none(KeyKind.NODE, r.node_key) or bytes(32)
    created = _aware(r.created_at) or _now()
    return Node(
        id=int(r.id or 0), machine_key=mk, node_key=nk,
        disco_key=_key_or_none(KeyKind.DISCO, r.disco_key),
        hostname=r.hostname or "", given_name=r.given_name or "",
        user_id=r.user_id, ipv4=_ip(r.ipv4, 4), ipv6=_ip(r.ipv6, 6),
        register_method=r.register_method or "", created_at=created,
        updated_at=_aware(r.updated_at) or created, tags=tuple(r.tags or ()),
        auth_key_id=r.auth_key_id, expiry=_aware(r.expiry), last_seen=_aware(r.last_seen),
        endpoints=tuple(str(e) for e in (r.endpoints or ())),
        hostinfo=dict(r.host_info or {}), approved_routes=_routes(r.approved_routes),
        # Headscale derives ephemerality from the key the node registered with.
        ephemeral=r.auth_key_id is not None and r.auth_key_id in ephemeral_keys,
    )


def node_values(n: Node) -> dict[str, Any]:
    return {
        "machine_key": encode_key(KeyKind.MACHINE, n.machine_key),
        "node_key": encode_key(KeyKind.NODE, n.node_key),
        "disco_key": encode_key(KeyKind.DISCO, n.disco_key),
        "endpoints": list(n.endpoints),
        "host_info": n.hostinfo,
        "ipv4": str(n.ipv4) if n.ipv4 is not None else None,
        "ipv6": str(n.ipv6) if n.ipv6 is not None else None,
        "hostname": n.hostname,
        "given_name": n.given_name,
        "user_id": n.user_id,
        "register_method": n.register_method,
        "tags": list(n.tags),
        "auth_key_id": n.auth_key_id,
        "last_seen": n.last_seen,
        "expiry": n.expiry,
        "approved_routes": [str(r) for r in n.approved_routes],
        "created_at": n.created_at,
        "updated_at": n.updated_at,
    }


# --- loading ---------------------------------------------------------------------------------


@dataclass
class Loaded:
    users: list[User]
    nodes: list[Node]
    preauth_keys: list[PreAuthKey]
    api_keys: list[ApiKey]


def load_all(engine: Engine) -> Loaded:
    with Session(engine) as s:
        users = [user_from_row(r) for r in s.execute(
            select(db.User).where(db.User.deleted_at.is_(None))).scalars()]  # type: ignore[union-attr]
        paks = [pak_from_row(r) for r in s.execute(select(db.PreAuthKey)).scalars()]
        ephemeral = {k.id for k in paks if k.ephemeral}
        nodes = [node_from_row(r, ephemeral) for r in s.execute(
            select(db.Node).where(db.Node.deleted_at.is_(None))).scalars()]  # type: ignore[union-attr]
        apikeys = [apikey_from_row(r) for r in s.execute(select(db.ApiKey)).scalars()]
    return Loaded(users, nodes, paks, apikeys)


# --- writes ----------------------------------------------------------------------------------
# A "Tx" collects statements; Tailnet runs it in one transaction on the DB thread.


class Tx:
    def __init__(self, session: Session) -> None:
        self.s = session

    def insert(self, table: type[Any], values: dict[str, Any]) -> int:
        row = table(**values)
        self.s.add(row)
        self.s.flush()
        return int(row.id)

    def update(self, table: type[Any], row_id: int, values: dict[str, Any]) -> None:
        res = self.s.execute(update(table).where(table.id == row_id).values(**values))
        if res.rowcount != 1:  # type: ignore[attr-defined]
            raise LookupError(f"{table.__tablename__} row {row_id} not found")

    def delete(self, table: type[Any], row_id: int) -> None:
        self.s.execute(delete(table).where(table.id == row_id))

    def clear_auth_key_refs(self, key_id: int) -> None:
        self.s.execute(update(db.Node).where(db.Node.auth_key_id == key_id)  # type: ignore[arg-type]
                       .values(auth_key_id=None))


def run_tx(engine: Engine, fn: Any) -> Any:
    with Session(engine) as s, s.begin():
        return fn(Tx(s))


def ping(engine: Engine) -> None:
    with engine.connect() as c:
        c.execute(text("SELECT 1"))
