"""Headscale's TestSSHLocalpart with official clients: `localpart:*@<domain>` maps the local
part of each user's e-mail (from a real OpenID provider) to the local account of that name.

The namespaces share this machine's accounts, so the two provider users are root@example.net
and daemon@example.net: the first maps to root (a shell), the second to daemon, whose login
shell is nologin. A session as daemon that tailscaled lets in therefore ends with nologin's
"not available" instead of a shell, which still tells an accepted session from a refused one.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.idp import Account
from tests.integration.oidc_world import OIDCWorld
from tests.integration.ssh_lab import (
    WHERE,
    addr4,
    denied,
    shell_on,
    tailscale_ssh,
    wait_ssh_policy,
    wait_ssh_ready,
)
from tests.integration.test_oidc_official import (
    oidc_overrides,
    web_login,
)
from tests.integration.versions import NEWEST, OLDEST
from tests.integration.world import shared_world_fixture

pytestmark = pytest.mark.integration

DOMAIN = "example.net"
ROOTY = Account("rooty-sub", "pw-rooty", email=f"root@{DOMAIN}", name="Root User",
                preferred_username="rooty")
DAEMONY = Account("daemony-sub", "pw-daemony", email=f"daemon@{DOMAIN}", name="Daemon User",
                  preferred_username="daemony")
NODES = {"r-pc": "root", "d-pc": "daemon"}  # node -> the account its owner maps to
ALL_TCP = [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]


LocalpartLab = OIDCWorld


def setup(lab: LocalpartLab) -> None:
    idp = lab.start_idp([ROOTY, DAEMONY])
    over = oidc_overrides(lab, idp)
    over["policy"] = {"mode": "database"}
    srv = lab.start_server(over, users=[])
    lab.set_policy({"acls": ALL_TCP})
    web_login(srv, lab.add_client("r-pc", NEWEST), ROOTY, "r-pc", "--ssh")
    web_login(srv, lab.add_client("d-pc", OLDEST), DAEMONY, "d-pc", "--ssh")
    wait_ssh_ready(lab.nodes["r-pc"], lab.nodes["d-pc"])
    wait_ssh_ready(lab.nodes["d-pc"], lab.nodes["r-pc"])


lab = shared_world_fixture(LocalpartLab, setup)
PAIRS = [("r-pc", "d-pc"), ("d-pc", "r-pc")]


def ssh_rule(dst: list[str], users: list[str]) -> dict[str, Any]:
    return {"acls": ALL_TCP, "ssh": [{"action": "accept", "src": ["autogroup:member"],
                                      "dst": dst, "users": users}]}


def apply(lab: LocalpartLab, policy: dict[str, Any],
          allowed: Callable[[str, str, str], bool]) -> None:
    lab.set_policy(policy)
    for user in ("root", "daemon"):
        wait_ssh_policy(lab.nodes, lambda s, d, u=user: allowed(s, d, u), user=user)


def judge(lab: LocalpartLab, allowed: Callable[[str, str, str], bool]) -> None:
    problems = []
    for src, dst in PAIRS:
        for user in ("root", "daemon"):
            if allowed(src, dst, user):
                r = shell_on(lab.nodes[src], lab.nodes[dst], user=user)
                ok = accepted(r, user, addr4(lab.nodes[dst]))
            else:
                r = tailscale_ssh(lab.nodes[src], addr4(lab.nodes[dst]), *WHERE, user=user)
                ok = denied(r) and not r.stdout.strip()
            if not ok:
                verb = "let in" if allowed(src, dst, user) else "refused"
                problems.append(f"{src} -> {dst} as {user} should be {verb}: exit "
                                f"{r.returncode} {r.stdout[-200:]!r} {r.stderr[-400:]!r}")
    assert not problems, "\n".join(problems)


def accepted(r: subprocess.CompletedProcess[str], user: str, dst_ip: str) -> bool:
    if user == "root":
        return r.returncode == 0 and f" {dst_ip}/" in r.stdout
    # daemon's shell is nologin: tailscaled let the session in and nologin ended it.
    return not denied(r) and "not available" in r.stdout + r.stderr


def own(src: str, user: str) -> bool:
    return NODES[src] == user


def test_ssh_localpart_member_and_tagged(lab: LocalpartLab) -> None:
    """Each user reaches the other's node as its own local part only."""
    allowed = lambda s, d, u: own(s, u)  # noqa: E731
    apply(lab, ssh_rule(["autogroup:member", "autogroup:tagged"],
                        [f"localpart:*@{DOMAIN}"]), allowed)
    judge(lab, allowed)


def test_ssh_localpart_autogroup_self(lab: LocalpartLab) -> None:
    """With autogroup:self, cross-user sessions are refused whatever the local part."""
    apply(lab, ssh_rule(["autogroup:member"], [f"localpart:*@{DOMAIN}"]), own_or_none)
    apply(lab, ssh_rule(["autogroup:self"], [f"localpart:*@{DOMAIN}"]), lambda s, d, u: False)
    judge(lab, lambda s, d, u: False)


def test_ssh_localpart_plus_root(lab: LocalpartLab) -> None:
    """localpart plus root: each user reaches the other's node as its local part and as
    root."""
    allowed = lambda s, d, u: own(s, u) or u == "root"  # noqa: E731
    apply(lab, ssh_rule(["autogroup:member", "autogroup:tagged"],
                        [f"localpart:*@{DOMAIN}", "root"]), allowed)
    judge(lab, allowed)


def own_or_none(s: str, d: str, u: str) -> bool:
    return own(s, u)
