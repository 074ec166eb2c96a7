"""Headscale's policy CLI tests without clients: TestPolicyCommand (cli_policy_test.go,
and 0.29.2's cli_test.go) and the file-mode half of TestPolicyCheckCommand, assertion for
assertion. A policy is server-wide, so each test gets a server of its own; nodes are added
as Headscale's CLI tests add them (`debug create-node` then `auth register`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.integration.cli_server import check_policy_fixtures, register, running_server

pytestmark = pytest.mark.integration


def write(tmp_path: Path, name: str, policy: dict[str, Any]) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(policy))
    return str(path)


ALLOW_ALL_TCP = {
    "acls": [{"action": "accept", "proto": "tcp", "src": ["*"], "dst": ["*:*"]}],
    "tagOwners": {"tag:exists": ["user1@"]},
}


def test_policy_command(tmp_path: Path) -> None:
    with running_server() as s:
        s.ok("users", "create", "user1")
        s.ok("policy", "set", "-f", write(tmp_path, "policy.json", ALLOW_ALL_TCP))
        got = json.loads(s.ok("policy", "get", "--output", "json"))
        assert len(got["tagOwners"]) == 1 and len(got["acls"]) == 1


def test_policy_check_command_file_mode(tmp_path: Path) -> None:
    """The file-mode half of TestPolicyCheckCommand (test_cli_clients.py runs the database
    half with official clients): each fixture through the server and with the bypass."""
    with running_server({"policy": {"mode": "file", "path": ""}}) as s:
        for u in ("user1", "user2"):
            s.ok("users", "create", u)
            register(s, f"{u}-node", u)
        check_policy_fixtures(s.run, tmp_path)
