"""Headscale's database tuning keys take effect on both backends: the pool sizes, prepared
statements, slow-query warnings without parameters, SQL logging, wal_autocheckpoint."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from pyheadscale.config.schema import DatabaseConfig
from pyheadscale.db.engine import engine_from_config
from tests.pgserver import PostgresServer

SLOW_SQL = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :top) "
            "SELECT count(*) FROM n")


def db_config(backend: str, tmp_path: Path, request: pytest.FixtureRequest,
              **overrides: Any) -> DatabaseConfig:
    raw: dict[str, Any] = {"type": backend, **overrides}
    if backend == "sqlite":
        raw.setdefault("sqlite", {})["path"] = str(tmp_path / "db.sqlite")
    else:
        pg: PostgresServer = request.getfixturevalue("pg_server")
        p = pg.create_database()
        raw.setdefault("postgres", {}).update(host=p["host"], port=p["port"], name=p["name"],
                                              user=p["user"], **{"pass": p["password"]})
    return DatabaseConfig.model_validate(raw)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
@pytest.mark.parametrize("hide", [True, False])
def test_slow_threshold_warns_and_parameterized_queries_hides_values(
        backend: str, hide: bool, tmp_path: Path, request: pytest.FixtureRequest,
        caplog: pytest.LogCaptureFixture) -> None:
    cfg = db_config(backend, tmp_path, request,
                    gorm={"slow_threshold": 1, "parameterized_queries": hide})
    engine = engine_from_config(cfg)
    try:
        with caplog.at_level(logging.WARNING, logger="pyheadscale.db"), engine.connect() as c:
            c.execute(text("SELECT 1")).scalar_one()
            c.execute(text(SLOW_SQL), {"top": 300_000}).scalar_one()
    finally:
        engine.dispose()
    slow = [r for r in caplog.records if r.getMessage() == "slow SQL"]
    assert slow, "a 300k-row recursive query took under 1 ms?"
    fields = slow[-1].fields  # type: ignore[attr-defined]
    assert "WITH RECURSIVE" in fields["sql"] and float(fields["elapsed"][:-2]) >= 1
    assert ("params" in fields) is not hide
    if not hide:
        assert "300000" in fields["params"]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_no_slow_warnings_when_threshold_is_zero(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest,
        caplog: pytest.LogCaptureFixture) -> None:
    engine = engine_from_config(db_config(backend, tmp_path, request, gorm={"slow_threshold": 0}))
    try:
        with caplog.at_level(logging.WARNING, logger="pyheadscale.db"), engine.connect() as c:
            c.execute(text(SLOW_SQL), {"top": 300_000}).scalar_one()
    finally:
        engine.dispose()
    assert not [r for r in caplog.records if r.getMessage() == "slow SQL"]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_debug_logs_statements(backend: str, tmp_path: Path, request: pytest.FixtureRequest,
                               caplog: pytest.LogCaptureFixture) -> None:
    engine = engine_from_config(db_config(backend, tmp_path, request, debug=True))
    try:
        with caplog.at_level(logging.DEBUG), engine.connect() as c:
            c.execute(text("SELECT 42 AS answer")).scalar_one()
    finally:
        engine.dispose()
        logging.getLogger("sqlalchemy.engine.Engine").setLevel(logging.NOTSET)
    assert any("SELECT 42 AS answer" in r.getMessage() for r in caplog.records
               if r.name.startswith("sqlalchemy.engine"))


@pytest.mark.parametrize("pages", [0, 250])
def test_wal_autocheckpoint(pages: int, tmp_path: Path,
                            request: pytest.FixtureRequest) -> None:
    cfg = db_config("sqlite", tmp_path, request, sqlite={"wal_autocheckpoint": pages})
    engine = engine_from_config(cfg)
    try:
        with engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one() == pages
    finally:
        engine.dispose()


@pytest.mark.parametrize("prepare", [True, False])
def test_prepare_stmt(prepare: bool, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    engine = engine_from_config(db_config("postgres", tmp_path, request,
                                          gorm={"prepare_stmt": prepare}))
    try:
        with engine.connect() as c:
            raw = c.connection.dbapi_connection
            assert raw is not None
            # psycopg prepares after 5 executions by default; None: never.
            assert (raw.prepare_threshold is None) is not prepare
    finally:
        engine.dispose()


def test_postgres_pool_follows_go_limits(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    cfg = db_config("postgres", tmp_path, request, postgres={
        "max_open_conns": 7, "max_idle_conns": 3, "conn_max_idle_time_secs": 60})
    engine = engine_from_config(cfg)
    try:
        pool: Any = engine.pool
        assert (pool.size(), pool._max_overflow, pool._recycle) == (3, 4, 60)
        conns = [engine.connect() for _ in range(7)]  # max_open connections at once
        for c in conns:
            c.close()
    finally:
        engine.dispose()
