"""The running policy: loading (file or database mode), validation, live recompilation.

A rejected policy never replaces the running one: a new `PolicyManager` is built and checked
first, and only swapped in (and stored, in database mode) once it compiled and its tests pass.
The text itself lives in state/policystore.py, which the API and the CLI use too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from pyheadscale import metrics
from pyheadscale.config import Config
from pyheadscale.mapper.context import AllowAllPolicy, Policy
from pyheadscale.policy import IdPGroups, PolicyError, PolicyManager
from pyheadscale.state.changes import Change, ChangeKind, Field
from pyheadscale.state.errors import Unavailable
from pyheadscale.state.model import Node, User
from pyheadscale.state.policystore import PolicyStore, PolicyUpdateDisabled, StoredPolicy
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


class PolicyController:
    """The running policy: its text and compiled manager, swapped only whole."""

    def __init__(self, cfg: Config, tailnet: Tailnet, engine: Engine,
                 on_swap: Callable[[], None]) -> None:
        self.cfg = cfg
        self.tailnet = tailnet
        self.store = PolicyStore(cfg.policy, engine)
        self.on_swap = on_swap  # rebuild the map context and tell every session
        self.text: str | None = None
        self.manager: PolicyManager | None = None
        self._reloading: asyncio.Task[bool] | None = None

    @property
    def mode(self) -> str:
        """"file" or "database" (policy.mode)."""
        return self.store.mode

    @property
    def policy(self) -> Policy:
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
        if self.mode == "database":
            # Another instance (or the CLI's direct access) stored a new version.
            self.tailnet.on_table("policies", lambda _keys: self._reload_soon())

    def _reload_soon(self) -> None:
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.get_running_loop().create_task(self.reload())

    @staticmethod
    def _warn_failing_tests(manager: PolicyManager | None) -> None:
        failures = manager.test_failures() if manager is not None else []
        if failures:
            log.warning("policy tests failed (loaded anyway, as at boot):\n%s",
                        "\n".join(failures))

    async def _read_source(self) -> str | None:
        current = await asyncio.to_thread(self.store.current)
        return current.data if current is not None else None

    def _swap(self, manager: PolicyManager | None, text: str | None) -> None:
        self.manager, self.text = manager, text
        self.on_swap()

    async def get(self) -> StoredPolicy:
        """The stored policy with its update time (PolicyNotFound, PolicyReadError,
        Unavailable)."""
        try:
            return await asyncio.to_thread(self.store.get)
        except SQLAlchemyError as e:
            raise Unavailable(f"database unavailable: {str(e).splitlines()[0]}") from e

    async def check(self, text: str) -> None:
        """Validate against live users and nodes without storing; raises PolicyError."""
        await asyncio.to_thread(self.build, text, run_tests=True)

    async def set(self, text: str) -> StoredPolicy:
        """Compile once, refuse it whole on any error, store it, then run it.

        Raises PolicyUpdateDisabled (file mode) or PolicyError."""
        if self.mode != "database":
            raise PolicyUpdateDisabled()
        manager = self.build(text, run_tests=True)
        nodes = self.tailnet.list_nodes()
        if manager is not None and nodes:
            manager.ssh_policy(nodes[0])  # Headscale rejects SSH rules that fail to compile
        stored = await self.tailnet.run_in_tx(lambda tx: self.store.put_tx(tx, text))
        self._swap(manager, text)
        return stored

    def prepare(self) -> None:
        """Build what every map session's frame under the running policy reads (its
        evaluation index) now rather than on first use; the results are the same."""
        if self.manager is not None:
            self.manager.prepare()

    def tag_exists(self, tag: str) -> bool:
        return self.manager is not None and self.manager.tag_exists(tag)

    def tag_owned_by_tags(self, tag: str, owner_tags: Sequence[str]) -> bool:
        """May a credential holding `owner_tags` apply `tag`? A held tag needs no policy."""
        if tag in owner_tags:
            return True
        return self.manager is not None and self.manager.tag_owned_by_tags(tag, owner_tags)

    def ssh_check_period(self, src: Node, dst: Node) -> float | None:
        """See PolicyManager.ssh_check_period; None without a policy."""
        return self.manager.ssh_check_period(src, dst) if self.manager is not None else None

    async def reload(self) -> bool:
        """SIGHUP (file mode) or an external change: re-read, keep the old one on error."""
        try:
            text = await self._read_source()
            if text == self.text:
                return False
            manager = self.build(text, run_tests=False)
        except (OSError, SQLAlchemyError, PolicyError) as e:
            log.error("policy not reloaded, keeping the running one: %s", e)
            return False
        self._swap(manager, text)
        log.info("policy reloaded")
        return True

    def _on_changes(self, changes: tuple[Change, ...]) -> None:
        if self.manager is None or not any(_may_affect_policy(c) for c in changes):
            return
        # update() is False when nothing the policy reads changed: no new context then.
        with metrics.Timer(metrics.nodestore_snapshot_build):
            changed = self.manager.update(users=list(self.tailnet.users.values()),
                                          nodes=list(self.tailnet.nodes.values()))
        if changed:
            self.on_swap()


__all__ = ["PolicyController", "PolicyError", "PolicyUpdateDisabled", "compile_policy"]
