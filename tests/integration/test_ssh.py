"""Tailscale SSH judged by official clients: nodes running `tailscale up --ssh`
(kernel TUN, root in their namespace) accept `tailscale ssh root@<node>` from the users the
policy's `ssh` section allows and refuse everybody else; check mode holds the session until
an admin approves it with `headscale auth approve`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.netns import Topology
from tests.integration.ssh_lab import start_ssh, tailscale_ssh, wait_ssh_ready
from tests.integration.tailscale import Tailscaled
from tests.integration.test_policy import PolicyLab, acl
from tests.integration.versions import NEWEST, OLDEST, PINNED

pytestmark = pytest.mark.integration

KEYS = {
    "user1": {"user": "user1", "reusable": True},
    "user2": {"user": "user2", "reusable": True},
    "server": {"reusable": True, "tags": ["tag:server"]},
}
DENIED = "Permission denied (tailscale)"  # what ssh prints when tailscaled refuses


def ssh_policy(action: str = "accept", **extra: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {"action": action, "src": ["user1@"], "dst": ["tag:server"],
                            "users": ["root"], **extra}
    return {
        "tagOwners": {"tag:server": ["user1@"]},
        # Port 22 is open to everyone: only the ssh section decides who gets a shell.
        "acls": [acl(["*"], ["*:*"])],
        "ssh": [rule],
    }


@pytest.fixture
def lab(topology: Topology, workdir: Path,
        tailscaled_factory: Callable[..., Tailscaled]) -> Iterator[PolicyLab]:
    lab = PolicyLab(topology, workdir, tailscaled_factory)
    yield lab
    if lab.server is not None:
        lab.server.close()








def test_ssh_allowed_user_gets_a_shell_other_user_is_refused(lab: PolicyLab) -> None:
    lab.start_server(ssh_policy(), mode="file", keys=KEYS)
    # Every pinned version is an SSH server once and a client once, against another version.
    n = len(PINNED)
    for i, v in enumerate(PINNED):
        lab.join(f"s{i}", "server", v, args=("--ssh",))
    for i, v in enumerate(PINNED):
        lab.join(f"c{i}", "user1", v)
    lab.join("x", "user2", NEWEST)

    for i in range(n):
        client, server = f"c{i}", f"s{(i + 1) % n}"
        wait_ssh_ready(lab.nodes[client], lab.nodes[server])
        r = tailscale_ssh(lab.nodes[client], lab.ip(server), "echo", f"hello-from-{client}")
        assert r.returncode == 0 and f"hello-from-{client}" in r.stdout, (
            f"{client} ({PINNED[i]}) -> {server} ({PINNED[(i + 1) % n]}): "
            f"{r.returncode} {r.stdout!r} {r.stderr!r}")

    wait_ssh_ready(lab.nodes["x"], lab.nodes["s0"])
    r = tailscale_ssh(lab.nodes["x"], lab.ip("s0"), "echo", "should-not-run")
    assert r.returncode != 0 and "should-not-run" not in r.stdout, (r.stdout, r.stderr)
    assert DENIED in r.stderr, (r.stdout, r.stderr)
    log = lab.nodes["s0"].log_text()
    assert "access granted to user1" in lab.nodes["s1"].log_text()
    # The connection reached s0's SSH server and was refused there, by policy.
    assert f"handling conn: {lab.ip('x')}:" in log and "access granted to user2" not in log




def pending_check(lab: PolicyLab, seen: set[str], timeout: float = 20) -> str:
    """The auth ID of the next SSH check the server opened (from its log)."""
    assert lab.server is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for m in re.finditer(r"SSH check pending .* auth_id (hskey-authreq-\S+)",
                             lab.server.log_text()):
            if m[1] not in seen:
                seen.add(m[1])
                return m[1]
        time.sleep(0.2)
    raise AssertionError(f"no new SSH check opened; server log:\n{lab.server.log_tail()}")


def test_ssh_check_mode_holds_until_admin_approves(lab: PolicyLab) -> None:
    srv = lab.start_server(ssh_policy("check"), mode="file", keys=KEYS)
    lab.join("s", "server", PINNED[0], args=("--ssh",))
    lab.join("c", "user1", NEWEST)
    lab.join("c2", "user1", PINNED[len(PINNED) // 2])
    s_ip = lab.ip("s")
    seen: set[str] = set()

    wait_ssh_ready(lab.nodes["c"], lab.nodes["s"])
    proc = start_ssh(lab.nodes["c"], s_ip, "echo", "checked-ok")
    auth_id = pending_check(lab, seen)
    time.sleep(2)
    assert proc.poll() is None, f"the session did not wait for the check: {proc.communicate()}"
    r = srv.cli("auth", "approve", "--auth-id", auth_id)
    assert r.returncode == 0, r.stdout + r.stderr
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "checked-ok" in out, (proc.returncode, out, err)
    assert auth_id in err  # the banner told the user which check to get approved

    # Within checkPeriod (12h by default) the same pair is let in without a new check.
    r2 = tailscale_ssh(lab.nodes["c"], s_ip, "echo", "again")
    assert r2.returncode == 0 and "again" in r2.stdout, (r2.stdout, r2.stderr)
    assert auth_id in srv.log_text() and len(re.findall("SSH check pending", srv.log_text())) == 1

    # Another node of the same user needs its own check; a rejected one gets no shell.
    wait_ssh_ready(lab.nodes["c2"], lab.nodes["s"])
    proc = start_ssh(lab.nodes["c2"], s_ip, "echo", "must-not-run")
    auth_id2 = pending_check(lab, seen)
    r = srv.cli("auth", "reject", "--auth-id", auth_id2)
    assert r.returncode == 0, r.stdout + r.stderr
    out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "must-not-run" not in out, (proc.returncode, out, err)
    assert DENIED in err, err

    # user2 is in no check rule: refused at once, no check opened.
    lab.join("x", "user2", OLDEST)
    wait_ssh_ready(lab.nodes["x"], lab.nodes["s"])
    before = len(re.findall("SSH check pending", srv.log_text()))
    r = tailscale_ssh(lab.nodes["x"], s_ip, "echo", "must-not-run")
    assert r.returncode != 0 and "must-not-run" not in r.stdout and DENIED in r.stderr, r
    assert len(re.findall("SSH check pending", srv.log_text())) == before
