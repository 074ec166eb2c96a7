"""Models on both backends: CRUD round trips, storage formats, foreign-key and unique-index
behaviour as Headscale's schema defines it, and engine construction."""

import json
import re
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlmodel import Session, col, select

from pyheadscale.config import DatabaseConfig
from pyheadscale.db.engine import (
    SQLITE_BUSY_TIMEOUT_MS,
    DatabaseConfigError,
    engine_from_config,
    make_engine,
    migrate,
)
from pyheadscale.db.models import (
    ApiKey,
    DatabaseVersion,
    Node,
    Policy,
    PreAuthKey,
    User,
    parse_sqlite_datetime,
)
from tests.pgserver import PostgresServer

T0 = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def _add(eng: Engine, *objs: object) -> None:
    with Session(eng) as s:
        for o in objs:
            s.add(o)
        s.commit()
        for o in objs:
            s.refresh(o)
        s.expunge_all()


# --- CRUD round trips -------------------------------------------------------------------------


def test_user_crud(engine: Engine) -> None:
    u = User(
        name="alice",
        display_name="Alice Example",
        email="alice@example.com",
        provider_identifier="https://idp.example.com/alice",
        provider="oidc",
        profile_pic_url="https://example.com/a.png",
    )
    _add(engine, u)
    assert u.id is not None and u.created_at is not None and u.updated_at is not None
    with Session(engine) as s:
        got = s.get(User, u.id)
        assert got is not None
        assert (got.name, got.display_name, got.email) == (
            "alice",
            "Alice Example",
            "alice@example.com",
        )
        assert got.provider_identifier == "https://idp.example.com/alice"
        assert (got.provider, got.profile_pic_url) == ("oidc", "https://example.com/a.png")
        assert got.deleted_at is None
        got.display_name = "Alice B"
        s.add(got)
        s.commit()
    with Session(engine) as s:
        got = s.get(User, u.id)
        assert got is not None and got.display_name == "Alice B"
        s.delete(got)
        s.commit()
    with Session(engine) as s:
        assert s.get(User, u.id) is None


def test_pre_auth_key_crud(engine: Engine) -> None:
    u = User(name="bob")
    _add(engine, u)
    k = PreAuthKey(
        prefix="0123456789ab",
        hash=b"$2a$10$" + bytes(range(40)),
        user_id=u.id,
        reusable=True,
        ephemeral=True,
        tags=["tag:server", "tag:web"],
        expiration=T0 + timedelta(days=1),
        created_at=T0,
    )
    _add(engine, k)
    with Session(engine) as s:
        got = s.get(PreAuthKey, k.id)
        assert got is not None
        assert got.prefix == "0123456789ab" and got.hash == b"$2a$10$" + bytes(range(40))
        assert (got.reusable, got.ephemeral, got.used) == (True, True, False)
        assert got.tags == ["tag:server", "tag:web"]
        assert got.expiration == T0 + timedelta(days=1) and got.created_at == T0
        assert got.key == ""
        assert got.user is not None and got.user.name == "bob"
        got.used = True
        s.add(got)
        s.commit()
    with Session(engine) as s:
        got = s.get(PreAuthKey, k.id)
        assert got is not None and got.used is True
        s.delete(got)
        s.commit()
        assert s.get(PreAuthKey, k.id) is None


def test_pre_auth_key_server_defaults(engine: Engine) -> None:
    # A row inserted without ephemeral/used gets Headscale's DEFAULT false.
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO pre_auth_keys (prefix) VALUES ('p1')"))
    with Session(engine) as s:
        got = s.exec(select(PreAuthKey).where(PreAuthKey.prefix == "p1")).one()
        assert got.ephemeral is False and got.used is False and got.reusable is None


def test_api_key_crud(engine: Engine) -> None:
    k = ApiKey(prefix="hskey-api-abc", hash=b"\x00\xffbcrypt", expiration=T0, created_at=T0)
    _add(engine, k)
    with Session(engine) as s:
        got = s.get(ApiKey, k.id)
        assert got is not None
        assert (got.prefix, got.hash, got.expiration, got.last_seen) == (
            "hskey-api-abc",
            b"\x00\xffbcrypt",
            T0,
            None,
        )
        got.last_seen = T0 + timedelta(minutes=5)
        s.add(got)
        s.commit()
    with Session(engine) as s:
        got = s.get(ApiKey, k.id)
        assert got is not None and got.last_seen == T0 + timedelta(minutes=5)
        s.delete(got)
        s.commit()
        assert s.exec(select(ApiKey)).all() == []


def test_node_crud(engine: Engine) -> None:
    u = User(name="carol")
    _add(engine, u)
    key = PreAuthKey(prefix="nodekeyprefx", user_id=u.id, tags=["tag:ci"])
    _add(engine, key)
    hostinfo = {
        "IPNVersion": "1.80.0",
        "OS": "linux",
        "Hostname": "ci-runner",
        "RoutableIPs": ["10.1.0.0/16", "0.0.0.0/0", "::/0"],
        "Services": [{"Proto": "tcp", "Port": 22}],
    }
    n = Node(
        machine_key="mkey:" + "ab" * 32,
        node_key="nodekey:" + "cd" * 32,
        disco_key="discokey:" + "ef" * 32,
        endpoints=["198.51.100.7:41641", "[2001:db8::7]:41641"],
        host_info=hostinfo,
        ipv4="100.64.0.7",
        ipv6="fd7a:115c:a1e0::7",
        hostname="ci-runner",
        given_name="ci-runner",
        user_id=u.id,
        register_method="authkey",
        tags=["tag:ci"],
        auth_key_id=key.id,
        last_seen=T0,
        expiry=T0 + timedelta(days=180),
        approved_routes=["10.1.0.0/16"],
    )
    _add(engine, n)
    with Session(engine) as s:
        got = s.get(Node, n.id)
        assert got is not None
        assert got.machine_key == "mkey:" + "ab" * 32
        assert got.node_key == "nodekey:" + "cd" * 32
        assert got.disco_key == "discokey:" + "ef" * 32
        assert got.endpoints == ["198.51.100.7:41641", "[2001:db8::7]:41641"]
        assert got.host_info == hostinfo
        assert (got.ipv4, got.ipv6) == ("100.64.0.7", "fd7a:115c:a1e0::7")
        assert (got.hostname, got.given_name, got.register_method) == (
            "ci-runner",
            "ci-runner",
            "authkey",
        )
        assert got.user_id == u.id and got.auth_key_id == key.id
        assert got.tags == ["tag:ci"] and got.approved_routes == ["10.1.0.0/16"]
        assert got.last_seen == T0 and got.expiry == T0 + timedelta(days=180)
        assert got.user is not None and got.user.name == "carol"
        assert got.auth_key is not None and got.auth_key.prefix == "nodekeyprefx"
        # Tagged nodes are owned by their tags: user_id NULL, no expiry.
        got.user_id = None
        got.expiry = None
        got.approved_routes = ["10.1.0.0/16", "0.0.0.0/0", "::/0"]
        s.add(got)
        s.commit()
    with Session(engine) as s:
        got = s.get(Node, n.id)
        assert got is not None
        assert got.user_id is None and got.expiry is None
        assert got.approved_routes == ["10.1.0.0/16", "0.0.0.0/0", "::/0"]
        s.delete(got)
        s.commit()
        assert s.get(Node, n.id) is None


def test_given_name_is_at_most_63_chars_on_postgres(engine: Engine) -> None:
    if engine.dialect.name != "postgresql":
        # SQLite ignores VARCHAR lengths; Headscale enforces the limit in code there too.
        return
    with pytest.raises(StatementError):
        _add(engine, Node(given_name="x" * 64))


def test_policy_crud_latest_wins(engine: Engine) -> None:
    p1 = Policy(data='{"acls": []}')
    p2 = Policy(data='// HuJSON\n{"acls": [{"action": "accept",},],}')
    _add(engine, p1)
    _add(engine, p2)
    with Session(engine) as s:
        latest = s.exec(select(Policy).order_by(col(Policy.id).desc()).limit(1)).one()
        assert latest.id == p2.id and latest.data == p2.data
        latest.deleted_at = T0
        s.add(latest)
        s.commit()
    with Session(engine) as s:
        got = s.get(Policy, p2.id)
        assert got is not None and got.deleted_at == T0
        s.delete(got)
        s.commit()
        assert [p.id for p in s.exec(select(Policy)).all()] == [p1.id]


def test_database_version_row(engine: Engine) -> None:
    with Session(engine) as s:
        row = s.get(DatabaseVersion, 1)
        assert row is not None
        row.version = "v0.29.9"
        s.add(row)
        s.commit()
    with Session(engine) as s:
        row = s.get(DatabaseVersion, 1)
        assert row is not None and row.version == "v0.29.9"
        s.delete(row)
        s.commit()
        assert s.exec(select(DatabaseVersion)).all() == []
    with pytest.raises(IntegrityError), Session(engine) as s:
        s.add(DatabaseVersion(id=2, version=None))  # type: ignore[arg-type]
        s.commit()


def test_updated_at_moves_on_update(engine: Engine) -> None:
    u = User(name="dave", created_at=T0, updated_at=T0)
    _add(engine, u)
    with Session(engine) as s:
        got = s.get(User, u.id)
        assert got is not None and got.updated_at == T0
        got.email = "dave@example.com"
        s.add(got)
        s.commit()
        s.refresh(got)
        assert got.updated_at is not None and got.updated_at > T0
        assert got.created_at == T0


# --- storage formats --------------------------------------------------------------------------


def test_json_columns_are_json_text(engine: Engine) -> None:
    n = Node(
        endpoints=["192.0.2.1:1"],
        host_info={"OS": "linux", "NetInfo": {"PreferredDERP": 1}},
        tags=["tag:a"],
        approved_routes=["192.0.2.0/24"],
    )
    _add(engine, n)
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT endpoints, host_info, tags, approved_routes FROM nodes WHERE id = :i"),
            {"i": n.id},
        ).one()
    assert all(isinstance(v, str) for v in row)
    assert json.loads(row[0]) == ["192.0.2.1:1"]
    assert json.loads(row[1]) == {"OS": "linux", "NetInfo": {"PreferredDERP": 1}}
    assert json.loads(row[2]) == ["tag:a"]
    assert json.loads(row[3]) == ["192.0.2.0/24"]


def test_json_null_forms_read_as_none(engine: Engine) -> None:
    # Go's json serializer writes "null" for nil slices; NULL and "" also mean "nothing".
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO nodes (hostname, tags, endpoints, host_info) VALUES "
                "('j', 'null', '', NULL)"
            )
        )
    with Session(engine) as s:
        n = s.exec(select(Node).where(Node.hostname == "j")).one()
        assert (n.tags, n.endpoints, n.host_info) == (None, None, None)


def test_booleans_stored_like_headscale(engine: Engine) -> None:
    _add(engine, PreAuthKey(prefix="b1", reusable=True, ephemeral=False, used=True))
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT reusable, ephemeral, used FROM pre_auth_keys WHERE prefix = 'b1'")
        ).one()
    if engine.dialect.name == "sqlite":
        assert tuple(row) == (1, 0, 1)
    else:
        assert tuple(row) == (True, False, True)


def test_timestamps_are_utc(engine: Engine) -> None:
    plus2 = timezone(timedelta(hours=2))
    local = datetime(2025, 6, 1, 14, 0, 0, 250000, tzinfo=plus2)
    k = ApiKey(prefix="tz", expiration=local)
    _add(engine, k)
    with Session(engine) as s:
        got = s.get(ApiKey, k.id)
        assert got is not None and got.expiration is not None
        assert got.expiration == local
        assert got.expiration.utcoffset() == timedelta(0)
        assert (got.expiration.hour, got.expiration.microsecond) == (12, 250000)
    # Ordering and filtering on timestamps work in SQL.
    _add(engine, ApiKey(prefix="tz2", expiration=local + timedelta(seconds=1)))
    with Session(engine) as s:
        later = s.exec(select(ApiKey).where(col(ApiKey.expiration) > local)).all()
        assert [k.prefix for k in later] == ["tz2"]


def test_naive_datetime_rejected(engine: Engine) -> None:
    with pytest.raises(StatementError, match="naive"):
        _add(engine, ApiKey(prefix="naive", expiration=datetime(2025, 1, 1)))


def test_sqlite_timestamp_text_format(sqlite_engine: Engine) -> None:
    _add(sqlite_engine, ApiKey(prefix="f", created_at=T0))
    with sqlite_engine.connect() as conn:
        raw = conn.execute(text("SELECT created_at FROM api_keys WHERE prefix='f'")).scalar_one()
    # Go's SQLite driver writes "2006-01-02 15:04:05.999999999-07:00"; we write UTC.
    assert raw == "2025-01-02 03:04:05.678901+00:00"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2025-03-04 05:06:07.123456789+00:00", datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)),
        ("2025-03-04 05:06:07+00:00", datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)),
        ("2025-03-04 07:06:07.5+02:00", datetime(2025, 3, 4, 5, 6, 7, 500000, tzinfo=UTC)),
        ("2025-03-03 22:06:07.1-07:00", datetime(2025, 3, 4, 5, 6, 7, 100000, tzinfo=UTC)),
        ("2025-03-04T05:06:07Z", datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)),
        ("2025-03-04 05:06:07", datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)),
        (
            "2025-03-04 05:06:07.000000001 +0000 UTC m=+0.000000001",
            datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC),
        ),
        ("0001-01-01 00:00:00+00:00", datetime(1, 1, 1, tzinfo=UTC)),
    ],
)
def test_parse_go_sqlite_timestamps(raw: str, expected: datetime) -> None:
    got = parse_sqlite_datetime(raw)
    assert got == expected and got.tzinfo == UTC


def test_parse_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        parse_sqlite_datetime("yesterday")


# --- foreign keys and unique indexes ----------------------------------------------------------


def test_deleting_user_cascades_nodes_and_detaches_keys(engine: Engine) -> None:
    alice, bob = User(name="alice"), User(name="bob")
    _add(engine, alice, bob)
    k = PreAuthKey(prefix="k-alice", user_id=alice.id)
    _add(engine, k)
    n1 = Node(hostname="a1", user_id=alice.id, auth_key_id=k.id)
    n2 = Node(hostname="a2", user_id=alice.id)
    n3 = Node(hostname="b1", user_id=bob.id)
    tagged = Node(hostname="t1", user_id=None, tags=["tag:x"], auth_key_id=k.id)
    _add(engine, n1, n2, n3, tagged)

    with Session(engine) as s:
        u = s.get(User, alice.id)
        s.delete(u)
        s.commit()
    with Session(engine) as s:
        assert sorted(n.hostname for n in s.exec(select(Node)).all()) == ["b1", "t1"]
        key = s.get(PreAuthKey, k.id)
        assert key is not None and key.user_id is None  # ON DELETE SET NULL
        t = s.exec(select(Node).where(Node.hostname == "t1")).one()
        assert t.auth_key_id == k.id


def test_pre_auth_key_used_by_node_cannot_be_deleted(engine: Engine) -> None:
    k = PreAuthKey(prefix="inuse")
    _add(engine, k)
    _add(engine, Node(hostname="n", auth_key_id=k.id))
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(text("DELETE FROM pre_auth_keys WHERE id = :i"), {"i": k.id})
    # Headscale detaches nodes first; then the delete goes through.
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE nodes SET auth_key_id = NULL WHERE auth_key_id = :i"), {"i": k.id}
        )
        conn.execute(text("DELETE FROM pre_auth_keys WHERE id = :i"), {"i": k.id})


def test_node_user_must_exist(engine: Engine) -> None:
    with pytest.raises(IntegrityError):
        _add(engine, Node(hostname="orphan", user_id=424242))


def _insert_user(eng: Engine, name: str, provider_identifier: str | None) -> None:
    _add(eng, User(name=name, provider_identifier=provider_identifier))


def test_user_identity_indexes(engine: Engine) -> None:
    _insert_user(engine, "alice", None)
    _insert_user(engine, "alice", "https://github.example/alice")
    _insert_user(engine, "alice", "https://google.example/alice")
    with pytest.raises(IntegrityError):  # idx_name_no_provider_identifier
        _insert_user(engine, "alice", None)
    with pytest.raises(IntegrityError):  # idx_provider_identifier
        _insert_user(engine, "bob", "https://github.example/alice")
    _insert_user(engine, "bob", None)
    with Session(engine) as s:
        assert len(s.exec(select(User)).all()) == 4


def test_pre_auth_key_prefix_unique_unless_empty(engine: Engine) -> None:
    # Legacy plaintext keys have no prefix; any number of them may exist.
    _add(engine, PreAuthKey(key="legacy1"), PreAuthKey(key="legacy2"))
    _add(engine, PreAuthKey(prefix="abc"))
    with pytest.raises(IntegrityError):
        _add(engine, PreAuthKey(prefix="abc"))


def test_api_key_prefix_unique(engine: Engine) -> None:
    _add(engine, ApiKey(prefix="same"))
    with pytest.raises(IntegrityError):
        _add(engine, ApiKey(prefix="same"))


# --- engine construction ----------------------------------------------------------------------


def _pragmas(conn: Connection) -> tuple[str, int, int]:
    # Straight on the DB-API connection: no transaction, so no write lock is taken.
    raw = conn.connection.dbapi_connection
    assert raw is not None

    def one(sql: str) -> Any:
        return raw.execute(sql).fetchone()[0]  # type: ignore[attr-defined]

    return (one("PRAGMA journal_mode"), one("PRAGMA foreign_keys"), one("PRAGMA busy_timeout"))


def test_sqlite_pragmas_on_every_connection(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "headscale.sqlite"
    eng = make_engine("sqlite", sqlite_path=str(path))
    try:
        assert path.parent.is_dir()  # parent directories are created
        # Two connections open at once: both pooled connections carry the pragmas.
        with eng.connect() as c1, eng.connect() as c2:
            assert _pragmas(c1) == ("wal", 1, SQLITE_BUSY_TIMEOUT_MS)
            assert _pragmas(c2) == ("wal", 1, SQLITE_BUSY_TIMEOUT_MS)
        results: list[tuple[str, int, int]] = []

        def worker() -> None:
            with eng.connect() as c:
                results.append(_pragmas(c))

        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert results == [("wal", 1, SQLITE_BUSY_TIMEOUT_MS)]
    finally:
        eng.dispose()


def test_sqlite_wal_can_be_disabled(tmp_path: Path) -> None:
    eng = make_engine("sqlite", sqlite_path=str(tmp_path / "h.sqlite"), sqlite_wal=False)
    try:
        with eng.connect() as c:
            assert _pragmas(c) == ("delete", 1, SQLITE_BUSY_TIMEOUT_MS)
    finally:
        eng.dispose()


def test_sqlite_deferred_readers_run_alongside_a_writer(sqlite_engine: Engine) -> None:
    _add(sqlite_engine, User(name="r"))
    with sqlite_engine.begin() as writer:
        writer.execute(text("UPDATE users SET email = 'x'"))
        with sqlite_engine.connect().execution_options(sqlite_begin="DEFERRED") as reader:
            # WAL: the reader sees the last committed state without waiting for the writer.
            assert reader.execute(text("SELECT email FROM users")).scalar_one() == ""


def test_sqlite_writers_wait_instead_of_failing(tmp_path: Path) -> None:
    # BEGIN IMMEDIATE + busy_timeout: a second writer blocks until the first commits.
    eng = make_engine("sqlite", sqlite_path=str(tmp_path / "h.sqlite"))
    migrate(eng)
    try:
        done = threading.Event()

        def second_writer() -> None:
            _add(eng, User(name="second"))
            done.set()

        with eng.begin() as c1:
            c1.execute(text("INSERT INTO users (name) VALUES ('first')"))
            t = threading.Thread(target=second_writer)
            t.start()
            assert not done.wait(0.3)  # blocked behind our write transaction
        t.join(10)
        assert done.is_set()
        with Session(eng) as s:
            assert sorted(u.name for u in s.exec(select(User)).all()) == ["first", "second"]
    finally:
        eng.dispose()


def test_engine_from_config_sqlite(tmp_path: Path) -> None:
    cfg = DatabaseConfig.model_validate({
        "type": "sqlite3",
        "sqlite": {"path": str(tmp_path / "cfg" / "db.sqlite"), "write_ahead_log": True},
        "postgres": {"host": "unused", "port": 5432, "name": "x", "user": "x", "pass": "",
                     "ssl": "false"},
    })
    eng = engine_from_config(cfg)
    try:
        migrate(eng)
        with eng.connect() as c:
            assert _pragmas(c) == ("wal", 1, SQLITE_BUSY_TIMEOUT_MS)
        assert (tmp_path / "cfg" / "db.sqlite").is_file()
    finally:
        eng.dispose()


def test_engine_from_config_postgres(pg_server: PostgresServer) -> None:
    p = pg_server.create_database()
    cfg = DatabaseConfig.model_validate({
        "type": "postgres",
        "sqlite": {"path": "/nonexistent/unused.sqlite", "write_ahead_log": True},
        "postgres": {"host": p["host"], "port": p["port"], "name": p["name"],
                     "user": p["user"], "pass": p["password"], "ssl": "false"},
    })
    eng = engine_from_config(cfg)
    try:
        assert eng.url.drivername == "postgresql+psycopg"
        assert eng.url.query.get("sslmode") == "disable"
        migrate(eng)
        _add(eng, User(name="pg"))
        with eng.connect() as c:
            assert c.execute(text("SELECT name FROM users")).scalar_one() == "pg"
            assert c.execute(text("SHOW timezone")).scalar_one() == "UTC"
    finally:
        eng.dispose()


def test_postgres_wrong_password_fails(pg_server: PostgresServer) -> None:
    eng = pg_server.new_engine(password="wrong")
    try:
        with pytest.raises(Exception, match="password"), eng.connect():
            pass
    finally:
        eng.dispose()


@pytest.mark.parametrize(
    ("ssl", "sslmode"),
    [
        (False, "disable"),
        ("false", "disable"),
        (True, None),
        ("true", None),
        ("require", "require"),
        ("verify-full", "verify-full"),
    ],
)
def test_postgres_ssl_setting(ssl: bool | str, sslmode: str | None) -> None:
    eng = make_engine("postgres", pg_host="127.0.0.1", pg_ssl=ssl)
    assert eng.url.query.get("sslmode") == sslmode
    eng.dispose()


@pytest.mark.parametrize("bad", ["mysql", "", "sqlserver"])
def test_unknown_database_type(bad: str) -> None:
    with pytest.raises(DatabaseConfigError):
        make_engine(bad, sqlite_path="/tmp/x.sqlite")


def test_sqlite_needs_a_path() -> None:
    with pytest.raises(DatabaseConfigError):
        make_engine("sqlite")


def test_in_memory_sqlite_migrates() -> None:
    eng = make_engine("sqlite", sqlite_path=":memory:")
    try:
        migrate(eng)
        _add(eng, User(name="mem"))
    finally:
        eng.dispose()


def test_sqlite_file_is_headscale_shaped(sqlite_engine: Engine) -> None:
    with sqlite_engine.connect() as conn:
        ddl = conn.execute(
            text("SELECT sql FROM sqlite_master WHERE name = 'idx_pre_auth_keys_prefix'")
        ).scalar_one()
    assert re.search(r"WHERE prefix IS NOT NULL AND prefix != ''", ddl)


async def test_tailnet_persists_user_idp_groups(engine: Engine) -> None:
    # state/ writes the groups of each login through to users.idp_groups and reads them back.
    from pyheadscale.state.tailnet import Tailnet
    from tests.unit._statefix import make_cfg

    tn = await Tailnet.load(engine, make_cfg())
    ann = await tn.create_user("ann", provider_identifier="https://idp/ann", provider="oidc",
                               groups=["Eng Team"])
    bob = await tn.create_user("bob")
    await tn.update_user(bob.id, groups=("/ops", "Eng Team"))
    await tn.close()
    with engine.connect() as conn:
        stored = dict(conn.execute(text("SELECT name, idp_groups FROM users")).all())
    assert {k: json.loads(v) for k, v in stored.items()} == {
        "ann": ["Eng Team"], "bob": ["/ops", "Eng Team"]}

    tn = await Tailnet.load(engine, make_cfg())
    assert tn.get_user(ann.id).groups == ("Eng Team",)
    assert tn.get_user(bob.id).groups == ("/ops", "Eng Team")
    await tn.update_user(ann.id, groups=())  # left every group at the provider
    await tn.close()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT idp_groups FROM users WHERE name = 'ann'")).scalar() is None
    tn = await Tailnet.load(engine, make_cfg())
    assert tn.get_user(ann.id).groups == ()
    await tn.close()
