"""The server's schema migration, run in a short-lived process of its own when one is due.

alembic and mako stay resident once imported (~10 MiB of a 1,000-node server's ~200), and
a server needs them only at the start that finds its database behind (a new database, an
upgrade). So the server checks the revision with a plain query (``migrate`` takes that
shortcut by itself) and, only when a migration is due, runs ``migrate`` here in a child
(``python -m pyheadscale.db.migrator``, the database section as JSON on stdin): the same
function, locks and checks, in a process that exits when it is done.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy import Engine

import pyheadscale
from pyheadscale.config.schema import DatabaseConfig
from pyheadscale.db.engine import MigrationError, at_head, engine_from_config, migrate

log = logging.getLogger("pyheadscale.db")
# The directory holding the pyheadscale package this process runs.
_PACKAGE_ROOT = str(Path(pyheadscale.__file__).resolve().parent.parent)
_REFUSED = 3  # the child's exit status for a MigrationError; any error's text is stderr's
# last line


def migrate_apart(engine: Engine, db_cfg: DatabaseConfig) -> None:
    """``migrate(engine)`` with any alembic work done in a child process."""
    memory = engine.dialect.name == "sqlite" and engine.url.database in (None, "", ":memory:")
    if not memory and not at_head(engine):
        t = time.monotonic()
        # -P: the server's working directory stays off sys.path, so a stray pyheadscale/ or
        # sqlalchemy.py there is not what the child imports; the directory this process
        # loaded pyheadscale from goes first instead (a source checkout run uninstalled).
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        r = subprocess.run([sys.executable, "-P", "-m", "pyheadscale.db.migrator"],
                           input=db_cfg.model_dump_json(by_alias=True), capture_output=True,
                           text=True, check=False, env=env)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
            raise MigrationError(last if r.returncode == _REFUSED
                                 else f"the schema migration failed: {last}")
        log.debug("database schema migrated in %.1fs", time.monotonic() - t)
    # At head now (or an in-memory database, which only this process can see): the checks
    # and the version record without alembic; anything else still migrates here.
    migrate(engine)


def _one_line(e: ValidationError) -> str:
    return "invalid database settings: " + "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'input'}: {err['msg']}" for err in e.errors())


def main() -> int:
    engine: Engine | None = None
    try:
        db_cfg = DatabaseConfig.model_validate_json(sys.stdin.read())
        engine = engine_from_config(db_cfg)
        migrate(engine)
    except ValidationError as e:
        print(_one_line(e).replace("\n", " "), file=sys.stderr)
        return 1
    except MigrationError as e:
        print(str(e).replace("\n", " "), file=sys.stderr)
        return _REFUSED
    except Exception as e:  # the server reports it as one line (its last on stderr)
        print(f"{type(e).__name__}: {e}".replace("\n", " "), file=sys.stderr)
        return 1
    finally:
        if engine is not None:
            engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
