"""Fixtures giving fresh databases on both backends.

`empty_engine` / `engine` are parametrized over sqlite and postgres. The PostgreSQL server is
started once per session (tests/pgserver.py) and each test gets its own new database in it.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from pyheadscale.db.engine import make_engine, migrate
from tests.pgserver import PostgresServer

BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    with PostgresServer() as pg:
        yield pg


@pytest.fixture(params=BACKENDS)
def empty_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A fresh, unmigrated database."""
    if request.param == "sqlite":
        eng = make_engine("sqlite", sqlite_path=str(tmp_path / "state" / "headscale.sqlite"))
        yield eng
        eng.dispose()
        return
    pg: PostgresServer = request.getfixturevalue("pg_server")
    eng = pg.new_engine(pool_size=2)
    yield eng
    eng.dispose()
    assert eng.url.database is not None
    pg.drop_database(eng.url.database)


@pytest.fixture
def engine(empty_engine: Engine) -> Engine:
    """A fresh database migrated to head."""
    migrate(empty_engine)
    return empty_engine


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    eng = make_engine("sqlite", sqlite_path=str(tmp_path / "state" / "headscale.sqlite"))
    migrate(eng)
    yield eng
    eng.dispose()
