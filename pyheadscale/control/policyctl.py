"""The running policy: loading (file or database mode), validation, live recompilation.

A rejected policy never replaces the running one: a new `PolicyManager` is built and checked
first, and only swapped in (and stored, in database mode) once it compiled and its tests pass.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, select

from pyheadscale.config import Config
from pyheadscale.db.models import Policy as PolicyRow
from pyheadscale.mapper.context import AllowAllPolicy
from pyheadscale.policy import IdPGroups, PolicyError, PolicyManager
from pyheadscale.state.changes import Change, ChangeKind, Field
from pyheadscale.state.model import Node, User
from pyheadscale.state.tailnet import Tailnet

log = logging.getLogger("pyheadscale.policy")

# Changes after which the compiled policy may differ (who is who, which tags, which routes).
_POLICY_INPUTS = {ChangeKind.NODE_ADDED, ChangeKind.NODE_REMOVED, ChangeKind.NODE_CHANGED,
                  ChangeKind.USER}
# NODE_CHANGED fields the policy never reads. Anything else (tags, user, approved_routes,
# routes, hostinfo, which may carry RoutableIPs, or a field named later) goes to
# PolicyManager.update(), which itself compares what the policy reads.
_IRRELEVANT_NODE_FIELDS = frozenset({
    Field.ENDPOINTS, Field.DISCO_KEY, Field.HOME_DERP, Field.NODE_KEY, Field.HOSTNAME,
    Field.GIVEN_NAME, Field.EXPIRY, Field.LAST_SEEN, Field.ONLINE, Field.OFFLINE,
})


def _may_affect_policy(c: Change) -> bool:
    if c.kind not in _POLICY_INPUTS:
        return False
    return not (c.kind is ChangeKind.NODE_CHANGED and c.fields
                and c.fields <= _IRRELEVANT_NODE_FIELDS)


def compile_policy(cfg: Config, text: str | None, users: Sequence[User], nodes: Sequence[Node], *,
                   run_tests: bool) -> PolicyManager | None:
    """The one way a policy text becomes a PolicyManager (server, API and CLI bypass alike);
    None for no policy (allow-all). Raises PolicyError."""
    if text is None or not text.strip():
        return None
    # pyheadscale-only: users' IdP groups as policy groups; the manager recomputes their
    # members on every USER change, so a new login's groups apply live.
    pg = cfg.oidc.policy_groups
    return PolicyManager(text, users, nodes, server_url=cfg.server_url, run_tests=run_tests,
                         idp_groups=IdPGroups(pg.prefix) if pg.enabled else None)


class PolicyUpdateDisabled(Exception):
    def __init__(self) -> None:
        super().__init__("update is disabled for modes other than 'database'")


class PolicyController:
    def __init__(self, cfg: Config, tailnet: Tailnet, engine: Engine,
                 on_swap: Callable[[], None]) -> None:
        self.cfg = cfg
        self.tailnet = tailnet
        self.engine = engine
        self.on_swap = on_swap  # rebuild the map context and tell every session
        self.mode = cfg.policy.mode
        self.text: str | None = None
        self.manager: PolicyManager | None = None

    @property
    def policy(self) -> Any:
        return self.manager if self.manager is not None else AllowAllPolicy()

    def build(self, text: str | None, *, run_tests: bool) -> PolicyManager | None:
        """Compile `text` against the live users and nodes; raises PolicyError."""
        return compile_policy(self.cfg, text, list(self.tailnet.users.values()),
                              list(self.tailnet.nodes.values()), run_tests=run_tests)

    async def load(self) -> None:
        """At start: a broken policy file or stored policy stops the server (Headscale too)."""
        text = await self._read_source()
        # Headscale only warns about failing policy tests at boot.
        self.manager = self.build(text, run_tests=False)
        self.text = text
        self._warn_failing_tests(self.manager)
        self.tailnet.listeners.append(self._on_changes)

    @staticmethod
    def _warn_failing_tests(manager: PolicyManager | None) -> None:
        failures = manager.test_failures() if manager is not None else []
        if failures:
            log.warning("policy tests failed (loaded anyway, as at boot):\n%s",
                        "\n".join(failures))

    async def _read_source(self) -> str | None:
        if self.mode == "database":
            return await asyncio.to_thread(self._latest_row)
        path = self.cfg.policy.path
        if not path:
            return None
        return await asyncio.to_thread(lambda: open(path, encoding="utf-8").read())

    def _latest_row(self) -> str | None:
        with Session(self.engine) as s:
            row = s.exec(select(PolicyRow).order_by(PolicyRow.id.desc())).first()  # type: ignore[union-attr]
            return row.data if row is not None else None

    def _store_row(self, text: str) -> PolicyRow:
        with Session(self.engine) as s:
            row = PolicyRow(data=text)
            s.add(row)
            s.commit()
            s.refresh(row)
            return row

    def _swap(self, manager: PolicyManager | None, text: str | None) -> None:
        self.manager, self.text = manager, text
        self.on_swap()

    def check(self, text: str) -> None:
        """Validate against live users and nodes without storing; raises PolicyError."""
        self.build(text, run_tests=True)

    async def set(self, text: str) -> PolicyRow:
        if self.mode != "database":
            raise PolicyUpdateDisabled()
        manager = self.build(text, run_tests=True)
        row = await asyncio.to_thread(self._store_row, text)
        self._swap(manager, text)
        return row

    async def reload(self) -> bool:
        """SIGHUP (file mode) or an external change: re-read, keep the old one on error."""
        try:
            text = await self._read_source()
            manager = self.build(text, run_tests=False)
        except (OSError, PolicyError) as e:
            log.error("policy not reloaded, keeping the running one: %s", e)
            return False
        if text == self.text:
            return False
        self._swap(manager, text)
        log.info("policy reloaded")
        return True

    def _on_changes(self, changes: tuple[Change, ...]) -> None:
        if self.manager is None or not any(_may_affect_policy(c) for c in changes):
            return
        # update() is False when nothing the policy reads changed: no new context then.
        if self.manager.update(users=list(self.tailnet.users.values()),
                               nodes=list(self.tailnet.nodes.values())):
            self.on_swap()


__all__ = ["PolicyController", "PolicyError", "PolicyUpdateDisabled"]

