"""A throwaway PostgreSQL server for tests, built from Debian's server binaries.

Independent of pytest. Usage:

    with PostgresServer() as pg:
        params = pg.create_database("t1")   # dict: host, port, name, user, password
        dsn = pg.dsn("t1")

The cluster lives in a fresh temp directory, listens on 127.0.0.1 on a free port, runs as the
unprivileged `postgres` OS user when we are root (initdb refuses root), uses password auth, and
is stopped and deleted on exit. Missing binaries raise PgServerError: tests must fail, not skip.

With `netns`, the server runs inside that network namespace and listens on `listen` (an
address of the namespace, port 5432 unless given); the test process still reaches it through
its unix socket, which lives in the temp directory (sockets are files, not network objects).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import ipaddress
import os
import pwd
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from pyheadscale.db.engine import make_engine
from tests.netutil import free_port

__all__ = ["PgServerError", "PostgresServer", "find_pg_bindir"]

_SUPERUSER = "postgres"
_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PgServerError(RuntimeError):
    """The PostgreSQL test server could not be started or used."""


def find_pg_bindir() -> Path:
    """The newest /usr/lib/postgresql/<ver>/bin holding initdb and pg_ctl (or $PG_BINDIR)."""
    override = os.environ.get("PG_BINDIR")
    dirs = [override] if override else []

    def ver(p: str) -> float:
        m = re.search(r"/postgresql/(\d+(?:\.\d+)?)/bin", p)
        return float(m.group(1)) if m else 0.0

    dirs += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=ver, reverse=True)
    for d in dirs:
        p = Path(d)
        if (p / "initdb").is_file() and (p / "pg_ctl").is_file():
            return p
    raise PgServerError(
        "PostgreSQL server binaries not found (need /usr/lib/postgresql/<ver>/bin/initdb and "
        "pg_ctl; apt-get install postgresql, or set PG_BINDIR)"
    )


class PostgresServer:
    def __init__(self, *, bindir: Path | None = None, start_timeout: float = 60.0,
                 netns: str | None = None, listen: str = "127.0.0.1",
                 port: int | None = None) -> None:
        self.bindir = bindir or find_pg_bindir()
        self.start_timeout = start_timeout
        self.netns = netns
        self.host = listen
        self.port = port or (5432 if netns else 0)
        self.user = _SUPERUSER
        self.password = secrets.token_hex(16)
        self.tmpdir: Path | None = None
        self._running = False
        self._as_user: list[str] = []
        self._su: str | None = None
        self._uid: int | None = None
        self._gid: int | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._running:
            return
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam(_SUPERUSER)
            except KeyError as e:
                raise PgServerError("running as root but there is no 'postgres' OS user") from e
            self._uid, self._gid = pw.pw_uid, pw.pw_gid
            runuser = shutil.which("runuser")
            if runuser is not None:
                self._as_user = [runuser, "-u", _SUPERUSER, "--"]
            else:
                self._su = shutil.which("su")
                if self._su is None:
                    raise PgServerError("need runuser or su to drop root for initdb")
        self.tmpdir = Path(tempfile.mkdtemp(prefix="pyhs-pg-"))
        atexit.register(self.stop)
        try:
            self._initdb()
            self._start_server()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.tmpdir is None:
            return
        if self._running:
            with contextlib.suppress(Exception):
                self._run(
                    [
                        str(self.bindir / "pg_ctl"),
                        "-D",
                        str(self.datadir),
                        "-m",
                        "immediate",
                        "-w",
                        "-t",
                        "30",
                        "stop",
                    ],
                    timeout=60,
                )
            self._running = False
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        self.tmpdir = None
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    # -- helpers ---------------------------------------------------------------------------

    @property
    def datadir(self) -> Path:
        assert self.tmpdir is not None
        return self.tmpdir / "data"

    def _chown(self, path: Path) -> None:
        if self._uid is not None and self._gid is not None:
            os.chown(path, self._uid, self._gid)

    def _run(self, argv: list[str], *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        if self._su is not None:
            argv = [self._su, _SUPERUSER, "-s", "/bin/sh", "-c", shlex.join(argv)]
        else:
            argv = self._as_user + argv
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(self.tmpdir),
            env={**os.environ, "LC_ALL": "C", "LANG": "C"},
        )
        if proc.returncode != 0:
            raise PgServerError(
                f"{Path(argv[0]).name} {' '.join(argv[1:4])}... failed "
                f"(rc={proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc

    def _initdb(self) -> None:
        assert self.tmpdir is not None
        # mkdtemp gives 0700 root-owned; hand the whole directory to the server's user.
        os.chmod(self.tmpdir, 0o700)
        self._chown(self.tmpdir)
        pwfile = self.tmpdir / "pwfile"
        pwfile.write_text(self.password + "\n")
        os.chmod(pwfile, 0o600)
        self._chown(pwfile)
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                _SUPERUSER,
                "--pwfile",
                str(pwfile),
                "--auth",
                "scram-sha-256",
                "-E",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",
            ]
        )
        pwfile.unlink()
        if self.netns is not None:
            # Clients come from the namespace's own network (initdb allows only loopback).
            net = ipaddress.ip_network(f"{self.host}/24", strict=False)
            with open(self.datadir / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {net} scram-sha-256\n")

    def _start_server(self) -> None:
        assert self.tmpdir is not None
        last_err: Exception | None = None
        # The port is picked before the server binds it; retry if someone else grabbed it.
        fixed = self.port != 0
        for _ in range(1 if fixed else 3):
            if not fixed:
                self.port = free_port()
            try:
                self._pg_ctl_start()
            except PgServerError as e:
                last_err = e
                continue
            self._running = True
            self._wait_ready()
            return
        log = ""
        with contextlib.suppress(OSError):
            log = (self.tmpdir / "server.log").read_text()[-2000:]
        raise PgServerError(f"postgres did not start: {last_err}\n{log}")

    def _pg_ctl_start(self) -> None:
        assert self.tmpdir is not None
        # Commits are flushed (synchronous_commit on): a restart must lose no acknowledged
        # write. fsync stays off: the machine itself does not crash in a test.
        opts = (
            f"-c listen_addresses={self.host} -p {self.port} "
            f"-c unix_socket_directories={self.tmpdir} "
            "-c fsync=off -c full_page_writes=off "
            "-c max_connections=100 -c shared_buffers=16MB"
        )
        self._run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-o", opts,
             "-l", str(self.tmpdir / "server.log"), "-w", "-t", str(int(self.start_timeout)),
             "start"],
            timeout=self.start_timeout + 30,
        )

    def pause(self, mode: str = "fast") -> None:
        """Stop the server, keeping its data (`mode`: pg_ctl's smart, fast or immediate)."""
        if not self._running:
            return
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w",
                   "-t", "60", "stop"], timeout=90)
        self._running = False

    def resume(self) -> None:
        """Start it again after pause(), on the same port."""
        if self._running:
            return
        self._pg_ctl_start()
        self._running = True
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                with self._admin_connection():
                    return
            except Exception as e:  # noqa: BLE001 - any failure means "not yet"
                if time.monotonic() > deadline:
                    raise PgServerError(f"postgres not accepting connections: {e}") from e
                time.sleep(0.1)

    def _admin_connection(self) -> Any:
        import psycopg

        return psycopg.connect(
            host=str(self.tmpdir) if self.netns else self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname="postgres",
            autocommit=True,
            connect_timeout=5,
        )

    # -- public ----------------------------------------------------------------------------

    def params(self, name: str) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "name": name,
            "user": self.user,
            "password": self.password,
        }

    def dsn(self, name: str) -> str:
        return f"postgresql+psycopg://{self.user}:{self.password}@{self.host}:{self.port}/{name}"

    def create_database(self, name: str | None = None) -> dict[str, Any]:
        """Create an empty database (default: a random name) and return its connection params."""
        if not self._running:
            raise PgServerError("server is not running")
        name = name or f"t_{secrets.token_hex(6)}"
        if not _NAME_RE.match(name):
            raise PgServerError(f"bad database name {name!r}")
        with self._admin_connection() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.params(name)

    def local_engine(self, name: str) -> Engine:
        """An engine for the test process on database `name` (through the unix socket when
        the server lives in a namespace)."""
        return make_engine("postgres", pg_host=str(self.tmpdir) if self.netns else self.host,
                           pg_port=self.port, pg_name=name, pg_user=self.user,
                           pg_password=self.password, pg_ssl=False, pg_pool_size=2)

    def new_engine(self, *, password: str | None = None, pool_size: int = 10) -> Engine:
        """An engine on a fresh empty database (`password` overrides the right one)."""
        p = self.create_database()
        return make_engine("postgres", pg_host=p["host"], pg_port=p["port"], pg_name=p["name"],
                           pg_user=p["user"],
                           pg_password=p["password"] if password is None else password,
                           pg_ssl=False, pg_pool_size=pool_size)

    def drop_database(self, name: str) -> None:
        if not _NAME_RE.match(name):
            raise PgServerError(f"bad database name {name!r}")
        with self._admin_connection() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    with PostgresServer() as pg:
        print("started", pg.bindir, pg.port, pg.create_database("smoke"))
