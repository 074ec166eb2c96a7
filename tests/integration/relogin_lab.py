"""A tailnet of user1 and user2 nodes (one per pinned version each) that the relogin
scenarios log out and back in, shared by test_auth_key.py and test_auth_web.py: how each
file's nodes join differs (a key, the web flow), what is checked afterwards does not."""

from __future__ import annotations

from typing import Any

from tests.integration import hsapi
from tests.integration.tailscale import Tailscaled
from tests.integration.world import World, wait_for, wait_mesh

USERS = ("user1", "user2")


class ReloginLab(World):
    """The user-owned nodes of the tailnet, by user (`by_user`, filled by the subclass)."""

    by_user: dict[str, list[str]]

    @property
    def members(self) -> list[str]:
        return [n for u in USERS for n in self.by_user[u]]

    def listed(self, user: str | None = None) -> list[dict[str, Any]]:
        """`headscale nodes list [--user USER]`."""
        assert self.server is not None
        args = ["nodes", "list"] + (["--user", user] if user else [])
        return list(self.server.cli_json(*args) or [])

    def online(self, name: str) -> bool | None:
        node = hsapi.node_by_name(self.server, name)  # type: ignore[arg-type]
        return None if node is None else bool(node["online"])

    def log_out(self, names: list[str]) -> None:
        """`tailscale logout` on each; the clients need a login and the server shows them
        offline, still listed."""
        for name in names:
            r = self.nodes[name].logout()
            assert r.returncode == 0, f"{name}: {r.stdout}{r.stderr}"
        for name in names:
            wait_for(f"{name} to need a login",
                     lambda name=name: self.nodes[name].backend_state() == "NeedsLogin", 30)
            wait_for(f"the server to show {name} offline",
                     lambda name=name: self.online(name) is False, 30)

    def wait_online(self, names: list[str]) -> None:
        for name in names:
            wait_for(f"the server to show {name} online", lambda name=name: self.online(name),
                     60)

    def wait_mesh(self, names: list[str] | None = None) -> None:
        wait_mesh([self.nodes[n] for n in names or self.members])


def identity(ts: Tailscaled) -> tuple[str, tuple[str, ...]]:
    """The client's own stable node ID and tailnet addresses."""
    me = ts.status_json()["Self"]
    return str(me["ID"]), tuple(me["TailscaleIPs"])
