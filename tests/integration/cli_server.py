"""A `pyheadscale serve` on 127.0.0.1 for admin CLI/REST tests that need no client: the
CLI runs over the unix socket (trusted) or remotely with an API key. Optionally HTTPS (a
test CA) and with config overrides."""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tests.integration.procs import terminate
from tests.integration.server import deep_merge, make_test_ca
from tests.netutil import free_port

PY = sys.executable


class Server:
    def __init__(self, d: Path, overrides: Mapping[str, Any] | None = None,
                 tls: bool = False) -> None:
        self.dir = d
        self.port = free_port()
        self.sock = d / "hs.sock"
        derp = d / "derp.yaml"
        derp.write_text(yaml.safe_dump({"regions": {900: {
            "regionid": 900, "regioncode": "t", "regionname": "Test",
            "nodes": [{"name": "900a", "regionid": 900, "hostname": "127.0.0.1",
                       "stunport": -1}]}}}))
        self.ca = make_test_ca(d / "tls", ips=("127.0.0.1",)) if tls else None
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        cfg: dict[str, Any] = {
            "server_url": self.url,
            "listen_addr": f"127.0.0.1:{self.port}",
            "metrics_listen_addr": "",
            "noise": {"private_key_path": str(d / "noise.key")},
            "prefixes": {"v4": "100.64.0.0/10", "v6": "fd7a:115c:a1e0::/48"},
            "derp": {"server": {"enabled": False}, "urls": [], "paths": [str(derp)]},
            "database": {"type": "sqlite", "sqlite": {"path": str(d / "db.sqlite")}},
            "policy": {"mode": "database"},
            "dns": {"magic_dns": True, "base_domain": "ts.example", "override_local_dns": False,
                    "nameservers": {"global": []}},
            "unix_socket": str(self.sock),
            "unix_socket_permission": "0770",
        }
        if self.ca is not None:
            cfg["tls_cert_path"], cfg["tls_key_path"] = str(self.ca.cert), str(self.ca.key)
        cfg = deep_merge(cfg, overrides or {})
        self.config = d / "config.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.log = open(d / "server.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([PY, "-m", "pyheadscale", "-c", str(self.config), "serve"],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=self.env())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + (d / "server.log").read_text())
            if self.sock.exists() and self.get("/health")[0] == 200:
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not start:\n" + (d / "server.log").read_text())

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        """GET on the server's own URL (status, body); (0, b"") when nothing answers."""
        ctx = ssl.create_default_context(cafile=str(self.ca.ca_cert)) if self.ca else None
        req = urllib.request.Request(self.url + path, headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return 0, b""

    @staticmethod
    def env(**extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HEADSCALE_")}
        env.update(extra)
        return env

    def run(self, *args: str, env: dict[str, str] | None = None, stdin: str = "",
            config: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PY, "-m", "pyheadscale", "-c", str(config or self.config), *args],
                              capture_output=True, text=True, timeout=60, input=stdin,
                              env=env or self.env())

    def ok(self, *args: str, **kw: Any) -> str:
        r = self.run(*args, **kw)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r.stdout

    def json(self, *args: str, **kw: Any) -> Any:
        return json.loads(self.ok(*args, "-o", "json", **kw))

    def fails(self, *args: str, expect: str, **kw: Any) -> str:
        """The command exits 1 and its stderr holds `expect` (Headscale's tests look for
        their substrings in the error, which carries the CLI's stderr)."""
        r = self.run(*args, **kw)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert expect in r.stderr, (args, r.stderr)
        return r.stderr

    def stop(self) -> None:
        terminate(self.proc, 15)
        self.log.close()


@contextmanager
def running_server(overrides: Mapping[str, Any] | None = None, tls: bool = False
                   ) -> Iterator[Server]:
    d = Path(tempfile.mkdtemp(prefix="hscli", dir="/tmp"))  # short: unix socket path limit
    try:
        s = Server(d, overrides, tls)
        try:
            yield s
        finally:
            s.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def when(stamp: str | None) -> dt.datetime | None:
    """A JSON timestamp; None for an unset one (null, or Go's zero time)."""
    if not stamp or stamp.startswith("0001-01-01"):
        return None
    return dt.datetime.fromisoformat(stamp)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def auth_id() -> str:
    """A well-formed registration ID no client is waiting on (Headscale's MustAuthID)."""
    return "hskey-authreq-" + secrets.token_hex(12)


def register(srv: Server, name: str, user: str) -> dict[str, Any]:
    """`debug create-node` then `auth register`, as Headscale's CLI tests add a node."""
    reg = auth_id()
    srv.json("debug", "create-node", "--name", name, "--user", user, "--key", reg)
    node = srv.json("auth", "register", "--user", user, "--auth-id", reg)
    assert node["id"] and node["name"] == name
    return dict(node)


ACL_ONLY = {"acls": [{"action": "accept", "proto": "tcp", "src": ["user1@"],
                      "dst": ["user2@:22"]}]}
# Headscale's TestPolicyCheckCommand fixtures: the tests block decides.
CHECK_FIXTURES: dict[str, dict[str, Any]] = {
    "acl-only": ACL_ONLY,
    "acl-plus-passing-tests": dict(ACL_ONLY, tests=[{"src": "user1@",
                                                     "accept": ["user2@:22"]}]),
    "acl-plus-failing-tests": dict(ACL_ONLY, tests=[{"src": "user2@",
                                                     "accept": ["user1@:22"]}]),
}


def check_policy_fixtures(run: Callable[..., subprocess.CompletedProcess[str]],
                          tmp_path: Path) -> None:
    """`policy check` on each fixture, through the server and with the database bypass
    (`run` is the admin CLI of a server whose users user1 and user2 have a node each):
    "Policy is valid", or refused with "test(s) failed" naming the failing test."""
    for name, policy in CHECK_FIXTURES.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(policy))
        for bypass in ((), ("--bypass-server-and-access-database-directly", "--force")):
            r = run("policy", "check", "-f", str(path), *bypass)
            if name == "acl-plus-failing-tests":
                assert r.returncode == 1 and "test(s) failed" in r.stderr, (bypass, r)
                assert "user2@" in r.stderr and "user1@:22" in r.stderr, r.stderr
            else:
                assert r.returncode == 0 and "Policy is valid" in r.stdout, (name, bypass, r)
