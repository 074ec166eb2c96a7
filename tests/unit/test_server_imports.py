"""What a single SQLite instance without OIDC must not hold: each of these libraries stays
resident once imported, and the server loads it only when its feature is configured (a
migration runs in a child process: tests/db/test_migrate_head.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# authlib + joserfc: OIDC login (~4 MiB); alembic + mako: migrations (~7-10 MiB);
# psycopg: the cluster; acme + requests: Let's Encrypt.
NOT_AT_START = ("authlib", "joserfc", "alembic", "mako", "psycopg", "acme", "requests")


def test_server_modules_leave_optional_libraries_out() -> None:
    code = ("import sys, pyheadscale.app, pyheadscale.cli; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({NOT_AT_START!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=REPO, check=True)
    assert r.stdout.strip() == "[]"

