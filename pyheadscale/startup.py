"""Start-up failures as one line naming the config key behind them.

A server that cannot start (a port in use, an unreadable key or certificate, a database it
cannot open, no DERP region) says so in the shape every configuration error has,
`config: <key>: <problem>`, and exits 1: the admin learns which key to fix, not where in
our code the exception was raised.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

from pyheadscale.config.errors import ConfigError, key_error

# psycopg's SQLSTATEs for a refused login, by the key that is wrong.
_PG_STATES = {"28P01": "database.postgres.pass", "28000": "database.postgres.user",
              "3D000": "database.postgres.name"}


def one_line(e: BaseException) -> str:
    """An exception's message on one line (OSError: its strerror and file name)."""
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror
        if e.errno == errno.EADDRINUSE:
            text = "address already in use"
        if e.filename:
            text = f"{e.filename}: {text}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


@contextmanager
def failing_key(key: str, doing: str) -> Iterator[None]:
    """Any failure inside becomes `config: <key>: <doing>: <reason>`."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:  # the step is specific enough that its key is the cause
        raise key_error(key, f"{doing}: {one_line(e)}") from e


def database_key(db_type: str, e: BaseException) -> str:
    """The key to blame for a database that cannot be opened."""
    if db_type != "postgres":
        return "database.sqlite.path"
    cause: BaseException | None = e
    while cause is not None:
        state = getattr(cause, "sqlstate", None)
        if isinstance(state, str) and state in _PG_STATES:
            return _PG_STATES[state]
        cause = cause.__cause__ or getattr(cause, "orig", None)
    return "database.postgres.host"


@contextmanager
def database_step(db_type: str, doing: str) -> Iterator[None]:
    """Like failing_key, with the key chosen from the database error."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:  # SQLAlchemy wraps the driver's error in .orig; its first line
        cause = getattr(e, "orig", None) or e
        first = (one_line(cause) if isinstance(cause, OSError)
                 else (str(cause).strip().splitlines() or [type(cause).__name__])[0])
        raise key_error(database_key(db_type, e), f"{doing}: {' '.join(first.split())}") from e
