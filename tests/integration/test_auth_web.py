"""Headscale's web-flow scenarios (integration/auth_web_flow_test.go) on one tailnet of
official clients: `tailscale up` without a key prints the server's register URL and waits;
the page at that URL names the command an admin runs (`headscale auth register --auth-id ID
--user NAME`), and the client runs once the admin has run it. user1 and user2 register one
node per pinned version each; the tests run in order on that tailnet.
"""

from __future__ import annotations

import pytest

from tests.integration.relogin_lab import USERS, ReloginLab, identity
from tests.integration.server import http_get_from
from tests.integration.versions import PINNED
from tests.integration.world import (
    interactive_up,
    login_name,
    shared_world_fixture,
)

pytestmark = pytest.mark.integration


class WebLab(ReloginLab):
    """user1 and user2 (no keys): every node joins through the web flow."""

    def boot(self) -> None:
        self.start_server(keys={}, users=list(USERS))
        self.by_user = {u: [] for u in USERS}
        for u in USERS:
            for i, version in enumerate(PINNED):
                name = f"{u[-1]}w{i}"
                self.add_client(name, version)
                self.web_login(name, u)
                self.by_user[u].append(name)

    def web_login(self, name: str, user: str) -> None:
        """`tailscale up` prints the register URL; the page there names the auth ID; the
        admin registers it for `user`; the client then runs."""
        assert self.server is not None
        ts = self.nodes[name]
        up, auth_id = interactive_up(ts, self.server, "--reset")
        try:
            status, body = http_get_from(ts.host, f"{self.server.url}/register/{auth_id}",
                                         ca_file=self.server.ca_file)
            assert status == 200 and auth_id in body.decode(), (status, body[:300])
            r = self.server.cli("auth", "register", "--auth-id", auth_id, "--user", user)
            assert r.returncode == 0, r.stdout + r.stderr
            assert up.wait(timeout=60) == 0, f"{name}'s `tailscale up` failed"
        finally:
            if up.poll() is None:
                up.kill()
        ts.wait_tun_address()


def _boot(lab: WebLab) -> None:
    lab.boot()


lab = shared_world_fixture(WebLab, _boot)


def test_auth_web_flow_authentication_ping_all(lab: WebLab) -> None:
    """Nodes registered through the web flow belong to the user the admin named and
    reach each other."""
    for user in USERS:
        assert sorted(n["name"] for n in lab.listed(user)) == sorted(lab.by_user[user])
        for name in lab.by_user[user]:
            assert login_name(lab.nodes[name]) == user
    lab.wait_mesh()


def test_auth_web_flow_logout_and_relogin_same_user(lab: WebLab) -> None:
    """Every node logs out and registers again for its own user: same nodes, same IDs
    and addresses, all online and meshed again."""
    before = {n: identity(lab.nodes[n]) for n in lab.members}
    lab.log_out(lab.members)
    for user in USERS:
        assert sorted(n["name"] for n in lab.listed(user)) == sorted(lab.by_user[user])
        for name in lab.by_user[user]:
            lab.web_login(name, user)
    lab.wait_online(lab.members)
    for name in lab.members:
        assert identity(lab.nodes[name]) == before[name], f"{name} changed identity"
    for user in USERS:
        assert len(lab.listed(user)) == len(lab.by_user[user])
    lab.wait_mesh()


def test_auth_web_flow_logout_and_relogin_new_user(lab: WebLab) -> None:
    """Every node logs out and registers for user1: user1 owns a node for every client,
    user2's old nodes stay listed, every client shows user1 as its login, and all reach
    each other."""
    lab.log_out(lab.members)
    for name in lab.members:
        lab.web_login(name, "user1")
    assert sorted(n["name"] for n in lab.listed("user1")) == sorted(lab.members)
    assert sorted(n["name"] for n in lab.listed("user2")) == sorted(lab.by_user["user2"])
    for name in lab.members:
        assert login_name(lab.nodes[name]) == "user1", name
    lab.wait_mesh()
