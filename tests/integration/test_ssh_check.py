"""Headscale's SSH check-mode scenarios (integration/ssh_test.go) with official clients and a
real OpenID provider, on one tailnet: alice and bob log in through the provider (alice-pc,
bob-pc), a tagged node joins with a key, every node runs `--ssh`. The policy lets alice's
nodes in to every member and tagged node after a check; bob is never let in.

A check holds `tailscale ssh` until it is decided: by the source node's owner signing in at
the banner's /auth/<auth_id> link, by `headscale auth approve|reject`, or by its expiry
(tuning.register_cache_expiration, short here). Approvals are remembered per (source,
destination) for the rule's checkPeriod, so each scenario starts from a fresh alice node
(joined with a key of alice's) to begin without one.
"""

from __future__ import annotations

import re
import subprocess
import time
from typing import Any

import pytest

from tests.integration.idp import browser_login
from tests.integration.oidc_world import OIDCWorld
from tests.integration.server import PyHeadscale
from tests.integration.ssh_lab import (
    WHERE,
    addr4,
    denied,
    start_ssh,
    tailscale_ssh,
    wait_ssh_policy,
    wait_ssh_ready,
)
from tests.integration.tailscale import Tailscaled
from tests.integration.test_oidc_official import (
    ALICE,
    BOB,
    oidc_overrides,
    web_login,
)
from tests.integration.versions import MIDDLE, NEWEST, OLDEST
from tests.integration.world import shared_world_fixture, wait_for

pytestmark = pytest.mark.integration

EXPIRY_S = 30  # tuning.register_cache_expiration: how long an undecided check waits


def check_policy(period: str | None = None) -> dict[str, Any]:
    """Headscale's sshCheckPolicy (with an optional checkPeriod): alice's group may SSH to
    members and tagged nodes as root after a check."""
    rule: dict[str, Any] = {"action": "check", "src": ["group:integration-test"],
                            "dst": ["autogroup:member", "autogroup:tagged"], "users": ["root"]}
    if period is not None:
        rule["checkPeriod"] = period
    return {"groups": {"group:integration-test": [ALICE.email]},
            "tagOwners": {"tag:server": [ALICE.email]},
            "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
            "ssh": [rule]}


class CheckLab(OIDCWorld):
    seen: set[str]

    def node_id(self, name: str) -> int:
        assert self.server is not None
        ids = {n["givenName"]: int(n["id"]) for n in self.server.cli_json("nodes", "list")}
        return ids[name]

    def alice_node(self, name: str, version: str) -> Tailscaled:
        """A fresh node of alice's: no approval remembered for it yet."""
        ts = self.join(name, version, key="alice", args=("--ssh",))
        for dst in ("bob-pc", "tagged"):
            wait_ssh_ready(ts, self.nodes[dst])
        return ts


def setup(lab: CheckLab) -> None:
    lab.seen = set()
    idp = lab.start_idp([ALICE, BOB])
    over = oidc_overrides(lab, idp)
    over["policy"] = {"mode": "database"}
    over["tuning"] = {"register_cache_expiration": f"{EXPIRY_S}s"}
    srv = lab.start_server(over, users=[], keys={"tagged": {"reusable": True,
                                                             "tags": ["tag:server"]}})
    lab.set_policy(check_policy())
    web_login(srv, lab.add_client("alice-pc", NEWEST), ALICE, "alice-pc", "--ssh")
    web_login(srv, lab.add_client("bob-pc", OLDEST), BOB, "bob-pc", "--ssh")
    lab.join("tagged", MIDDLE, key="tagged", args=("--ssh",))
    uid = srv.cli_json("users", "list", "-n", ALICE.preferred_username)[0]["id"]
    lab.keys["alice"] = srv.cli_json("preauthkeys", "create", "-u", str(uid), "--reusable",
                                     "-e", "1h")["key"]
    names = ("alice-pc", "bob-pc", "tagged")
    for src in names:
        for dst in names:
            if src != dst:
                wait_ssh_ready(lab.nodes[src], lab.nodes[dst])


lab = shared_world_fixture(CheckLab, setup)


def next_check(lab: CheckLab, src: str, dst: str, timeout: float = 20) -> str:
    """The auth ID of the next SSH check the server opened for src -> dst (from its log)."""
    assert lab.server is not None
    pat = re.compile(rf"SSH check pending for node {lab.node_id(src)} -> node "
                     rf"{lab.node_id(dst)}, auth_id (hskey-authreq-[0-9a-f]+)")

    def fresh() -> str | None:
        for m in pat.finditer(lab.server.log_text()):  # type: ignore[union-attr]
            if m[1] not in lab.seen:
                lab.seen.add(m[1])
                return m[1]
        return None

    return str(wait_for(f"a new SSH check {src} -> {dst}", fresh, timeout))


def checks_opened(lab: CheckLab, src: str, dst: str) -> int:
    assert lab.server is not None
    return len(re.findall(rf"SSH check pending for node {lab.node_id(src)} -> node "
                          rf"{lab.node_id(dst)},", lab.server.log_text()))


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"ssh still running after {timeout}s: {out!r} {err!r}") from None
    return proc.returncode, out, err


def assert_shell(lab: CheckLab, dst: str, result: tuple[int, str, str]) -> None:
    rc, out, err = result
    assert rc == 0 and f" {addr4(lab.nodes[dst])}/" in out, (rc, out, err)


def approve(srv: PyHeadscale, auth_id: str, verb: str = "approve") -> None:
    r = srv.cli("auth", verb, "--auth-id", auth_id)
    assert r.returncode == 0, r.stdout + r.stderr


def still_held(proc: subprocess.Popen[str], seconds: float = 2) -> None:
    time.sleep(seconds)  # the absence of an outcome: nothing to wait on
    assert proc.poll() is None, f"the session did not wait for the check: {proc.communicate()}"


def test_ssh_check_mode_oidc(lab: CheckLab) -> None:
    """TestSSHOneUserToOneCheckModeOIDC: alice's SSH to bob's node and to the tagged node
    waits on a check; the banner links to /auth/<auth_id>, where signing in as bob (not the
    source node's owner) is refused and signing in as alice lets the session in. Bob is
    refused outright."""
    srv = lab.server
    assert srv is not None
    lab.set_policy(check_policy())
    wait_ssh_policy({n: lab.nodes[n] for n in ("alice-pc", "bob-pc", "tagged")},
                    lambda s, d: s == "alice-pc")
    for dst in ("bob-pc", "tagged"):
        proc = start_ssh(lab.nodes["alice-pc"], addr4(lab.nodes[dst]), *WHERE)
        auth_id = next_check(lab, "alice-pc", dst)
        url = f"{srv.url}/auth/{auth_id}"
        res = browser_login(srv.host, url, BOB, ca_file=srv.ca_file, confirm=False)
        assert res.login_status == 403, (res.login_status, res.login_page)
        assert "not the owner of the SSH source node" in res.login_page
        still_held(proc, 1)
        res = browser_login(srv.host, url, ALICE, ca_file=srv.ca_file, confirm=False)
        assert res.login_status == 200 and res.login_url.startswith(f"{srv.url}/oidc/callback")
        assert "SSH session authorized" in res.login_page and ALICE.name in res.login_page
        result = finish(proc)
        assert_shell(lab, dst, result)
        assert url in result[2]  # the banner sent the user to the page that approved it
    # The page of a decided check is gone.
    status, _ = srv.http_get(f"/auth/{auth_id}")
    assert status == 404
    for dst in ("alice-pc", "tagged"):
        r = tailscale_ssh(lab.nodes["bob-pc"], addr4(lab.nodes[dst]), "echo", "must-not-run")
        assert denied(r) and "must-not-run" not in r.stdout, r


def test_ssh_check_mode_auto_approve(lab: CheckLab) -> None:
    """TestSSHCheckModeAutoApprove: within a 5m checkPeriod, a second session of the same pair
    is let in without a new check."""
    srv = lab.server
    assert srv is not None
    lab.set_policy(check_policy("5m"))
    src = lab.alice_node("a-auto", OLDEST)
    proc = start_ssh(src, addr4(lab.nodes["tagged"]), *WHERE)
    approve(srv, next_check(lab, "a-auto", "tagged"))
    assert_shell(lab, "tagged", finish(proc))
    r = tailscale_ssh(src, addr4(lab.nodes["tagged"]), *WHERE)
    assert_shell(lab, "tagged", (r.returncode, r.stdout, r.stderr))
    assert checks_opened(lab, "a-auto", "tagged") == 1


def test_ssh_check_mode_negative_cli(lab: CheckLab) -> None:
    """TestSSHCheckModeNegativeCLI: `headscale auth reject` ends the held session, no shell."""
    srv = lab.server
    assert srv is not None
    lab.set_policy(check_policy())
    src = lab.alice_node("a-neg", MIDDLE)
    for dst in ("bob-pc", "tagged"):
        proc = start_ssh(src, addr4(lab.nodes[dst]), *WHERE)
        auth_id = next_check(lab, "a-neg", dst)
        still_held(proc)
        approve(srv, auth_id, "reject")
        rc, out, err = finish(proc, 30)
        assert rc != 0 and not out.strip(), (rc, out, err)


def test_ssh_check_mode_unapproved_timeout(lab: CheckLab) -> None:
    """TestSSHCheckModeUnapprovedTimeout: a check nobody decides is rejected when it expires
    (register_cache_expiration); bob is still refused at once."""
    lab.set_policy(check_policy())
    src = lab.alice_node("a-tmo", NEWEST)
    started = time.monotonic()  # the check opens after this, so it expires after +EXPIRY_S
    proc = start_ssh(src, addr4(lab.nodes["bob-pc"]), *WHERE)
    next_check(lab, "a-tmo", "bob-pc")
    rc, out, err = finish(proc, EXPIRY_S + 30)
    assert rc != 0 and not out.strip(), (rc, out, err)
    assert time.monotonic() - started > EXPIRY_S - 1, "rejected before the check expired"
    r = tailscale_ssh(lab.nodes["bob-pc"], addr4(lab.nodes["tagged"]), "echo", "must-not-run")
    assert denied(r) and "must-not-run" not in r.stdout, r


def test_ssh_check_mode_session_loss_redelegates(lab: CheckLab) -> None:
    """TestSSHCheckModeSessionLossReDelegates: the server restarts while a session waits on a
    check (pending checks live in memory); the destination's next poll gets a fresh check,
    whose approval lets the still-waiting session in."""
    srv = lab.server
    assert srv is not None
    lab.set_policy(check_policy())
    src = lab.alice_node("a-loss", OLDEST)
    proc = start_ssh(src, addr4(lab.nodes["tagged"]), *WHERE)
    first = next_check(lab, "a-loss", "tagged")
    srv.restart()
    second = next_check(lab, "a-loss", "tagged", timeout=60)
    assert second != first
    assert proc.poll() is None, proc.communicate()
    approve(srv, second)
    assert_shell(lab, "tagged", finish(proc, 60))


def test_ssh_check_mode_check_period_cli(lab: CheckLab) -> None:
    """TestSSHCheckModeCheckPeriodCLI: with a 1m checkPeriod (the minimum), the approval holds
    for a minute; after it a new check is opened and must be approved again."""
    srv = lab.server
    assert srv is not None
    lab.set_policy(check_policy("1m"))
    src = lab.alice_node("a-per", MIDDLE)
    proc = start_ssh(src, addr4(lab.nodes["bob-pc"]), *WHERE)
    first = next_check(lab, "a-per", "bob-pc")
    approve(srv, first)
    approved = time.monotonic()
    assert_shell(lab, "bob-pc", finish(proc))
    # The period is a clock, not an event: wait it out.
    time.sleep(max(0.0, approved + 62 - time.monotonic()))
    proc = start_ssh(src, addr4(lab.nodes["bob-pc"]), *WHERE)
    second = next_check(lab, "a-per", "bob-pc")
    assert second != first
    approve(srv, second)
    assert_shell(lab, "bob-pc", finish(proc))
