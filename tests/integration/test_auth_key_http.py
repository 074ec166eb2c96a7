"""The with-https-false variant of Headscale's TestAuthKeyLogoutAndReloginSameUser: the
scenario of test_auth_key.py's same-user test, on a server speaking plain HTTP (port 8080).

Between logout and relogin Headscale's test waits 5 minutes, for the client's own rule:
a client that dialled control in the last 2 minutes takes that as a failing port 80 and
dials port 443 instead, and every such dial restarts the 2 minutes (v1.80.3 does this with
an `http://host:8080` URL and never gets through; later pinned versions only fall back when
the URL has an HTTPS port). Nothing observable ends that window, so this test waits it out
from the logout, with a margin, as Headscale's does."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.integration import test_auth_key as https_variant
from tests.integration.relogin_lab import USERS, identity
from tests.integration.server import PyHeadscale
from tests.integration.world import shared_world_fixture

pytestmark = pytest.mark.integration


class HttpKeyLab(https_variant.KeyLab):
    def start_server(self, *args: Any, **kwargs: Any) -> PyHeadscale:  # type: ignore[override]
        return super().start_server(*args, tls=False, **kwargs)


def _boot(lab: HttpKeyLab) -> None:
    lab.boot()


lab = shared_world_fixture(HttpKeyLab, _boot)


# The client's "recent control dial" window, plus a margin for a loaded machine.
RECENT_DIAL_WINDOW = 120 + 15


def test_auth_key_logout_and_relogin_same_user_http(lab: HttpKeyLab) -> None:
    assert lab.server is not None and lab.server.url.startswith("http://")
    assert lab.server.ca is None
    for name in lab.members:
        prefs = lab.nodes[name].cli("debug", "prefs")
        assert prefs.returncode == 0
        assert lab.server.url in prefs.stdout, f"{name} does not use the HTTP control URL"
    before = {n: identity(lab.nodes[n]) for n in lab.members}
    count = len(lab.listed())
    assert count == len(lab.members)
    lab.log_out(lab.members)
    logged_out = time.monotonic()
    assert len(lab.listed()) == count, "logging out must not delete the node"
    keys = {u: lab.new_key(u, "--reusable")["key"] for u in USERS}
    time.sleep(max(0.0, logged_out + RECENT_DIAL_WINDOW - time.monotonic()))
    for user in USERS:
        for name in lab.by_user[user]:
            lab.log_in(name, keys[user])
    lab.wait_online(lab.members)
    for name in lab.members:
        assert identity(lab.nodes[name]) == before[name], f"{name} changed identity"
    assert len(lab.listed()) == count
    lab.wait_mesh(lab.members)
