"""0003: Headscale 0.30's v2-API schema (OAuth clients and tokens, key description and
revocation, the API key's user) on both backends: rows round-trip, and a downgrade to 0002
drops exactly what 0003 added while keeping every other row."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from sqlalchemy import Engine, inspect
from sqlmodel import Session, select

from pyheadscale.db.engine import alembic_config, make_engine, migrate
from pyheadscale.db.models import ApiKey, OAuthAccessToken, OAuthClient, PreAuthKey, User
from tests.db.test_migrations import assert_headscale_schema, schema_diff

NOW = datetime(2026, 12, 6, 12, 0, 0, 123456, tzinfo=UTC)


def test_oauth_rows_round_trip(engine: Engine) -> None:
    with Session(engine) as s:
        s.add(OAuthClient(client_id="0123456789ab", secret_hash=b"$argon2id$v=19$x",
                          scopes=["auth_keys", "devices:core"], tags=["tag:k8s"],
                          description="operator", user_id=7, created_at=NOW))
        s.add(OAuthAccessToken(prefix="ba9876543210", hash=b"$argon2id$v=19$y",
                               client_id="0123456789ab", scopes=["auth_keys"], tags=[],
                               expiration=NOW, created_at=NOW))
        s.add(PreAuthKey(prefix="abcdefabcdef", description="pod", revoked=NOW))
        s.add(ApiKey(prefix="cafecafecafe", user_id=3))
        s.commit()
    with engine.connect() as conn:
        raw = conn.execute(sa.text("SELECT scopes, tags FROM oauth_clients")).one()
    assert tuple(raw) == ('["auth_keys","devices:core"]', '["tag:k8s"]')  # JSON text
    with Session(engine) as s:
        c = s.exec(select(OAuthClient)).one()
        assert (c.scopes, c.tags, c.user_id, c.created_at, c.revoked) == (
            ["auth_keys", "devices:core"], ["tag:k8s"], 7, NOW, None)
        t = s.exec(select(OAuthAccessToken)).one()
        assert (t.client_id, t.expiration, t.hash) == ("0123456789ab", NOW, b"$argon2id$v=19$y")
        k = s.exec(select(PreAuthKey)).one()
        assert (k.description, k.revoked) == ("pod", NOW)
        assert s.exec(select(ApiKey)).one().user_id == 3


def test_client_id_and_token_prefix_are_unique(engine: Engine) -> None:
    for table, col in (("oauth_clients", "client_id"), ("oauth_access_tokens", "prefix")):
        with engine.begin() as conn:
            conn.execute(sa.text(f"INSERT INTO {table} ({col}) VALUES ('x')"))
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(f"INSERT INTO {table} ({col}) VALUES ('x')"))
        except sa.exc.IntegrityError:
            continue
        raise AssertionError(f"{table}.{col} accepted a duplicate")


def test_downgrade_to_0002_and_back(engine: Engine) -> None:
    with Session(engine) as s:
        u = User(name="ann")
        s.add(u)
        s.commit()
        s.add(PreAuthKey(prefix="abcdefabcdef", user_id=u.id, description="d", revoked=NOW))
        s.add(OAuthClient(client_id="0123456789ab"))
        s.commit()
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0002")
    insp = inspect(engine)
    assert not {"oauth_clients", "oauth_access_tokens"} & set(insp.get_table_names())
    assert "description" not in {c["name"] for c in insp.get_columns("pre_auth_keys")}
    assert "user_id" not in {c["name"] for c in insp.get_columns("api_keys")}
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT prefix FROM pre_auth_keys")).all() == [
            ("abcdefabcdef",)]
    migrate(engine)
    assert_headscale_schema(engine)
    assert schema_diff(engine) == []
    with Session(engine) as s:
        k = s.exec(select(PreAuthKey)).one()
        assert (k.prefix, k.description, k.revoked) == ("abcdefabcdef", None, None)


# Headscale's development line (0.30) on SQLite: 0.29's tables with its v2 columns in place
# and the OAuth tables (DDL as its schema.sql), plus one OAuth client row.
HEADSCALE_030_EXTRA = """
ALTER TABLE pre_auth_keys ADD COLUMN description text;
ALTER TABLE pre_auth_keys ADD COLUMN revoked datetime;
ALTER TABLE api_keys ADD COLUMN user_id integer;
CREATE TABLE oauth_clients(
  id integer PRIMARY KEY AUTOINCREMENT, client_id text, secret_hash blob, scopes text,
  tags text, description text, user_id integer, created_at datetime, revoked datetime);
CREATE UNIQUE INDEX idx_oauth_clients_client_id ON oauth_clients(client_id);
CREATE TABLE oauth_access_tokens(
  id integer PRIMARY KEY AUTOINCREMENT, prefix text, hash blob, client_id text, scopes text,
  tags text, expiration datetime, created_at datetime);
CREATE UNIQUE INDEX idx_oauth_access_tokens_prefix ON oauth_access_tokens(prefix);
INSERT INTO oauth_clients (client_id, secret_hash, scopes, tags, description, created_at)
  VALUES ('0123456789ab', X'2461', '["auth_keys"]', '["tag:k8s"]', 'op',
          '2026-07-01 00:00:00+00:00');
"""


def test_adopts_a_headscale_030_sqlite_database(tmp_path: Path) -> None:
    from tests.db.test_migrations import HEADSCALE_029_DDL, HEADSCALE_029_ROWS

    path = tmp_path / "headscale.sqlite"
    raw = sqlite3.connect(path)
    raw.executescript(HEADSCALE_029_DDL + HEADSCALE_029_ROWS + HEADSCALE_030_EXTRA)
    raw.close()
    eng = make_engine("sqlite", sqlite_path=str(path))
    try:
        migrate(eng)
        # Only pyheadscale's own users.idp_groups was missing; nothing else is different.
        assert schema_diff(eng, ignore_pk_nullable=True) == []
        with Session(eng) as s:
            c = s.exec(select(OAuthClient)).one()
            assert (c.client_id, c.scopes, c.tags) == ("0123456789ab", ["auth_keys"], ["tag:k8s"])
    finally:
        eng.dispose()
