"""Log output as Headscale's: `log.format` text/json, every `log.level`, migrations quiet at
info, and start-up failures as one line naming the config key, exit code 1."""

from __future__ import annotations

import io
import json
import logging
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pyheadscale import logs
from pyheadscale.config import load_config
from pyheadscale.db.engine import engine_from_config, migrate
from tests.inproc import server_config
from tests.integration.server import deep_merge
from tests.netutil import free_port

LEVEL_ORDER = ["trace", "debug", "info", "warn", "error", "fatal", "panic"]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    hpack_level = logging.getLogger("hpack").level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logging.getLogger("hpack").setLevel(hpack_level)


def emit_each_level(logger: logging.Logger) -> None:
    for name in LEVEL_ORDER:
        logger.log(logs.LEVELS[name], "at %s", name, extra=logs.fields(level_was=name))


@pytest.mark.parametrize("configured", [*LEVEL_ORDER, "disabled"])
def test_each_headscale_level_filters_as_zerolog(configured: str, restore_logging: None) -> None:
    out = io.StringIO()
    logs.configure(configured, "json", stream=out)
    emit_each_level(logging.getLogger("pyheadscale.test"))
    seen = [json.loads(line)["level"] for line in out.getvalue().splitlines()]
    expected = [] if configured == "disabled" else LEVEL_ORDER[LEVEL_ORDER.index(configured):]
    assert seen == expected


@pytest.mark.parametrize(("configured", "shown"), [("trace", True), ("debug", False)])
def test_hpack_header_lines_only_at_trace(configured: str, shown: bool,
                                          restore_logging: None) -> None:
    """hpack logs each header it codes at DEBUG: at `debug` the server's own lines stay
    readable, at `trace` everything is shown."""
    import h2.config
    import h2.connection

    out = io.StringIO()
    logs.configure(configured, "json", stream=out)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "https"),
                          (":authority", "example.com")])
    logging.getLogger("pyheadscale.test").debug("own line")
    names = [json.loads(line)["logger"] for line in out.getvalue().splitlines()]
    assert "pyheadscale.test" in names
    assert any(n.startswith("hpack") for n in names) is shown


def test_json_lines_parse_and_carry_fields(restore_logging: None) -> None:
    out = io.StringIO()
    logs.configure("debug", "json", stream=out)
    log = logging.getLogger("pyheadscale.test")
    log.info("http request", extra=logs.fields(method="GET", status=200, path='/a "b"'))
    try:
        raise ValueError("line one\nline two")
    except ValueError:
        log.exception("it failed")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["level"] == "info" and first["message"] == "http request"
    assert (first["method"], first["status"], first["path"]) == ("GET", 200, '/a "b"')
    assert isinstance(first["time"], int) and abs(first["time"] - time.time()) < 60
    assert first["logger"] == "pyheadscale.test"
    assert second["level"] == "error" and second["error"] == "ValueError: line one\nline two"
    assert "Traceback" in second["stack"]


def test_text_format_is_zerolog_console_like(restore_logging: None) -> None:
    out = io.StringIO()
    logs.configure("info", "text", stream=out)
    logging.getLogger("pyheadscale.access").warning(
        "http request", extra=logs.fields(method="GET", path="/a b", remote="192.0.2.1"))
    line = out.getvalue().rstrip("\n")
    stamp, level, rest = line.split(" ", 2)
    assert time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")
    assert level == "WRN"
    assert rest == 'pyheadscale.access: http request method=GET path="/a b" remote=192.0.2.1'


@pytest.mark.parametrize(("level", "shown"), [("info", False), ("debug", True)])
def test_migrations_are_quiet_at_info(level: str, shown: bool, tmp_path: Path,
                                      restore_logging: None) -> None:
    out = io.StringIO()
    logs.configure(level, "text", stream=out)
    cfg = load_config(write_config(tmp_path, {}))
    engine = engine_from_config(cfg.database)
    try:
        migrate(engine)
    finally:
        engine.dispose()
    assert ("alembic" in out.getvalue()) is shown, out.getvalue()


# --- the real server as a process ------------------------------------------------------------

def write_config(tmp_path: Path, overrides: dict[str, Any]) -> Path:
    """tests/inproc.py's loopback server config (free ports, SQLite, the embedded relay),
    text logs at info, with `overrides`; the file's path."""
    server_config(tmp_path, overrides=deep_merge({"log": {"level": "info", "format": "text"}},
                                                 overrides))
    return tmp_path / "config.yaml"


def serve(config: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyheadscale", "serve", "-c", str(config)],
                          capture_output=True, text=True, timeout=timeout, check=False)


def bad_key_file(tmp_path: Path) -> str:
    path = tmp_path / "not-a-key"
    path.write_text("this is not a private key\n")
    return str(path)


def assert_one_line_failure(res: subprocess.CompletedProcess[str], key: str) -> None:
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"config: {key}: "), lines[0]
    assert "Traceback" not in res.stdout + res.stderr


def test_port_in_use_names_listen_addr(tmp_path: Path) -> None:
    config = write_config(tmp_path, {})
    port = int(yaml.safe_load(config.read_text())["listen_addr"].rpartition(":")[2])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        res = serve(config)
    assert_one_line_failure(res, "listen_addr")
    assert "address already in use" in res.stderr


def test_metrics_port_in_use_names_metrics_listen_addr(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        res = serve(write_config(tmp_path, {"metrics_listen_addr": addr}))
    assert_one_line_failure(res, "metrics_listen_addr")


def test_stun_port_in_use_names_its_key(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        res = serve(write_config(tmp_path, {"derp": {"server": {"stun_listen_addr": addr}}}))
    assert_one_line_failure(res, "derp.server.stun_listen_addr")


@pytest.mark.parametrize("key", ["noise.private_key_path", "derp.server.private_key_path"])
def test_unreadable_private_key(key: str, tmp_path: Path) -> None:
    section, _, leaf = key.rpartition(".")
    override: dict[str, Any] = {leaf: bad_key_file(tmp_path)}
    for part in reversed(section.split(".")):
        override = {part: override}
    assert_one_line_failure(serve(write_config(tmp_path, override)), key)


def test_unreadable_certificate(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"tls_cert_path": str(tmp_path / "missing.pem"),
                                     "tls_key_path": bad_key_file(tmp_path)})
    res = serve(config)
    assert_one_line_failure(res, "tls_cert_path")
    assert "missing.pem" in res.stderr


def test_database_that_refuses(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    res = serve(write_config(tmp_path, {"database": {
        "type": "postgres", "postgres": {"host": "127.0.0.1", "port": closed, "name": "hs",
                                         "user": "hs", "pass": "x"}}}))
    assert_one_line_failure(res, "database.postgres.host")


def test_sqlite_path_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    res = serve(write_config(tmp_path, {"database": {"sqlite": {
        "path": str(tmp_path / "file" / "db.sqlite")}}}))
    assert_one_line_failure(res, "database.sqlite.path")


def test_no_derp_configured(tmp_path: Path) -> None:
    res = serve(write_config(tmp_path, {"derp": {"server": {"enabled": False}}}))
    assert_one_line_failure(res, "derp")


def test_unreadable_policy_file(tmp_path: Path) -> None:
    res = serve(write_config(tmp_path, {"policy": {"path": str(tmp_path / "nope.hujson")}}))
    assert_one_line_failure(res, "policy.path")


def test_json_server_output_is_json_lines_with_access_log(tmp_path: Path) -> None:
    """A real `headscale serve` with log.format json: stdout holds only JSON lines (start-up
    banner included), stderr nothing; an API call over the CLI socket and one over TCP each
    leave an access line."""
    # grpc_listen_addr: a config warning, which must come out as JSON too.
    config = write_config(tmp_path, {"log": {"format": "json"},
                                     "grpc_listen_addr": "127.0.0.1:50443"})
    cfg = yaml.safe_load(config.read_text())
    proc = subprocess.Popen([sys.executable, "-m", "pyheadscale", "serve", "-c", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(cfg["server_url"] + "/health", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.2)
        cli = subprocess.run([sys.executable, "-m", "pyheadscale", "-c", str(config), "users",
                              "list", "-o", "json"], capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert err == ""
    records = [json.loads(line) for line in out.splitlines()]
    assert records and all({"level", "time", "message"} <= r.keys() for r in records)
    access = [r for r in records if r["message"] == "http request"]
    assert {"path": "/health", "remote": "127.0.0.1", "status": 200} in [
        {k: r[k] for k in ("path", "remote", "status")} for r in access]
    assert {"path": "/api/v1/user", "remote": "unix", "status": 200, "method": "GET"} in [
        {k: r[k] for k in ("path", "remote", "status", "method")} for r in access]
    assert any(r["message"] == "pyheadscale: shutting down" for r in records)
    assert [r["level"] for r in records if r["message"].startswith("grpc_listen_addr")] == [
        "warn"]
    assert not [r for r in records if r["level"] == "info" and r["logger"].startswith("alembic")]


async def test_trace_level_shows_map_frames(tmp_path: Path, restore_logging: None) -> None:
    """`trace` shows what `debug` does not: each map response sent."""
    from tests.inproc import running_server
    from tests.unit.test_config_keys_work import open_map

    for level, shown in (("debug", False), ("trace", True)):
        out = io.StringIO()
        logs.configure(level, "json", stream=out)
        async with running_server(server_config(tmp_path / level)) as srv:
            conn, frames = await open_map(srv)
            await frames.__anext__()
            await conn.close()
        sent = [r for r in map(json.loads, out.getvalue().splitlines())
                if r["message"] == "map response sent"]
        assert bool(sent) is shown
        if shown:
            assert sent[0]["level"] == "trace" and sent[0]["type"] == "full"


def test_acme_http01_port_in_use_names_its_key(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        res = serve(write_config(tmp_path, {
            "server_url": "https://hs.example.test", "tls_letsencrypt_hostname": "hs.example.test",
            "tls_letsencrypt_listen": addr, "acme_url": "https://127.0.0.1:9/directory",
            "tls_letsencrypt_cache_dir": str(tmp_path / "acme")}))
    assert_one_line_failure(res, "tls_letsencrypt_listen")
