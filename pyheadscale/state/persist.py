"""The DB side of state/: conversions between state.model and db.models, and the sync
SQL work each Tailnet write runs in one transaction (on the Tailnet's DB thread).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, delete, select, text, update
from sqlmodel import Session, col

from pyheadscale.db import models as db
from pyheadscale.db.cluster import ClusterPresence
from pyheadscale.gojson import DecodeError, addrport_text
from pyheadscale.hostinfo import Hostinfo, decode_hostinfo
from pyheadscale.state.changelog import ChangeLog, Touched, last_id
from pyheadscale.state.model import ApiKey, Node, PreAuthKey, User
from pyheadscale.tailcfg import MAX_ENDPOINTS, KeyKind, KeyParseError, encode_key, parse_key

log = logging.getLogger("pyheadscale.state")


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


def stored_hostinfo(node_id: int | None, raw: Any) -> Hostinfo:
    """A Hostinfo column as peers may see it: rows written before client data was typed (or
    by another server) may hold values official clients cannot decode; those fields go."""
    try:
        hi = decode_hostinfo(raw, lenient=True)
    except DecodeError:
        hi = {}
    if raw and hi != raw:
        log.warning("node %s: stored Hostinfo had fields clients cannot decode; dropped them",
                    node_id)
    return hi


def stored_endpoints(raw: Any) -> tuple[str, ...]:
    out: list[str] = []
    for e in raw if isinstance(raw, list) else ():
        try:
            out.append(addrport_text(e) if isinstance(e, str) else "")
        except ValueError:
            continue
    return tuple(e for e in out if e)[:MAX_ENDPOINTS]


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
        endpoints=stored_endpoints(r.endpoints),
        hostinfo=stored_hostinfo(r.id, r.host_info), approved_routes=_routes(r.approved_routes),
        # Headscale derives ephemerality from the key the node registered with.
        ephemeral=r.auth_key_id is not None and r.auth_key_id in ephemeral_keys,
    )


# The `nodes` columns a node's own map requests and sessions change, and the Node attribute
# each one stores (written behind: online.py).
NODE_ATTR = {"endpoints": "endpoints", "disco_key": "disco_key", "host_info": "hostinfo",
             "hostname": "hostname", "given_name": "given_name", "last_seen": "last_seen"}


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
    # Cluster mode: node id -> (instance holding its session, capability version), and the
    # id of the last change the rows reflect.
    presence: dict[int, tuple[str, int]] = field(default_factory=dict)
    log_id: int = 0


def _only(stmt: Any, column: Any, keys: set[Any] | None) -> Any:
    return stmt if keys is None else stmt.where(column.in_(sorted(keys)))


def load_rows(s: Session, want: Touched | None = None, *, presence: bool = False) -> Loaded:
    """Rows of users, keys and nodes: all of them (`want` None) or those `want` names (a node
    whose presence changed is reloaded too); with `presence`, who holds which session."""
    def keys(table: str) -> set[Any] | None:
        return None if want is None else want.ids(table)

    user_ids, pak_ids, apikey_ids = keys("users"), keys("pre_auth_keys"), keys("api_keys")
    node_ids = keys("nodes")
    pres_ids = keys("cluster_presence")
    if node_ids is not None:
        node_ids = None if pres_ids is None else node_ids | {int(i) for i in pres_ids}
    live_users = select(db.User).where(db.User.deleted_at.is_(None))  # type: ignore[union-attr]
    users = ([] if user_ids == set() else [user_from_row(r) for r in s.execute(
        _only(live_users, db.User.id, user_ids)).scalars()])
    paks = ([] if pak_ids == set() else [pak_from_row(r) for r in s.execute(
        _only(select(db.PreAuthKey), db.PreAuthKey.id, pak_ids)).scalars()])
    apikeys = ([] if apikey_ids == set() else [apikey_from_row(r) for r in s.execute(
        _only(select(db.ApiKey), db.ApiKey.id, apikey_ids)).scalars()])
    nodes: list[Node] = []
    pres: dict[int, tuple[str, int]] = {}
    if node_ids != set():
        live_nodes = select(db.Node).where(db.Node.deleted_at.is_(None))  # type: ignore[union-attr]
        rows = list(s.execute(_only(live_nodes, db.Node.id, node_ids)).scalars())
        if want is None:
            ephemeral = {k.id for k in paks if k.ephemeral}
        else:
            # Headscale derives ephemerality from the key the node registered with.
            key_ids = sorted({r.auth_key_id for r in rows if r.auth_key_id is not None})
            pid = col(db.PreAuthKey.id)
            ephemeral = {int(i) for i in s.execute(select(pid).where(
                pid.in_(key_ids), col(db.PreAuthKey.ephemeral) == True)  # noqa: E712
            ).scalars() if i is not None} if key_ids else set()
        nodes = [node_from_row(r, ephemeral) for r in rows]
        if presence:
            q = _only(select(ClusterPresence), ClusterPresence.node_id, node_ids)
            pres = {int(p.node_id): (p.instance_id, int(p.capver or 0))
                    for p in s.execute(q).scalars()}
    return Loaded(users, nodes, paks, apikeys, pres)


def load_all(engine: Engine, *, cluster: bool = False) -> Loaded:
    """Everything, at start. In cluster mode in one REPEATABLE READ snapshot with the id of
    the last change it reflects, so catching up from there misses nothing."""
    with Session(engine) as s:
        if cluster:
            s.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            log_id = last_id(s)
            loaded = load_rows(s, presence=True)
            loaded.log_id = log_id
            return loaded
        return load_rows(s)


# --- writes ----------------------------------------------------------------------------------
# A "Tx" collects statements; Tailnet runs it in one transaction on the DB thread.


class Tx:
    """One transaction's statements; it records which rows they touch (the change log tells
    other instances to reload them)."""

    def __init__(self, session: Session, changelog: ChangeLog | None = None) -> None:
        self.s = session
        self.touched = Touched()
        self.changelog = changelog  # None: a single instance (nobody else to tell)

    def touch(self, table: str, key: Any = None) -> None:
        """Record a row (or, without key, the whole table) changed by a statement of its own."""
        self.touched.add(table, key)

    def insert(self, table: type[Any], values: dict[str, Any]) -> int:
        row = table(**values)
        self.s.add(row)
        self.s.flush()
        self.touched.add(table.__tablename__, int(row.id))
        return int(row.id)

    def update(self, table: type[Any], row_id: int, values: dict[str, Any]) -> None:
        # On the session's connection (Core): the ORM's bulk-update bookkeeping costs more
        # than the statement, and no ORM objects are kept in these sessions.
        res = self.s.connection().execute(update(table).where(table.id == row_id).values(**values))
        if res.rowcount != 1:
            raise LookupError(f"{table.__tablename__} row {row_id} not found")
        self.touched.add(table.__tablename__, row_id)

    def delete(self, table: type[Any], row_id: int) -> None:
        self.s.execute(delete(table).where(table.id == row_id))
        self.touched.add(table.__tablename__, row_id)

    def clear_auth_key_refs(self, key_id: int) -> None:
        self.s.execute(update(db.Node).where(db.Node.auth_key_id == key_id)  # type: ignore[arg-type]
                       .values(auth_key_id=None))


class Held:
    """A transaction kept open across one write that holds the append lock from its start
    (state/base.py, serialized): statements run in it as the write goes, commit at the end."""

    def __init__(self, session: Session, changelog: ChangeLog) -> None:
        self.session = session
        self.changelog = changelog
        self.entries: list[int] = []

    @classmethod
    def open(cls, engine: Engine, changelog: ChangeLog) -> Held:
        s = Session(engine)
        try:
            s.begin()
            changelog.begin(s, check=False)
        except BaseException:
            s.close()
            raise
        return cls(s, changelog)

    def run(self, fn: Any) -> tuple[Any, int | None]:
        tx = Tx(self.session, self.changelog)
        result = fn(tx)
        entry = self.changelog.append(self.session, tx.touched) if tx.touched else None
        if entry is not None:
            self.entries.append(entry)
        return result, entry

    def commit(self) -> None:
        self.session.commit()
        self.session.close()

    def rollback(self) -> None:
        try:
            self.session.rollback()
        finally:
            self.session.close()


def run_tx(engine: Engine, fn: Any, changelog: ChangeLog | None = None,
           check: bool = False) -> tuple[Any, int | None]:
    """Run `fn(tx)` in one transaction; with a change log, append what it touched (after
    taking the append lock and, with `check`, making sure nothing is left to apply first).
    Returns fn's result and the id of the change appended (None: none)."""
    with Session(engine) as s, s.begin():
        tx = Tx(s, changelog)
        if changelog is not None:
            changelog.begin(s, check=check)
        result = fn(tx)
        entry = changelog.append(s, tx.touched) if changelog is not None and tx.touched else None
        return result, entry


def ping(engine: Engine) -> None:
    with engine.connect() as c:
        c.execute(text("SELECT 1"))
