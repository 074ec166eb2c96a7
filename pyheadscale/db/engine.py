"""Engine construction (SQLite or PostgreSQL) and schema migration.

SQLite connections get the pragmas Headscale sets (busy_timeout 10 s, foreign keys on, WAL with
synchronous=NORMAL, incremental auto-vacuum) and every transaction starts with BEGIN IMMEDIATE
(Headscale's txlock=immediate), so a read-then-write transaction never fails with SQLITE_BUSY
half-way through. The price: any open transaction, even a read, holds the write lock, so keep
transactions short. Read-only work can opt out per connection with
`conn.execution_options(sqlite_begin="DEFERRED")` (the WAL lets such readers run concurrently).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from sqlalchemy import URL, Connection, Engine, create_engine, event, inspect, text

from pyheadscale.config.schema import DatabaseConfig
from pyheadscale.db.tuning import PoolSettings, pool_settings, tune
from pyheadscale.fsperms import private_dir, private_file

__all__ = [
    "HEADSCALE_COMPAT_VERSION",
    "HEAD_REVISION",
    "DatabaseConfigError",
    "MigrationError",
    "SQLITE_BUSY_TIMEOUT_MS",
    "alembic_config",
    "at_head",
    "engine_from_config",
    "make_engine",
    "migrate",
]

# Headscale release whose schema we implement; written to database_versions like Headscale
# writes its own version, so a Headscale of the same minor accepts the database.
HEADSCALE_COMPAT_VERSION = "v0.29.2"
SQLITE_BUSY_TIMEOUT_MS = 10_000
DEFAULT_PG_POOL = 10  # Headscale's max_open_conns default
# First alembic revision; equals Headscale 0.29's schema.
_BASELINE_REVISION = "0001"
# The newest revision under migrations/versions. A database already there needs no alembic,
# so the server never imports it (with mako, ~7 MiB resident for the process's lifetime).
# tests/db/test_migrate_head.py fails when a new migration lands without this moving to it.
HEAD_REVISION = "0004"
MIGRATE_LOCK = 0x7079_6873_2D6D_6967  # pg_advisory_xact_lock key ("pyhs-mig")


class DatabaseConfigError(ValueError):
    """The database settings cannot produce an engine."""


class MigrationError(RuntimeError):
    """The database cannot be brought to our schema."""


def _normalise_type(db_type: str) -> str:
    t = (db_type or "").strip().lower()
    if t in ("sqlite", "sqlite3"):
        return "sqlite"
    if t in ("postgres", "postgresql", "pg"):
        return "postgres"
    raise DatabaseConfigError(f"unsupported database type {db_type!r} (sqlite or postgres)")


def _pg_sslmode(ssl: bool | str | None) -> str | None:
    """Headscale semantics: a boolean-ish value toggles TLS, anything else is an sslmode."""
    if ssl is None:
        return None
    if isinstance(ssl, bool):
        return None if ssl else "disable"
    s = str(ssl).strip()
    low = s.lower()
    if low in ("", "false", "f", "0", "no", "off"):
        return "disable"
    if low in ("true", "t", "1", "yes", "on"):
        return None  # libpq default (prefer)
    return s


def make_engine(
    db_type: str,
    *,
    sqlite_path: str | os.PathLike[str] | None = None,
    sqlite_wal: bool = True,
    pg_host: str = "localhost",
    pg_port: int | None = 5432,
    pg_name: str = "headscale",
    pg_user: str = "headscale",
    pg_password: str | None = None,
    pg_ssl: bool | str = False,
    pg_pool_size: int = DEFAULT_PG_POOL,
    pg_max_overflow: int = 10,
    pg_pool_recycle: int = -1,
    prepare: bool = True,
    hide_parameters: bool = False,
    echo: bool = False,
) -> Engine:
    """Create a SQLAlchemy engine for Headscale's database settings."""
    kind = _normalise_type(db_type)
    if kind == "sqlite":
        return _make_sqlite_engine(sqlite_path, wal=sqlite_wal, echo=echo, prepare=prepare,
                                   hide_parameters=hide_parameters)
    return _make_pg_engine(
        host=pg_host,
        port=pg_port,
        name=pg_name,
        user=pg_user,
        password=pg_password,
        ssl=pg_ssl,
        pool=PoolSettings(pg_pool_size, pg_max_overflow, pg_pool_recycle),
        prepare=prepare,
        hide_parameters=hide_parameters,
        echo=echo,
    )


def _make_sqlite_engine(path: str | os.PathLike[str] | None, *, wal: bool, echo: bool,
                        prepare: bool = True, hide_parameters: bool = False) -> Engine:
    if path is None or not str(path).strip():
        raise DatabaseConfigError("sqlite database needs a path")
    memory = str(path) == ":memory:"
    if memory:
        url = "sqlite://"
    else:
        p = Path(path).expanduser().absolute()
        if not p.parent.exists():
            private_dir(p.parent)
        # SQLite gives its -wal and -shm files the database file's mode.
        for f in (p, p.with_name(p.name + "-wal"), p.with_name(p.name + "-shm")):
            if f == p or f.exists():
                private_file(f)
        url = f"sqlite:///{p}"
    connect_args: dict[str, Any] = {"check_same_thread": False}
    if not prepare:
        connect_args["cached_statements"] = 0
    engine = create_engine(url, echo=echo, connect_args=connect_args,
                           hide_parameters=hide_parameters)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite so BEGIN is ours (see _on_begin).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys = ON")
            # Pragmas that write to the file need the write lock; only issue them when they
            # change something, so a new pooled connection never waits behind a writer.
            if cur.execute("PRAGMA page_count").fetchone()[0] == 0:
                cur.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only possible on a new file
            if not memory:
                want = "wal" if wal else "delete"
                if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != want:
                    cur.execute(f"PRAGMA journal_mode = {want.upper()}")
                if wal:
                    cur.execute("PRAGMA synchronous = NORMAL")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        if mode not in ("IMMEDIATE", "DEFERRED", "EXCLUSIVE"):
            raise DatabaseConfigError(f"bad sqlite_begin execution option {mode!r}")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _make_pg_engine(
    *,
    host: str,
    port: int | None,
    name: str,
    user: str,
    password: str | None,
    ssl: bool | str,
    pool: PoolSettings,
    prepare: bool,
    hide_parameters: bool,
    echo: bool,
) -> Engine:
    query: dict[str, str] = {}
    sslmode = _pg_sslmode(ssl)
    if sslmode is not None:
        query["sslmode"] = sslmode
    url = URL.create(
        "postgresql+psycopg",
        username=user or None,
        password=password or None,
        host=host or None,
        port=int(port) if port else None,
        database=name or None,
        query=query,
    )
    connect_args: dict[str, Any] = {"options": "-c timezone=UTC"}
    if not prepare:
        connect_args["prepare_threshold"] = None  # psycopg: never prepare
    return create_engine(
        url,
        echo=echo,
        hide_parameters=hide_parameters,
        pool_size=max(1, pool.size),
        max_overflow=pool.overflow,
        pool_recycle=pool.recycle,
        pool_pre_ping=True,
        # Sessions in UTC so server-side rendering of timestamptz matches what we store.
        connect_args=connect_args,
    )


def engine_from_config(db_cfg: DatabaseConfig) -> Engine:
    """Build an engine from the config's `database:` section (db/tuning.py says what the
    debug, gorm, WAL checkpoint and pool keys do here)."""
    gorm = db_cfg.gorm
    hide = gorm.parameterized_queries
    wal_autocheckpoint: int | None = None
    if _normalise_type(db_cfg.type) == "sqlite":
        sq = db_cfg.sqlite
        engine = make_engine("sqlite", sqlite_path=sq.path, sqlite_wal=sq.write_ahead_log,
                             prepare=gorm.prepare_stmt, hide_parameters=hide)
        if sq.write_ahead_log:
            wal_autocheckpoint = sq.wal_autocheckpoint
    else:
        pg = db_cfg.postgres
        pool = pool_settings(pg.max_open_conns, pg.max_idle_conns, pg.conn_max_idle_time_secs)
        engine = make_engine(
            "postgres",
            pg_host=pg.host,
            pg_port=pg.port,
            pg_name=pg.name,
            pg_user=pg.user,
            pg_password=pg.pass_,
            pg_ssl=pg.ssl,
            pg_pool_size=pool.size, pg_max_overflow=pool.overflow,
            pg_pool_recycle=pool.recycle, prepare=gorm.prepare_stmt, hide_parameters=hide,
        )
    tune(engine, debug=db_cfg.debug, slow_threshold_ms=gorm.slow_threshold,
         hide_parameters=hide, wal_autocheckpoint=wal_autocheckpoint)
    return engine


# ---------------------------------------------------------------------------------------------
# Migrations


def _alembic_dir() -> Path:
    """The migration scripts: pyheadscale/migrations, shipped inside the package so that any
    installation (editable, a wheel, the Docker image) can migrate its database."""
    override = os.environ.get("PYHEADSCALE_ALEMBIC_DIR")
    candidates = [Path(override)] if override else []
    candidates.append(Path(__file__).resolve().parents[1] / "migrations")
    for c in candidates:
        if (c / "env.py").is_file() and (c / "versions").is_dir():
            return c
    raise MigrationError(
        "alembic scripts not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); set PYHEADSCALE_ALEMBIC_DIR"
    )


def alembic_config(connection: Connection | None = None) -> Any:
    """An alembic Config pointing at our scripts; with `connection`, env.py migrates that."""
    from alembic.config import Config

    script_dir = _alembic_dir()
    # No ini file on purpose: env.py would reconfigure the app's logging from it.
    cfg = Config()
    cfg.set_main_option("script_location", str(script_dir))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _adopt_headscale_database(conn: Connection) -> bool:
    """True when `conn` holds a Headscale-created database that alembic does not know yet."""
    tables = set(inspect(conn).get_table_names())
    if "alembic_version" in tables or "users" not in tables:
        return False
    if "nodes" in tables and "database_versions" in tables:
        return True
    raise MigrationError(
        "database has Headscale tables from a release before 0.29 "
        "(no database_versions table); upgrade it with Headscale 0.29 first"
    )


def migrate(engine: Engine, *, version: str | None = HEADSCALE_COMPAT_VERSION) -> None:
    """Bring the database to the newest schema (`alembic upgrade head`) and record `version`.

    A database created by Headscale 0.29 is adopted: stamped at the baseline revision, then
    upgraded. `version=None` leaves database_versions untouched. A database already at
    HEAD_REVISION is only checked and its version recorded: alembic is not imported.
    """
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if _at_head(conn):
            with conn.begin():
                if not sqlite:
                    # The version check and write are a read-modify-write: two instances
                    # starting together must not reorder them (version going backwards) or
                    # both INSERT the missing row.
                    _lock_migrations(conn)
                _record_unless_newer(conn, check_database_version(conn), version)
            return
        from alembic import command

        if sqlite:
            # Batch migrations rebuild tables (DROP + RENAME); with FKs on, dropping a parent
            # would cascade-delete its children. The pragma is ignored inside a transaction,
            # so it goes straight to the DB-API connection before ours begins.
            _raw_exec(conn, "PRAGMA foreign_keys = OFF")
        try:
            with conn.begin():
                if not sqlite:
                    # Several instances may start at once on one database: one migrates,
                    # the others wait and then find nothing to do.
                    _lock_migrations(conn)
                stored = check_database_version(conn)
                if _adopt_headscale_database(conn):
                    command.stamp(alembic_config(conn), _BASELINE_REVISION)
                command.upgrade(alembic_config(conn), "head")
                if sqlite:
                    bad = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if bad:
                        raise MigrationError(f"foreign key violations after migration: {bad}")
                _record_unless_newer(conn, stored, version)
        finally:
            if sqlite:
                _raw_exec(conn, "PRAGMA foreign_keys = ON")


def _lock_migrations(conn: Connection) -> None:
    """PostgreSQL: serialise migrate() across instances until the transaction ends (SQLite
    takes no lock here, on either path: one file is served by one instance)."""
    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATE_LOCK})


def _record_unless_newer(conn: Connection, stored: str | None, version: str | None) -> None:
    if version is not None and not _newer(stored, version):
        _record_version(conn, version)  # never rewritten downwards


_SEMVER = re.compile(r"v?(\d+)\.(\d+)\.(\d+)(?:[-+].*)?")
# Go module pseudo-versions of untagged builds; Headscale treats them (and "dev") as no version.
_PSEUDO = re.compile(r"[-.]\d{14}-[0-9a-f]{12}$")


def _semver(v: str | None) -> tuple[int, int, int] | None:
    if not v or v in ("dev", "(devel)") or _PSEUDO.search(v):
        return None
    m = _SEMVER.fullmatch(v)
    if m is None:
        raise MigrationError(f"database_versions holds {v!r}, which is not a version "
                             "(major.minor.patch); refusing to guess what wrote this database")
    return int(m[1]), int(m[2]), int(m[3])


def _newer(stored: str | None, ours: str) -> bool:
    s, o = _semver(stored), _semver(ours)
    return s is not None and o is not None and s > o


def check_database_version(conn: Connection) -> str | None:
    """Refuse a database that Headscale's own upgrade rules would refuse us, and one written
    by a newer Headscale minor release than the schema we implement (its migrations are
    unknown to us; it is never rewritten downwards). Returns the stored version."""
    tables = set(inspect(conn).get_table_names())
    if "alembic_version" in tables:
        rev = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        if rev not in (None, HEAD_REVISION) and not _known_revision(rev):
            raise MigrationError(f"database schema revision {rev!r} is from a newer "
                                 "pyheadscale; refusing to run an older one on it")
    if "database_versions" not in tables:
        return None
    stored = conn.exec_driver_sql("SELECT version FROM database_versions WHERE id = 1").scalar()
    sv, ours = _semver(stored), _semver(HEADSCALE_COMPAT_VERSION)
    if sv is None or ours is None:
        return stored
    adopted = f"v{ours[0]}.{ours[1]}"
    if sv[0] != ours[0] or sv[1] > ours[1]:
        raise MigrationError(
            f"database was last used by Headscale {stored}, newer than the {adopted} schema "
            f"this pyheadscale implements; a database is never migrated downwards. Run "
            f"Headscale {stored} on it, or restore a backup taken before that upgrade")
    if ours[1] - sv[1] > 1:
        raise MigrationError(
            f"database was last used by Headscale {stored}; upgrading more than one minor "
            f"version at a time is not supported (as in Headscale): upgrade it with "
            f"Headscale v{sv[0]}.{sv[1] + 1}.x first")
    return stored


def _known_revision(rev: str) -> bool:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    try:
        return bool(ScriptDirectory.from_config(alembic_config()).get_revision(rev))
    except CommandError:
        return False


def at_head(engine: Engine) -> bool:
    """The database is at HEAD_REVISION: no migration is due (alembic not needed)."""
    with engine.connect() as conn:
        return _at_head(conn)


def _at_head(conn: Connection) -> bool:
    """The database's alembic revision is HEAD_REVISION (a plain query, no alembic)."""
    try:
        if not inspect(conn).has_table("alembic_version"):
            return False
        revs = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all()
        return revs == [HEAD_REVISION]
    finally:
        conn.rollback()  # the reads' implicit transaction (SQLite: BEGIN IMMEDIATE, a lock)


def _raw_exec(conn: Connection, sql: str) -> None:
    dbapi_conn: Any = conn.connection.dbapi_connection
    dbapi_conn.execute(sql)


def _record_version(conn: Connection, version: str) -> None:
    from pyheadscale.db.models import UTCDateTime, utcnow

    now = UTCDateTime().process_bind_param(utcnow(), conn.dialect)
    # Same single-row upsert Headscale performs (id is always 1).
    res = conn.execute(
        text("UPDATE database_versions SET version = :v, updated_at = :t WHERE id = 1"),
        {"v": version, "t": now},
    )
    if res.rowcount == 0:
        conn.execute(
            text("INSERT INTO database_versions (id, version, updated_at) VALUES (1, :v, :t)"),
            {"v": version, "t": now},
        )
