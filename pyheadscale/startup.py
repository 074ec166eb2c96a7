"""Start-up failures as one line naming the config key behind them.

A server that cannot start (a port in use, an unreadable key or certificate, a database it
cannot open, no DERP region) says so in the shape every configuration error has,
`config: <key>: <problem>`, and exits 1: the admin learns which key to fix, not where in
our code the exception was raised.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

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
def _blaming(key_of: Callable[[Exception], str], doing: str,
             reason: Callable[[Exception], str]) -> Iterator[None]:
    """Any failure inside (a ConfigError passes as it is) becomes
    `config: <key_of(e)>: <doing>: <reason(e)>`."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:
        raise key_error(key_of(e), f"{doing}: {reason(e)}") from e


def failing_key(key: str, doing: str) -> AbstractContextManager[None]:
    """Any failure inside becomes `config: <key>: <doing>: <reason>`: the step is specific
    enough that its key is the cause."""
    return _blaming(lambda _e: key, doing, one_line)


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


def _database_reason(e: Exception) -> str:
    # SQLAlchemy wraps the driver's error in .orig; its first line is the driver's message.
    cause = getattr(e, "orig", None) or e
    first = (one_line(cause) if isinstance(cause, OSError)
             else (str(cause).strip().splitlines() or [type(cause).__name__])[0])
    return " ".join(first.split())


def database_step(db_type: str, doing: str) -> AbstractContextManager[None]:
    """Like failing_key, with the key chosen from the database error."""
    return _blaming(lambda e: database_key(db_type, e), doing, _database_reason)
