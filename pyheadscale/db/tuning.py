"""What Headscale's database keys ask of its Go ORM (gorm) and connection pool, done with
SQLAlchemy: `database.debug`, `database.gorm.*`, `database.sqlite.wal_autocheckpoint` and the
PostgreSQL pool sizes.

- `debug`: every SQL statement is logged (logger `sqlalchemy.engine`, info).
- `gorm.slow_threshold` (ms, 0 = off): a statement slower than that is logged as a warning.
- `gorm.parameterized_queries`: logged statements never show their parameters.
- `gorm.prepare_stmt`: statements are prepared and cached (psycopg prepares a statement after
  a few executions, sqlite3 keeps a cache); false turns that off.
- `gorm.skip_err_record_not_found`: pyheadscale logs no error for a lookup that finds nothing,
  which is what `true` asks; `false` has no such lines to add.
- `postgres.max_open_conns` / `max_idle_conns`: the pool keeps `max_idle` connections and
  opens up to `max_open`; `conn_max_idle_time_secs` becomes the pool's recycle age (SQLAlchemy
  has no idle timeout: a connection older than that is replaced on its next checkout).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, event

from pyheadscale.logs import fields

log = logging.getLogger("pyheadscale.db")
_START = "pyheadscale_query_start"


@dataclass(frozen=True)
class PoolSettings:
    size: int  # connections kept open (Go's max idle)
    overflow: int  # more, opened on demand up to Go's max open; -1: no limit
    recycle: int  # seconds; -1: never


def pool_settings(max_open: int, max_idle: int, idle_seconds: int) -> PoolSettings:
    """Go's database/sql limits as SQLAlchemy's QueuePool sizes (which has no 'zero idle':
    at least one connection is kept)."""
    size = max(1, max_idle if max_open <= 0 else min(max_idle, max_open))
    overflow = -1 if max_open <= 0 else max(max_open - size, 0)
    return PoolSettings(size, overflow, idle_seconds if idle_seconds > 0 else -1)


def tune(engine: Engine, *, debug: bool, slow_threshold_ms: int, hide_parameters: bool,
         wal_autocheckpoint: int | None) -> None:
    """Install the logging and SQLite settings on a new engine."""
    if debug:
        logging.getLogger("sqlalchemy.engine.Engine").setLevel(logging.INFO)
    if wal_autocheckpoint is not None:
        pages = max(int(wal_autocheckpoint), 0)

        @event.listens_for(engine, "connect")
        def _checkpoint(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.execute(f"PRAGMA wal_autocheckpoint = {pages}")

    if slow_threshold_ms > 0:
        threshold = slow_threshold_ms / 1000

        @event.listens_for(engine, "before_cursor_execute")
        def _start(conn: Any, cursor: Any, statement: str, params: Any, context: Any,
                   executemany: bool) -> None:
            conn.info.setdefault(_START, []).append(time.monotonic())

        @event.listens_for(engine, "after_cursor_execute")
        def _stop(conn: Any, cursor: Any, statement: str, params: Any, context: Any,
                  executemany: bool) -> None:
            started = conn.info.get(_START)
            if not started:
                return
            elapsed = time.monotonic() - started.pop()
            if elapsed >= threshold:
                extra: dict[str, object] = {"elapsed": f"{elapsed * 1000:.1f}ms",
                                            "sql": " ".join(statement.split())[:2000]}
                if not hide_parameters:
                    extra["params"] = repr(params)[:1000]
                log.warning("slow SQL", extra=fields(**extra))
