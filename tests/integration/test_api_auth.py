"""Headscale's api_auth_test.go, assertion for assertion: the REST API and the remote CLI of
a live HTTPS server (test CA) refuse a request without a valid API key with a short 401
that leaks no user, and answer with a valid one. Each test has its own server, because
Headscale's compare the whole user list with the users they made."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cli_server import Server, running_server

pytestmark = pytest.mark.integration


@pytest.fixture
def srv() -> Iterator[Server]:
    with running_server(tls=True) as s:
        yield s


def setup(srv: Server, *users: str) -> str:
    """The users, then an API key valid for 24h (as Headscale's scenario and test make)."""
    for u in users:
        srv.ok("users", "create", u)
    return srv.ok("apikeys", "create", "--expiration", "24h").strip()


def refused(status: int, body: str, users: tuple[str, ...]) -> None:
    assert status == 401, (status, body)
    assert "Unauthorized" in body
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        assert "users" not in parsed and "user" not in parsed
    for u in users:
        assert u not in body, f"the 401 leaks user {u}"
    assert len(body) < 100, f"a 401 body should be minimal: {body!r}"


def test_api_authentication_bypass(srv: Server) -> None:
    users = ("user1", "user2", "user3")
    key = setup(srv, *users)
    for headers in ({}, {"Authorization": "InvalidToken"},
                    {"Authorization": "Bearer invalid-token-12345"}):
        status, body = srv.get("/api/v1/user", headers)
        refused(status, body.decode(errors="replace"), users)
    status, body = srv.get("/api/v1/user", {"Authorization": f"Bearer {key}"})
    assert status == 200
    names = [u["name"] for u in json.loads(body)["users"]]
    assert len(names) == 3 and set(names) == set(users)


def curl(srv: Server, *args: str) -> tuple[str, str]:
    """curl -s -w '\\nHTTP_CODE:%{http_code}' against /api/v1/user (trusting the test CA);
    returns (code, body) split as Headscale's test splits them."""
    assert srv.ca is not None
    r = subprocess.run(["curl", "-s", "--cacert", str(srv.ca.ca_cert), *args, "-w",
                        "\nHTTP_CODE:%{http_code}", srv.url + "/api/v1/user"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    code, body = "", ""
    for line in r.stdout.split("\n"):
        if line.startswith("HTTP_CODE:"):
            code = line.removeprefix("HTTP_CODE:")
        else:
            body += line
    return code, body


def test_api_authentication_bypass_curl(srv: Server) -> None:
    users = ("testuser1", "testuser2")
    key = setup(srv, *users)
    code, body = curl(srv)
    refused(int(code), body, users)
    code, body = curl(srv, "-H", "Authorization: InvalidToken")
    assert code == "401" and "Unauthorized" in body
    assert all(u not in body for u in users)
    code, body = curl(srv, "-H", f"Authorization: Bearer {key}")
    assert code == "200"
    assert len(json.loads(body)["users"]) == 2


def auth_failure(text: str) -> bool:
    t = text.lower()
    return any(w in t for w in ("unauthorized", "unauthenticated", "invalid token",
                                "validating token", "authentication"))


def test_remote_cli_authentication_bypass(srv: Server) -> None:
    """The address without a scheme (HTTPS) and HEADSCALE_CLI_INSECURE, as Headscale's."""
    users = ("grpcuser1", "grpcuser2")
    key = setup(srv, *users)
    addr = f"127.0.0.1:{srv.port}"

    def remote(api_key: str | None) -> subprocess.CompletedProcess[str]:
        env = srv.env(HEADSCALE_CLI_ADDRESS=addr, HEADSCALE_CLI_INSECURE="true")
        if api_key is not None:
            env["HEADSCALE_CLI_API_KEY"] = api_key
        return srv.run("users", "list", "--output", "json", env=env)

    assert remote(None).returncode != 0
    bad = remote("invalid-key-12345")
    out = bad.stdout + bad.stderr
    assert bad.returncode != 0 and auth_failure(out), out
    assert all(u not in out for u in users)
    good = remote(key)
    assert good.returncode == 0, good.stderr
    names = [u["name"] for u in json.loads(good.stdout)]
    assert len(names) == 2 and set(names) == set(users)


def test_cli_with_config_authentication_bypass(srv: Server, tmp_path: Path) -> None:
    """A config file holding only a `cli:` section, as Headscale's test writes it."""
    users = ("cliuser1", "cliuser2")
    key = setup(srv, *users)
    addr = f"127.0.0.1:{srv.port}"

    def with_config(name: str, api_key: str | None) -> subprocess.CompletedProcess[str]:
        cfg = tmp_path / name
        cfg.write_text(f"\ncli:\n  address: {addr}\n"
                       + (f"  api_key: {api_key}\n" if api_key else "")
                       + "  timeout: 5s\n  insecure: true\n")
        return srv.run("users", "list", "--output", "json", config=cfg)

    assert with_config("config_no_key.yaml", None).returncode != 0
    bad = with_config("config_invalid_key.yaml", "invalid-key-12345")
    out = bad.stdout + bad.stderr
    assert bad.returncode != 0 and auth_failure(out), out
    assert all(u not in out for u in users)
    good = with_config("config_valid_key.yaml", key)
    assert good.returncode == 0, good.stderr
    names = [u["name"] for u in json.loads(good.stdout)]
    assert len(names) == 2 and set(names) == set(users)
