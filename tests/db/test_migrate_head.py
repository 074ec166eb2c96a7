"""The server never holds alembic: a database already at the newest revision is checked with a
plain query (the revision the package records as its head must be alembic's own head, and the
shortcut must keep every check), and a migration that is due runs in a child process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

from pyheadscale.config.schema import DatabaseConfig
from pyheadscale.db.engine import (
    HEAD_REVISION,
    HEADSCALE_COMPAT_VERSION,
    MIGRATE_LOCK,
    MigrationError,
    alembic_config,
    at_head,
    engine_from_config,
    make_engine,
    migrate,
)
from pyheadscale.db.migrator import migrate_apart
from tests.pgserver import PostgresServer

REPO = Path(__file__).resolve().parents[2]


def test_head_revision_is_alembics_head() -> None:
    # A new migration under migrations/versions moves alembic's head: HEAD_REVISION must follow,
    # or a database at the old head would be taken as current and never upgraded.
    script = ScriptDirectory.from_config(alembic_config())
    assert script.get_heads() == [HEAD_REVISION]


def _migrate_in_fresh_process(path: Path) -> str:
    """Run migrate() on the SQLite file in a new interpreter; prints whether alembic got
    imported (this process has it loaded already)."""
    code = textwrap.dedent(f"""
        import sys
        from pyheadscale.db.engine import make_engine, migrate
        eng = make_engine("sqlite", sqlite_path={str(path)!r})
        migrate(eng)
        eng.dispose()
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("alembic", "mako"))[:3])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=REPO, check=True)
    return r.stdout.strip()


def test_database_at_head_is_not_migrated_with_alembic(tmp_path: Path) -> None:
    path = tmp_path / "headscale.sqlite"
    first = _migrate_in_fresh_process(path)  # a new file: alembic creates the schema
    assert first.startswith("['alembic")
    assert _migrate_in_fresh_process(path) == "[]"


def test_database_behind_head_is_still_upgraded(tmp_path: Path) -> None:
    eng = make_engine("sqlite", sqlite_path=str(tmp_path / "headscale.sqlite"))
    try:
        migrate(eng)
        from alembic import command

        with eng.begin() as conn:
            command.downgrade(alembic_config(conn), "-1")
            assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() \
                != HEAD_REVISION
        migrate(eng)
        with eng.connect() as conn:
            assert conn.exec_driver_sql(
                "SELECT version_num FROM alembic_version").scalar() == HEAD_REVISION
    finally:
        eng.dispose()


def test_database_at_head_still_refuses_a_newer_headscale(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE database_versions SET version = 'v0.30.0' WHERE id = 1")
    with pytest.raises(MigrationError, match="newer than"):
        migrate(engine)
    with engine.connect() as conn:
        assert conn.exec_driver_sql(
            "SELECT version FROM database_versions WHERE id = 1").scalar() == "v0.30.0"


def test_database_at_head_records_our_version(engine: Engine) -> None:
    migrate(engine, version="v0.29.3")
    with engine.connect() as conn:
        assert conn.exec_driver_sql(
            "SELECT version FROM database_versions WHERE id = 1").scalar() == "v0.29.3"


def _sqlite_config(path: Path) -> DatabaseConfig:
    return DatabaseConfig.model_validate({"type": "sqlite", "sqlite": {"path": str(path)}})


def test_server_migrates_a_new_database_in_a_child_process(tmp_path: Path) -> None:
    path = tmp_path / "headscale.sqlite"
    code = textwrap.dedent(f"""
        import sys
        from pyheadscale.config.schema import DatabaseConfig
        from pyheadscale.db.engine import engine_from_config
        from pyheadscale.db.migrator import migrate_apart
        cfg = DatabaseConfig.model_validate({{"type": "sqlite", "sqlite": {{"path": {str(path)!r}}}}})
        eng = engine_from_config(cfg)
        migrate_apart(eng, cfg)
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("alembic", "mako"))[:3])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=REPO, check=True)
    assert r.stdout.strip() == "[]"
    eng = make_engine("sqlite", sqlite_path=str(path))
    try:
        with eng.connect() as conn:
            assert conn.exec_driver_sql(
                "SELECT version_num FROM alembic_version").scalar() == HEAD_REVISION
            assert conn.exec_driver_sql(
                "SELECT version FROM database_versions WHERE id = 1").scalar() \
                == HEADSCALE_COMPAT_VERSION
    finally:
        eng.dispose()


def test_child_process_refusal_reaches_the_server(tmp_path: Path) -> None:
    path = tmp_path / "headscale.sqlite"
    cfg = _sqlite_config(path)
    eng = engine_from_config(cfg)
    try:
        migrate(eng)
        with eng.begin() as conn:
            conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'f00dfeed9999'")
        with pytest.raises(MigrationError, match="newer pyheadscale"):
            migrate_apart(eng, cfg)
    finally:
        eng.dispose()


def test_child_ignores_modules_in_the_servers_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A server started from a directory holding a stray sqlalchemy.py must not have its
    # migration child import it.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "sqlalchemy.py").write_text("raise SystemExit('stray sqlalchemy.py imported')\n")
    monkeypatch.chdir(cwd)
    cfg = _sqlite_config(tmp_path / "headscale.sqlite")
    eng = engine_from_config(cfg)
    try:
        migrate_apart(eng, cfg)
        assert at_head(eng)
    finally:
        eng.dispose()


def test_child_reports_bad_settings_as_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-P", "-m", "pyheadscale.db.migrator"],
                       input='{"type": "sqlite", "sqlite": {"path": ["x"]}}', capture_output=True,
                       text=True, timeout=120, cwd=tmp_path, check=False)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("invalid database settings: sqlite.path: "), lines[0]
    assert "further information" not in lines[0]


def test_in_memory_database_migrates_in_process() -> None:
    # A child cannot see this process's memory database: it is migrated here.
    cfg = _sqlite_config(Path(":memory:"))
    eng = engine_from_config(cfg)
    try:
        migrate_apart(eng, cfg)
        assert at_head(eng)
    finally:
        eng.dispose()


def test_database_at_head_waits_for_the_migration_lock_on_postgres(
        pg_server: PostgresServer) -> None:
    # Two instances starting together on a database at head: the version check and write
    # must run under the same advisory lock as a migration, or the recorded version can go
    # backwards. Hold the lock elsewhere and see migrate() queue behind it.
    eng = pg_server.new_engine(pool_size=2)
    try:
        migrate(eng)
        done = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                migrate(eng, version="v0.29.3")
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)
            finally:
                done.set()

        with eng.connect() as holder:
            holder.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATE_LOCK})
            worker = threading.Thread(target=run)
            worker.start()
            waited = False
            for _ in range(600):  # up to 30 s for the worker to reach the lock
                waited = bool(holder.execute(text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                )).scalar())
                if waited or done.is_set():
                    break
                time.sleep(0.05)
            holder.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATE_LOCK})
            holder.commit()
        worker.join(60)
        assert not errors
        assert waited, "migrate() at head did not take the migration lock"
        with eng.connect() as conn:
            assert conn.exec_driver_sql(
                "SELECT version FROM database_versions WHERE id = 1").scalar() == "v0.29.3"
    finally:
        eng.dispose()
        assert eng.url.database is not None
        pg_server.drop_database(eng.url.database)
