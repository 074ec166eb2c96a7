"""Schema migrations: alembic upgrade on empty databases, drift between models and migrations,
and adoption of a database created by Headscale 0.29."""

import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect
from sqlmodel import Session, select

from pyheadscale.db.engine import (
    HEAD_REVISION,
    HEADSCALE_COMPAT_VERSION,
    MigrationError,
    alembic_config,
    make_engine,
    migrate,
)
from pyheadscale.db.models import DatabaseVersion, Node, PreAuthKey, User, metadata
from tests.pgserver import PostgresServer

REPO = Path(__file__).resolve().parents[2]

# Headscale v0.29.2 hscontrol/db/schema.sql: tables and their columns, in order.
HEADSCALE_COLUMNS: dict[str, list[str]] = {
    "migrations": ["id"],
    "users": [
        "id",
        "name",
        "display_name",
        "email",
        "provider_identifier",
        "provider",
        "profile_pic_url",
        "created_at",
        "updated_at",
        "deleted_at",
    ],
    "pre_auth_keys": [
        "id",
        "key",
        "prefix",
        "hash",
        "user_id",
        "reusable",
        "ephemeral",
        "used",
        "tags",
        "expiration",
        "created_at",
    ],
    "api_keys": ["id", "prefix", "hash", "expiration", "last_seen", "created_at"],
    "nodes": [
        "id",
        "machine_key",
        "node_key",
        "disco_key",
        "endpoints",
        "host_info",
        "ipv4",
        "ipv6",
        "hostname",
        "given_name",
        "user_id",
        "register_method",
        "tags",
        "auth_key_id",
        "last_seen",
        "expiry",
        "approved_routes",
        "created_at",
        "updated_at",
        "deleted_at",
    ],
    "policies": ["id", "data", "created_at", "updated_at", "deleted_at"],
    "database_versions": ["id", "version", "updated_at"],
}

# Columns added after Headscale 0.29's, per table: 0002 (pyheadscale's idp_groups) and 0003
# (Headscale 0.30's v2-API columns).
PYHEADSCALE_COLUMNS: dict[str, list[str]] = {
    "users": ["idp_groups"],
    "pre_auth_keys": ["description", "revoked"],
    "api_keys": ["user_id"],
}
# Tables added by 0003, as Headscale 0.30's schema.sql lays them out.
ADDED_TABLES: dict[str, list[str]] = {
    "oauth_clients": ["id", "client_id", "secret_hash", "scopes", "tags", "description",
                      "user_id", "created_at", "revoked"],
    "oauth_access_tokens": ["id", "prefix", "hash", "client_id", "scopes", "tags",
                            "expiration", "created_at"],
}
# Tables added by 0004: pyheadscale's own, for several instances on one PostgreSQL.
CLUSTER_TABLES: dict[str, list[str]] = {
    "cluster_changes": ["id", "instance", "created_at", "rows"],
    "cluster_instances": ["id", "name", "started_at", "heartbeat_at", "applied_id", "info"],
    "cluster_presence": ["node_id", "instance_id", "capver", "since"],
    "cluster_state": ["key", "value", "updated_at"],
    "cluster_registrations": ["auth_id", "machine_key", "data", "created_at", "expires_at",
                              "node_id", "error"],
}
ADDED_TABLES.update(CLUSTER_TABLES)
ADDED_INDEXES: dict[str, tuple[str, list[str], bool]] = {
    "idx_oauth_clients_client_id": ("oauth_clients", ["client_id"], True),
    "idx_oauth_access_tokens_prefix": ("oauth_access_tokens", ["prefix"], True),
    "idx_cluster_presence_instance": ("cluster_presence", ["instance_id"], False),
}
# Foreign keys added by 0004.
ADDED_FKS: dict[tuple[str, str], tuple[str, str | None]] = {
    ("cluster_presence", "node_id"): ("nodes", "CASCADE"),
}
ADDED_SQLITE_TYPES: dict[tuple[str, str], str] = {
    ("pre_auth_keys", "revoked"): "datetime",
    ("api_keys", "user_id"): "integer",
    **{(t, "id"): "integer" for t in ("oauth_clients", "oauth_access_tokens")},
    ("oauth_clients", "secret_hash"): "blob",
    ("oauth_clients", "user_id"): "integer",
    ("oauth_clients", "created_at"): "datetime",
    ("oauth_clients", "revoked"): "datetime",
    ("oauth_access_tokens", "hash"): "blob",
    ("oauth_access_tokens", "expiration"): "datetime",
    ("oauth_access_tokens", "created_at"): "datetime",
    ("cluster_changes", "id"): "integer",
    ("cluster_changes", "created_at"): "datetime",
    ("cluster_instances", "started_at"): "datetime",
    ("cluster_instances", "heartbeat_at"): "datetime",
    ("cluster_instances", "applied_id"): "integer",
    ("cluster_presence", "node_id"): "integer",
    ("cluster_presence", "capver"): "integer",
    ("cluster_presence", "since"): "datetime",
    ("cluster_state", "updated_at"): "datetime",
    ("cluster_registrations", "created_at"): "datetime",
    ("cluster_registrations", "expires_at"): "datetime",
    ("cluster_registrations", "node_id"): "integer",
}

# Same source: declared SQLite column types where they are not plain "text".
HEADSCALE_SQLITE_TYPES: dict[tuple[str, str], str] = {
    **{(t, "id"): "integer" for t in HEADSCALE_COLUMNS if t != "migrations"},
    ("users", "created_at"): "datetime",
    ("users", "updated_at"): "datetime",
    ("users", "deleted_at"): "datetime",
    ("pre_auth_keys", "hash"): "blob",
    ("pre_auth_keys", "user_id"): "integer",
    ("pre_auth_keys", "reusable"): "numeric",
    ("pre_auth_keys", "ephemeral"): "numeric",
    ("pre_auth_keys", "used"): "numeric",
    ("pre_auth_keys", "expiration"): "datetime",
    ("pre_auth_keys", "created_at"): "datetime",
    ("api_keys", "hash"): "blob",
    ("api_keys", "expiration"): "datetime",
    ("api_keys", "last_seen"): "datetime",
    ("api_keys", "created_at"): "datetime",
    ("nodes", "given_name"): "varchar(63)",
    ("nodes", "user_id"): "integer",
    ("nodes", "auth_key_id"): "integer",
    ("nodes", "last_seen"): "datetime",
    ("nodes", "expiry"): "datetime",
    ("nodes", "created_at"): "datetime",
    ("nodes", "updated_at"): "datetime",
    ("nodes", "deleted_at"): "datetime",
    ("policies", "created_at"): "datetime",
    ("policies", "updated_at"): "datetime",
    ("policies", "deleted_at"): "datetime",
    ("database_versions", "updated_at"): "datetime",
}

# name -> (table, columns, unique)
HEADSCALE_INDEXES: dict[str, tuple[str, list[str], bool]] = {
    "idx_users_deleted_at": ("users", ["deleted_at"], False),
    "idx_provider_identifier": ("users", ["provider_identifier"], True),
    "idx_name_provider_identifier": ("users", ["name", "provider_identifier"], True),
    "idx_name_no_provider_identifier": ("users", ["name"], True),
    "idx_pre_auth_keys_prefix": ("pre_auth_keys", ["prefix"], True),
    "idx_api_keys_prefix": ("api_keys", ["prefix"], True),
    "idx_policies_deleted_at": ("policies", ["deleted_at"], False),
}

# (table, column) -> (referred table, ON DELETE); None = no action.
HEADSCALE_FKS: dict[tuple[str, str], tuple[str, str | None]] = {
    ("pre_auth_keys", "user_id"): ("users", "SET NULL"),
    ("nodes", "user_id"): ("users", "CASCADE"),
    ("nodes", "auth_key_id"): ("pre_auth_keys", None),
}


def assert_headscale_schema(eng: Engine, *, ours: bool = True) -> None:
    """Headscale 0.29's schema; with `ours`, plus the later columns (appended) and tables."""
    insp = inspect(eng)
    tables = set(insp.get_table_names())
    all_tables = {**HEADSCALE_COLUMNS, **(ADDED_TABLES if ours else {})}
    assert tables - {"alembic_version", "sqlite_sequence"} == set(all_tables)
    for table, cols in all_tables.items():
        extra = PYHEADSCALE_COLUMNS.get(table, []) if ours else []
        assert [c["name"] for c in insp.get_columns(table)] == cols + extra, table
    assert {c["name"]: c["nullable"] for c in insp.get_columns("database_versions")}[
        "version"
    ] is False

    indexes: dict[str, tuple[str, list[str], bool]] = {}
    for table in all_tables:
        for ix in insp.get_indexes(table):
            indexes[str(ix["name"])] = (table, list(ix["column_names"]), bool(ix["unique"]))
    assert indexes == {**HEADSCALE_INDEXES, **(ADDED_INDEXES if ours else {})}

    fks: dict[tuple[str, str], tuple[str, str | None]] = {}
    for table in all_tables:
        for fk in insp.get_foreign_keys(table):
            assert fk["referred_columns"] == ["id"]
            ondelete = (fk.get("options") or {}).get("ondelete")
            if ondelete is not None and ondelete.upper() == "NO ACTION":
                ondelete = None
            (col,) = fk["constrained_columns"]
            fks[(table, col)] = (fk["referred_table"], ondelete and ondelete.upper())
    assert fks == {**HEADSCALE_FKS, **(ADDED_FKS if ours else {})}

    if eng.dialect.name == "sqlite":
        with eng.connect() as conn:
            types = {**HEADSCALE_SQLITE_TYPES, **(ADDED_SQLITE_TYPES if ours else {})}
            for table, cols in all_tables.items():
                declared = {
                    r[1]: r[2].lower() for r in conn.exec_driver_sql(f"PRAGMA table_info({table})")
                }
                extra = PYHEADSCALE_COLUMNS.get(table, []) if ours else []
                for col in cols + extra:
                    assert declared[col] == types.get((table, col), "text"), (table, col)
            # Rowid aliases keep AUTOINCREMENT like Headscale's (ids never reused).
            ddl = conn.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE type='table' AND name='nodes'"
            ).scalar_one()
            assert "AUTOINCREMENT" in ddl.upper()


def schema_diff(eng: Engine, *, ignore_pk_nullable: bool = False) -> list[Any]:
    with eng.connect() as conn:
        mc = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        diffs = list(compare_metadata(mc, metadata))
    if ignore_pk_nullable:
        diffs = [d for d in diffs if not _is_pk_nullable_diff(d)]
    return diffs


def _is_pk_nullable_diff(diff: Any) -> bool:
    # SQLite reports "id integer PRIMARY KEY" (no NOT NULL) as nullable, though a rowid alias
    # can never hold NULL; Headscale's DDL is written that way, ours says NOT NULL.
    if not isinstance(diff, list) or len(diff) != 1 or diff[0][0] != "modify_nullable":
        return False
    _, _, table, column, *_ = diff[0]
    return bool(metadata.tables[table].c[column].primary_key)


# ---------------------------------------------------------------------------------------------


def test_upgrade_head_creates_schema(empty_engine: Engine) -> None:
    assert inspect(empty_engine).get_table_names() == []
    with empty_engine.begin() as conn:
        command.upgrade(alembic_config(conn), "head")
    assert_headscale_schema(empty_engine)
    with empty_engine.connect() as conn:
        rev = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one()
    assert rev == HEAD_REVISION


def test_no_drift_between_models_and_migrations(engine: Engine) -> None:
    assert schema_diff(engine) == []


def test_drift_check_notices_differences(engine: Engine) -> None:
    # Guard against a vacuous drift test: a changed model must show up as a diff.
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE policies ADD COLUMN extra TEXT")
        conn.exec_driver_sql("DROP INDEX idx_api_keys_prefix")
    kinds = {d[0] if isinstance(d, tuple) else d[0][0] for d in schema_diff(engine)}
    assert {"remove_column", "add_index"} <= kinds


def test_alembic_cli_from_another_cwd(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    if backend == "sqlite":
        path = tmp_path / "cli" / "hs.sqlite"
        path.parent.mkdir()
        url = f"sqlite:///{path}"
        eng = make_engine("sqlite", sqlite_path=str(path))
    else:
        pg_server: PostgresServer = request.getfixturevalue("pg_server")
        eng = pg_server.new_engine()
        assert eng.url.database is not None
        url = pg_server.dsn(eng.url.database)

    def alembic(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini")]
        return subprocess.run(
            [*argv, "-x", f"url={url}", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    proc = alembic("upgrade", "head")
    assert proc.returncode == 0, proc.stderr
    try:
        assert_headscale_schema(eng)
        assert schema_diff(eng) == []
        # The developer's autogenerate (through env.py) also sees nothing to do.
        proc = alembic("check")
        assert proc.returncode == 0, proc.stderr
        assert "No new upgrade operations detected" in proc.stdout + proc.stderr
    finally:
        eng.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_migrate_records_version_and_is_idempotent(
    empty_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The scripts are found relative to the package, not the working directory.
    monkeypatch.chdir(tmp_path)
    before = datetime.now(UTC)
    migrate(empty_engine)
    with Session(empty_engine) as s:
        (row,) = s.exec(select(DatabaseVersion)).all()
        assert (row.id, row.version) == (1, HEADSCALE_COMPAT_VERSION)
        assert row.updated_at is not None and row.updated_at >= before.replace(microsecond=0)
        first = row.updated_at
    migrate(empty_engine, version="v0.29.3")
    with Session(empty_engine) as s:
        (row,) = s.exec(select(DatabaseVersion)).all()
        assert row.version == "v0.29.3"
        assert row.updated_at is not None and row.updated_at >= first
    assert_headscale_schema(empty_engine)


def test_downgrade_to_base_and_back(engine: Engine) -> None:
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version", "sqlite_sequence"}
    migrate(engine)
    assert_headscale_schema(engine)


# ---------------------------------------------------------------------------------------------
# A database written by Headscale 0.29 (SQLite): the DDL below restates schema.sql's facts and
# the rows are stored the way Go's GORM/modernc-sqlite store them.

HEADSCALE_029_DDL = """
CREATE TABLE migrations(id text,PRIMARY KEY(id));
CREATE TABLE users(
  id integer PRIMARY KEY AUTOINCREMENT, name text, display_name text, email text,
  provider_identifier text, provider text, profile_pic_url text,
  created_at datetime, updated_at datetime, deleted_at datetime);
CREATE INDEX idx_users_deleted_at ON users(deleted_at);
CREATE UNIQUE INDEX idx_provider_identifier ON users(provider_identifier)
  WHERE provider_identifier IS NOT NULL;
CREATE UNIQUE INDEX idx_name_provider_identifier ON users(name, provider_identifier);
CREATE UNIQUE INDEX idx_name_no_provider_identifier ON users(name)
  WHERE provider_identifier IS NULL;
CREATE TABLE pre_auth_keys(
  id integer PRIMARY KEY AUTOINCREMENT, key text, prefix text, hash blob, user_id integer,
  reusable numeric, ephemeral numeric DEFAULT false, used numeric DEFAULT false, tags text,
  expiration datetime, created_at datetime,
  CONSTRAINT fk_pre_auth_keys_user FOREIGN KEY(user_id) REFERENCES users(id) ON DELETE SET NULL);
CREATE UNIQUE INDEX idx_pre_auth_keys_prefix ON pre_auth_keys(prefix)
  WHERE prefix IS NOT NULL AND prefix != '';
CREATE TABLE api_keys(
  id integer PRIMARY KEY AUTOINCREMENT, prefix text, hash blob, expiration datetime,
  last_seen datetime, created_at datetime);
CREATE UNIQUE INDEX idx_api_keys_prefix ON api_keys(prefix);
CREATE TABLE nodes(
  id integer PRIMARY KEY AUTOINCREMENT, machine_key text, node_key text, disco_key text,
  endpoints text, host_info text, ipv4 text, ipv6 text, hostname text, given_name varchar(63),
  user_id integer, register_method text, tags text, auth_key_id integer, last_seen datetime,
  expiry datetime, approved_routes text, created_at datetime, updated_at datetime,
  deleted_at datetime,
  CONSTRAINT fk_nodes_user FOREIGN KEY(user_id) REFERENCES users(id) ON DELETE CASCADE,
  CONSTRAINT fk_nodes_auth_key FOREIGN KEY(auth_key_id) REFERENCES pre_auth_keys(id));
CREATE TABLE policies(
  id integer PRIMARY KEY AUTOINCREMENT, data text,
  created_at datetime, updated_at datetime, deleted_at datetime);
CREATE INDEX idx_policies_deleted_at ON policies(deleted_at);
CREATE TABLE database_versions(id integer PRIMARY KEY, version text NOT NULL,
  updated_at datetime);
"""

HEADSCALE_029_ROWS = """
INSERT INTO migrations VALUES ('202501221827'), ('202606181200');
INSERT INTO users VALUES (1, 'alice', 'Alice A', 'alice@example.com', NULL, '', '',
  '2025-03-04 05:06:07.123456789+00:00', '2025-03-04 07:06:07.5+02:00', NULL);
INSERT INTO pre_auth_keys VALUES (7, '', 'abcdef012345', X'24326224', 1, 1, 0, 1,
  '["tag:server"]', '2025-04-01 00:00:00+00:00', '2025-03-04 05:06:07+00:00');
INSERT INTO nodes VALUES (3, 'mkey:' || hex(zeroblob(32)), 'nodekey:' || hex(zeroblob(32)),
  'discokey:' || hex(zeroblob(32)), '["192.0.2.1:41641","[2001:db8::1]:41641"]',
  '{"OS":"linux","Hostname":"web1","RoutableIPs":["10.0.0.0/24"]}', '100.64.0.1',
  'fd7a:115c:a1e0::1', 'web1', 'web1', 1, 'authkey', 'null', 7,
  '2025-03-05 00:00:00.000000001+00:00', NULL, '["10.0.0.0/24"]',
  '2025-03-04 05:06:07.123456789+00:00', '2025-03-04 05:06:07.123456789+00:00', NULL);
INSERT INTO policies (id, data, created_at, updated_at)
  VALUES (1, '{"acls":[]}', '2025-03-04 05:06:07+00:00', '2025-03-04 05:06:07+00:00');
INSERT INTO database_versions VALUES (1, 'v0.29.1', '2025-03-04 05:06:07+00:00');
"""


def headscale_database(path: Path, script: str) -> Engine:
    """A SQLite file written by `script` (Headscale's own DDL and rows), and an engine on it."""
    raw = sqlite3.connect(path)
    raw.executescript(script)
    raw.close()
    return make_engine("sqlite", sqlite_path=str(path))


def test_adopts_headscale_029_sqlite_database(tmp_path: Path) -> None:
    path = tmp_path / "headscale.sqlite"
    eng = headscale_database(path, HEADSCALE_029_DDL + HEADSCALE_029_ROWS)
    try:
        assert_headscale_schema(eng, ours=False)
        # Headscale 0.29's schema and ours differ only by the added columns, tables, indexes.
        diff = schema_diff(eng, ignore_pk_nullable=True)
        added = set()
        for d in diff:
            if d[0] == "add_column":
                added.add((d[2], d[3].name))
            elif d[0] == "add_table":
                added.add((d[1].name, "*"))
            else:
                assert d[0] == "add_index" and d[1].name in ADDED_INDEXES, d
        assert added == {(t, c) for t, cols in PYHEADSCALE_COLUMNS.items() for c in cols} | {
            (t, "*") for t in ADDED_TABLES}
        migrate(eng)
        assert schema_diff(eng, ignore_pk_nullable=True) == []
        assert_headscale_schema(eng)
        with Session(eng) as s:
            user = s.get(User, 1)
            assert user is not None and user.name == "alice"
            assert user.provider_identifier is None and user.idp_groups is None
            assert user.created_at == datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
            assert user.updated_at == datetime(2025, 3, 4, 5, 6, 7, 500000, tzinfo=UTC)
            key = s.get(PreAuthKey, 7)
            assert key is not None
            assert (key.reusable, key.ephemeral, key.used) == (True, False, True)
            assert key.tags == ["tag:server"] and key.hash == b"$2b$"
            node = s.get(Node, 3)
            assert node is not None
            assert node.machine_key == "mkey:" + "00" * 32
            assert node.endpoints == ["192.0.2.1:41641", "[2001:db8::1]:41641"]
            assert node.host_info == {
                "OS": "linux",
                "Hostname": "web1",
                "RoutableIPs": ["10.0.0.0/24"],
            }
            assert node.tags is None and node.expiry is None
            assert node.approved_routes == ["10.0.0.0/24"]
            assert node.last_seen == datetime(2025, 3, 5, tzinfo=UTC)
            assert node.user is not None and node.user.email == "alice@example.com"
            assert node.auth_key is not None and node.auth_key.prefix == "abcdef012345"
            version = s.get(DatabaseVersion, 1)
            assert version is not None and version.version == HEADSCALE_COMPAT_VERSION
        with eng.connect() as conn:
            assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == (
                HEAD_REVISION
            )
            assert conn.exec_driver_sql("SELECT count(*) FROM migrations").scalar() == 2
    finally:
        eng.dispose()


def test_refuses_pre_029_headscale_database(tmp_path: Path) -> None:
    eng = headscale_database(tmp_path / "old.sqlite", HEADSCALE_029_DDL.replace(
        "CREATE TABLE database_versions", "CREATE TABLE x"))
    try:
        with pytest.raises(MigrationError, match="0.29"):
            migrate(eng)
        assert "alembic_version" not in inspect(eng).get_table_names()
    finally:
        eng.dispose()


def test_migration_keeps_child_rows_on_sqlite(sqlite_engine: Engine) -> None:
    # migrate() turns foreign keys off while it runs (table rebuilds would otherwise cascade)
    # and back on afterwards; a re-run must not touch existing rows.
    with Session(sqlite_engine) as s:
        u = User(name="bob")
        s.add(u)
        s.commit()
        s.add(Node(hostname="n1", user_id=u.id))
        s.commit()
    migrate(sqlite_engine)
    with sqlite_engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM nodes").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    with sqlite_engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM users")) == 1


# ---------------------------------------------------------------------------------------------
# 0002: users.idp_groups, pyheadscale's only column outside Headscale's schema.


def _index_sql(eng: Engine) -> dict[str, str]:
    with eng.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'users'"
        ).fetchall()
    return {r[0]: r[1] for r in rows if r[1]}


def test_user_idp_groups_column_round_trip(engine: Engine) -> None:
    with Session(engine) as s:
        s.add(User(name="ann", provider_identifier="https://idp/1", idp_groups=["Eng", "/ops"]))
        s.add(User(name="bob"))
        s.commit()
    with engine.connect() as conn:
        stored = dict(conn.execute(sa.text("SELECT name, idp_groups FROM users")).all())
        declared = {c["name"]: c for c in inspect(conn).get_columns("users")}["idp_groups"]
    # A JSON list in a nullable text column; users without groups keep NULL.
    assert stored == {"ann": '["Eng","/ops"]', "bob": None}
    assert declared["nullable"] is True
    assert isinstance(declared["type"], sa.Text) or str(declared["type"]).upper() == "TEXT"
    with Session(engine) as s:
        got = {u.name: u.idp_groups for u in s.exec(select(User)).all()}
    assert got == {"ann": ["Eng", "/ops"], "bob": None}


def test_downgrade_0002_drops_only_idp_groups(engine: Engine) -> None:
    with Session(engine) as s:
        s.add(User(name="ann", email="ann@example.com", idp_groups=["eng"]))
        s.commit()
    sqlite = engine.dialect.name == "sqlite"
    indexes_before = _index_sql(engine) if sqlite else {}
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0001")
    # Back to exactly Headscale's schema, rows kept, indexes untouched (no table rebuild).
    assert_headscale_schema(engine, ours=False)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT name, email FROM users")).all() == [
            ("ann", "ann@example.com")
        ]
    if sqlite:
        assert _index_sql(engine) == indexes_before
    migrate(engine)
    assert_headscale_schema(engine)
    assert schema_diff(engine) == []
    with Session(engine) as s:
        (u,) = s.exec(select(User)).all()
        assert (u.name, u.idp_groups) == ("ann", None)


def test_headscale_can_still_write_users_after_0002(tmp_path: Path) -> None:
    # After adoption, Headscale's GORM inserts name only its own columns; the new one must be
    # nullable without a default so those inserts keep working and read back as no groups.
    path = tmp_path / "headscale.sqlite"
    eng = headscale_database(path, HEADSCALE_029_DDL + HEADSCALE_029_ROWS)
    try:
        before = _index_sql(eng)
        migrate(eng)
        assert _index_sql(eng) == before
        cols = ", ".join(HEADSCALE_COLUMNS["users"][1:])
        with eng.begin() as conn:
            conn.exec_driver_sql(
                f"INSERT INTO users ({cols}) VALUES ('bob', '', '', 'https://idp/bob', 'oidc', '',"
                " '2025-03-04 05:06:07+00:00', '2025-03-04 05:06:07+00:00', NULL)"
            )
        with Session(eng) as s:
            got = {u.name: u.idp_groups for u in s.exec(select(User)).all()}
        assert got == {"alice": None, "bob": None}
    finally:
        eng.dispose()
