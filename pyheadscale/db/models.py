"""SQLModel tables laid out exactly like Headscale 0.29's database.

Table names, column names and SQLite column types follow Headscale's `hscontrol/db/schema.sql`
(v0.29.2), so a Headscale SQLite file can be opened and vice versa. On PostgreSQL the types
follow what GORM creates there (bigserial ids, boolean, bytea, timestamptz, text).
pyheadscale adds one nullable column, users.idp_groups, which Headscale's GORM ignores.
From Headscale 0.30 (its development line) it takes pre_auth_keys.description/revoked,
api_keys.user_id and the two OAuth tables (oauth_clients, oauth_access_tokens) of the v2 API.

Storage conventions copied from Headscale:
- JSON-valued fields (endpoints, host_info, tags, approved_routes) are TEXT holding JSON.
- Booleans are NUMERIC 0/1 on SQLite, boolean on PostgreSQL.
- Timestamps are UTC. SQLite holds them as text "YYYY-MM-DD HH:MM:SS.ffffff+00:00" (the
  format Go's SQLite driver writes); reads accept Go's nanosecond variants too.
- Keys are their Tailscale text form ("mkey:<hex>", "nodekey:<hex>", "discokey:<hex>").

JSON columns are not mutation-tracked: assign a new list/dict instead of mutating in place.
"""

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Optional

import orjson
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.types import TypeDecorator, TypeEngine, UserDefinedType
from sqlmodel import Field, Relationship, SQLModel

__all__ = [
    "ApiKey",
    "DatabaseVersion",
    "OAuthAccessToken",
    "OAuthClient",
    "JSONText",
    "Node",
    "NumericBool",
    "Policy",
    "PreAuthKey",
    "User",
    "UTCDateTime",
    "gormigrate_migrations",
    "metadata",
    "utcnow",
]

metadata = SQLModel.metadata


def utcnow() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------------------------------------
# Column types


class _SQLiteDeclared(UserDefinedType[Any]):
    """A type that only renders a declared SQLite column type; values pass through untouched."""

    cache_ok = True

    def __init__(self, spec: str) -> None:
        self.spec = spec

    def get_col_spec(self, **kw: Any) -> str:
        return self.spec


# Go writes "2006-01-02 15:04:05.999999999-07:00"; time.String() adds a space and a zone name
# and sometimes a monotonic-clock suffix ("m=+0.1"), which the trailing ".*" tolerates.
_DT_RE = re.compile(
    r"^\s*(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?)?"
    r"\s*(Z|[+-]\d{2}:?\d{2})?"
)


def parse_sqlite_datetime(value: str) -> datetime:
    """Parse a SQLite timestamp as written by Go or by us; naive values are taken as UTC."""
    m = _DT_RE.match(value)
    if m is None:
        raise ValueError(f"unparseable timestamp {value!r}")
    year, month, day, hour, minute, second, frac, tz = m.groups()
    micro = int((frac or "0")[:6].ljust(6, "0"))
    tzinfo: timezone = UTC
    if tz and tz != "Z":
        sign = -1 if tz[0] == "-" else 1
        digits = tz[1:].replace(":", "")
        tzinfo = timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
    dt = datetime(
        int(year),
        int(month),
        int(day),
        int(hour or 0),
        int(minute or 0),
        int(second or 0),
        micro,
        tzinfo=tzinfo,
    )
    return dt.astimezone(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps: DATETIME text on SQLite, timestamptz on PostgreSQL.

    Naive datetimes are rejected on write: they are the usual source of local-time bugs.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return _SQLiteDeclared("DATETIME")
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected datetime, got {type(value).__name__}")
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime; use an aware UTC datetime (utcnow())")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return f"{value:%Y-%m-%d %H:%M:%S}.{value.microsecond:06d}+00:00"
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, datetime):
            if value.tzinfo is None:
                return value.replace(tzinfo=UTC)
            return value.astimezone(UTC)
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, str):
            if not value.strip():
                return None
            return parse_sqlite_datetime(value)
        raise TypeError(f"unexpected timestamp value {value!r}")


class NumericBool(TypeDecorator[bool]):
    """Booleans as Headscale stores them: NUMERIC 0/1 on SQLite, boolean on PostgreSQL."""

    impl = Boolean
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return _SQLiteDeclared("NUMERIC")
        return dialect.type_descriptor(Boolean(create_constraint=False))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return 1 if value else 0
        return bool(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> bool | None:
        if value is None:
            return None
        if isinstance(value, (bytes, str)):
            s = value.decode() if isinstance(value, bytes) else value
            return s.strip().lower() in ("1", "t", "true")
        return bool(value)


class JSONText(TypeDecorator[Any]):
    """A JSON value kept in a TEXT column (GORM's `serializer:json`).

    SQL NULL, empty text and the JSON literal null all read back as None.
    """

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        if value is None:
            return None
        return orjson.dumps(value).decode()

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if isinstance(value, bytes):
            value = value.decode()
        if not value.strip():
            return None
        return orjson.loads(value)


# ids: bigserial/bigint on PostgreSQL (GORM's uint), plain INTEGER on SQLite (rowid alias).
_ID = BigInteger().with_variant(Integer(), "sqlite")


def _id_column() -> Any:
    return Column("id", _ID, primary_key=True, autoincrement=True)


def _id_ref(name: str, *foreign_key: ForeignKey) -> Any:
    """A nullable id (GORM's *uint) naming a row, with the table's foreign key if it has one."""
    return Field(default=None, sa_column=Column(name, _ID, *foreign_key, nullable=True))


def _ts(name: str, **kw: Any) -> Any:
    return Column(name, UTCDateTime(), nullable=True, **kw)


def _text(name: str) -> Any:
    return Column(name, Text(), nullable=True)


def _table_args(*indexes: Index) -> tuple[Any, ...]:
    """A table's indexes, and AUTOINCREMENT ids on SQLite: a deleted row's id is never
    reused, as in GORM's tables."""
    return (*indexes, {"sqlite_autoincrement": True})


def _partial_unique(name: str, *columns: str, where: str) -> Index:
    """A unique index over the rows matching `where`, on SQLite and PostgreSQL alike."""
    return Index(name, *columns, unique=True, sqlite_where=text(where),
                 postgresql_where=text(where))


# The GORM model's bookkeeping times, as Headscale's tables carry them.
def _created_at() -> Any:
    return Field(default_factory=utcnow, sa_column=_ts("created_at"))


def _updated_at() -> Any:
    return Field(default_factory=utcnow, sa_column=_ts("updated_at", onupdate=utcnow))


def _time(name: str) -> Any:
    """A nullable time, unset by default (expiries, soft deletes, last-seen marks)."""
    return Field(default=None, sa_column=_ts(name))


# ---------------------------------------------------------------------------------------------
# Tables


# gormigrate's bookkeeping table; kept so a Headscale SQLite file's schema is a subset of ours.
gormigrate_migrations = Table(
    "migrations",
    metadata,
    Column("id", Text().with_variant(String(255), "postgresql"), primary_key=True),
)


class User(SQLModel, table=True):
    __tablename__ = "users"
    __table_args__ = _table_args(
        Index("idx_users_deleted_at", "deleted_at"),
        # Three indexes together: external identities unique; local names unique among locals.
        _partial_unique("idx_provider_identifier", "provider_identifier",
                        where="provider_identifier IS NOT NULL"),
        Index("idx_name_provider_identifier", "name", "provider_identifier", unique=True),
        _partial_unique("idx_name_no_provider_identifier", "name",
                        where="provider_identifier IS NULL"),
    )

    id: int | None = Field(default=None, sa_column=_id_column())
    name: str = Field(default="", sa_column=_text("name"))
    display_name: str = Field(default="", sa_column=_text("display_name"))
    email: str = Field(default="", sa_column=_text("email"))
    provider_identifier: str | None = Field(default=None, sa_column=_text("provider_identifier"))
    provider: str = Field(default="", sa_column=_text("provider"))
    profile_pic_url: str = Field(default="", sa_column=_text("profile_pic_url"))
    created_at: datetime | None = _created_at()
    updated_at: datetime | None = _updated_at()
    deleted_at: datetime | None = _time("deleted_at")
    # pyheadscale-only (alembic 0002, not in Headscale's schema): the groups claim of the
    # user's last OIDC login, a JSON list; NULL on rows Headscale wrote.
    idp_groups: list[str] | None = Field(default=None, sa_column=Column("idp_groups", JSONText()))


class PreAuthKey(SQLModel, table=True):
    __tablename__ = "pre_auth_keys"
    __table_args__ = _table_args(
        _partial_unique("idx_pre_auth_keys_prefix", "prefix",
                        where="prefix IS NOT NULL AND prefix != ''"),
    )

    id: int | None = Field(default=None, sa_column=_id_column())
    # Legacy plaintext key (pre-bcrypt rows); new keys use prefix + bcrypt hash.
    key: str = Field(default="", sa_column=_text("key"))
    prefix: str = Field(default="", sa_column=_text("prefix"))
    hash: bytes | None = Field(default=None, sa_column=Column("hash", LargeBinary()))
    user_id: int | None = _id_ref(
        "user_id", ForeignKey("users.id", name="fk_pre_auth_keys_user", ondelete="SET NULL"))
    reusable: bool = Field(default=False, sa_column=Column("reusable", NumericBool()))
    ephemeral: bool = Field(
        default=False,
        sa_column=Column("ephemeral", NumericBool(), server_default=text("false")),
    )
    used: bool = Field(
        default=False, sa_column=Column("used", NumericBool(), server_default=text("false"))
    )
    tags: list[str] | None = Field(default=None, sa_column=Column("tags", JSONText()))
    expiration: datetime | None = _time("expiration")
    created_at: datetime | None = _created_at()
    # Headscale 0.30: a free-text label (v2 API) and the soft-revoke time of a v2 DELETE.
    description: str | None = Field(default=None, sa_column=_text("description"))
    revoked: datetime | None = _time("revoked")

    user: Optional["User"] = Relationship()


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"
    __table_args__ = _table_args(Index("idx_api_keys_prefix", "prefix", unique=True))

    id: int | None = Field(default=None, sa_column=_id_column())
    prefix: str = Field(default="", sa_column=_text("prefix"))
    hash: bytes | None = Field(default=None, sa_column=Column("hash", LargeBinary()))
    expiration: datetime | None = _time("expiration")
    last_seen: datetime | None = _time("last_seen")
    created_at: datetime | None = _created_at()
    # Headscale 0.30: the user an API key acts for (no foreign key, as Headscale's DDL).
    user_id: int | None = _id_ref("user_id")


class OAuthClient(SQLModel, table=True):
    """An OAuth 2.0 client-credentials client of the v2 API (Headscale 0.30 oauth_clients).

    client_id is public and embedded in the secret; only an Argon2id hash of the secret is
    stored. scopes/tags are JSON lists in TEXT.
    """

    __tablename__ = "oauth_clients"
    __table_args__ = _table_args(Index("idx_oauth_clients_client_id", "client_id", unique=True))

    id: int | None = Field(default=None, sa_column=_id_column())
    client_id: str = Field(default="", sa_column=_text("client_id"))
    secret_hash: bytes | None = Field(default=None, sa_column=Column("secret_hash", LargeBinary()))
    scopes: list[str] | None = Field(default=None, sa_column=Column("scopes", JSONText()))
    tags: list[str] | None = Field(default=None, sa_column=Column("tags", JSONText()))
    description: str = Field(default="", sa_column=_text("description"))
    user_id: int | None = _id_ref("user_id")
    created_at: datetime | None = _created_at()
    revoked: datetime | None = _time("revoked")


class OAuthAccessToken(SQLModel, table=True):
    """A short-lived bearer token minted by an OAuth client (oauth_access_tokens)."""

    __tablename__ = "oauth_access_tokens"
    __table_args__ = _table_args(Index("idx_oauth_access_tokens_prefix", "prefix", unique=True))

    id: int | None = Field(default=None, sa_column=_id_column())
    prefix: str = Field(default="", sa_column=_text("prefix"))
    hash: bytes | None = Field(default=None, sa_column=Column("hash", LargeBinary()))
    client_id: str = Field(default="", sa_column=_text("client_id"))
    scopes: list[str] | None = Field(default=None, sa_column=Column("scopes", JSONText()))
    tags: list[str] | None = Field(default=None, sa_column=Column("tags", JSONText()))
    expiration: datetime | None = _time("expiration")
    created_at: datetime | None = _created_at()


class Node(SQLModel, table=True):
    __tablename__ = "nodes"
    __table_args__ = _table_args()

    id: int | None = Field(default=None, sa_column=_id_column())
    machine_key: str = Field(default="", sa_column=_text("machine_key"))
    node_key: str = Field(default="", sa_column=_text("node_key"))
    disco_key: str = Field(default="", sa_column=_text("disco_key"))
    # JSON list of "ip:port" strings.
    endpoints: list[str] | None = Field(default=None, sa_column=Column("endpoints", JSONText()))
    # JSON tailcfg.Hostinfo (Go field names, e.g. "Hostname", "RoutableIPs").
    host_info: dict[str, Any] | None = Field(
        default=None, sa_column=Column("host_info", JSONText())
    )
    ipv4: str | None = Field(default=None, sa_column=_text("ipv4"))
    ipv6: str | None = Field(default=None, sa_column=_text("ipv6"))
    hostname: str = Field(default="", sa_column=_text("hostname"))
    given_name: str = Field(default="", sa_column=Column("given_name", String(63)))
    # NULL for tagged nodes, which are owned by their tags.
    user_id: int | None = _id_ref(
        "user_id", ForeignKey("users.id", name="fk_nodes_user", ondelete="CASCADE"))
    register_method: str = Field(default="", sa_column=_text("register_method"))
    tags: list[str] | None = Field(default=None, sa_column=Column("tags", JSONText()))
    auth_key_id: int | None = _id_ref(
        "auth_key_id", ForeignKey("pre_auth_keys.id", name="fk_nodes_auth_key"))
    last_seen: datetime | None = _time("last_seen")
    # NULL means the node key never expires.
    expiry: datetime | None = _time("expiry")
    # JSON list of approved prefixes ("10.0.0.0/24").
    approved_routes: list[str] | None = Field(
        default=None, sa_column=Column("approved_routes", JSONText())
    )
    created_at: datetime | None = _created_at()
    updated_at: datetime | None = _updated_at()
    deleted_at: datetime | None = _time("deleted_at")

    user: Optional["User"] = Relationship()
    auth_key: Optional["PreAuthKey"] = Relationship()


class Policy(SQLModel, table=True):
    """Append-only: each policy change inserts a row; the highest id is the current policy."""

    __tablename__ = "policies"
    __table_args__ = _table_args(Index("idx_policies_deleted_at", "deleted_at"))

    id: int | None = Field(default=None, sa_column=_id_column())
    # HuJSON text exactly as the admin supplied it.
    data: str = Field(default="", sa_column=_text("data"))
    created_at: datetime | None = _created_at()
    updated_at: datetime | None = _updated_at()
    deleted_at: datetime | None = _time("deleted_at")


class DatabaseVersion(SQLModel, table=True):
    """Single row (id = 1): the Headscale version that last started against this database."""

    __tablename__ = "database_versions"

    id: int | None = Field(
        default=None,
        sa_column=Column("id", _ID, primary_key=True),
    )
    version: str = Field(sa_column=Column("version", Text(), nullable=False))
    updated_at: datetime | None = Field(default_factory=utcnow, sa_column=_ts("updated_at"))
