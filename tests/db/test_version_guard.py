"""A database from a newer Headscale (or pyheadscale) is refused and left as it is; the
stored version is never rewritten downwards; SQLite files are private."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest
from sqlalchemy import Engine

from pyheadscale.db.engine import HEADSCALE_COMPAT_VERSION, MigrationError, make_engine, migrate
from tests.db.test_migrations import HEADSCALE_029_DDL, HEADSCALE_029_ROWS


def headscale_db(tmp_path: Path, version: str) -> Path:
    path = tmp_path / "hs.sqlite"
    raw = sqlite3.connect(path)
    raw.executescript(HEADSCALE_029_DDL + HEADSCALE_029_ROWS)
    raw.execute("UPDATE database_versions SET version = ? WHERE id = 1", (version,))
    raw.commit()
    raw.close()
    return path


def stored(path: Path) -> tuple[str, bool]:
    raw = sqlite3.connect(path)
    try:
        v = raw.execute("SELECT version FROM database_versions WHERE id = 1").fetchone()[0]
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        return v, "alembic_version" in tables
    finally:
        raw.close()


def dump(path: Path) -> list[str]:
    raw = sqlite3.connect(path)
    try:
        return list(raw.iterdump())
    finally:
        raw.close()


def run_migrate(path: Path) -> None:
    eng = make_engine("sqlite", sqlite_path=str(path))
    try:
        migrate(eng)
    finally:
        eng.dispose()


@pytest.mark.parametrize("version", ["v0.30.0", "v0.30.1-beta.1", "0.31.2", "v1.0.0"])
def test_newer_headscale_database_is_refused_and_untouched(tmp_path: Path, version: str) -> None:
    path = headscale_db(tmp_path, version)
    before = dump(path)
    with pytest.raises(MigrationError, match="never migrated downwards"):
        run_migrate(path)
    assert stored(path) == (version, False)
    assert dump(path) == before  # (the connection's WAL pragma may touch the file header)


def test_same_minor_newer_patch_is_adopted_and_keeps_its_version(tmp_path: Path) -> None:
    path = headscale_db(tmp_path, "v0.29.9")
    run_migrate(path)
    assert stored(path) == ("v0.29.9", True)


@pytest.mark.parametrize("version,accepted", [("v0.28.0", True), ("v0.27.1", False),
                                              ("dev", True), ("banana", False)])
def test_other_stored_versions(tmp_path: Path, version: str, accepted: bool) -> None:
    path = headscale_db(tmp_path, version)
    if accepted:
        run_migrate(path)
        assert stored(path) == (HEADSCALE_COMPAT_VERSION, True)
    else:
        with pytest.raises(MigrationError):
            run_migrate(path)
        assert stored(path) == (version, False)


def test_unknown_schema_revision_is_refused(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'f00dfeed9999'")
    with pytest.raises(MigrationError, match="newer pyheadscale"):
        migrate(engine)


def test_sqlite_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "new" / "db.sqlite"
    eng = make_engine("sqlite", sqlite_path=str(path))
    migrate(eng)
    eng.dispose()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    for f in path.parent.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    old = tmp_path / "old.sqlite"
    old.touch()
    os.chmod(old, 0o644)
    make_engine("sqlite", sqlite_path=str(old)).dispose()
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
