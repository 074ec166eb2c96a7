"""Policy engine: HuJSON policy -> per-node packet filter, visibility, SSH policy, CapMap.

`PolicyManager` is what the mapper talks to. It is pure (no I/O); build it from the policy
text and a snapshot of users and nodes, and call `update()` when those change.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

from pyheadscale.gotext import goquote
from pyheadscale.idblocks import IdBlocks
from pyheadscale.policy.autoapprove import AutoApprover
from pyheadscale.policy.checks import run_policy_tests
from pyheadscale.policy.compile import (
    FILTER_ALLOW_ALL,
    CompiledGrant,
    Matcher,
    NodeInfo,
    Resolver,
    can_access,
    compile_node_attrs,
    via_app_pairs,
)
from pyheadscale.policy.entryindex import PieceParses
from pyheadscale.policy.errors import PolicyError, PolicyTestError
from pyheadscale.policy.evaluate import Evaluation
from pyheadscale.policy.hujson import HuJSONError
from pyheadscale.policy.idpgroups import IdPGroups
from pyheadscale.policy.memo import CompileMemo, MatcherMemo
from pyheadscale.policy.model import Alias, Policy
from pyheadscale.policy.noderules import (
    global_rules,
    has_per_node_grants,
    node_rules,
    reduce_rules,
)
from pyheadscale.policy.parse import parse_policy
from pyheadscale.policy.routes import RouteSteering
from pyheadscale.policy.ssh import (
    compile_ssh_policy,
    localpart_domain,
    run_ssh_tests,
    ssh_check_period,
)
from pyheadscale.state.model import Node, User
from pyheadscale.state.nodetable import NodeTable

__all__ = [
    "HuJSONError",
    "IdPGroups",
    "PolicyError",
    "PolicyManager",
    "PolicyTestError",
    "parse_policy",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _user_aliases(pol: Policy) -> Iterable[tuple[str, str]]:
    """(path, token) for every user token the policy mentions."""
    for g, members in pol.groups.items():
        for m in members:
            yield f"groups[{goquote(g)}]", m
    for t, owners in pol.tag_owners.items():
        for o in owners:
            if o.kind == "user":
                yield f"tagOwners[{goquote(t)}]", o.text
    for net, approvers in pol.auto_approve_routes.items():
        for a in approvers:
            if a.kind == "user":
                yield f"autoApprovers.routes[{goquote(str(net))}]", a.text
    for a in pol.auto_approve_exit:
        if a.kind == "user":
            yield "autoApprovers.exitNode", a.text
    for i, acl in enumerate(pol.acls or []):
        for al in [*acl.src, *(d.alias for d in acl.dst)]:
            if al.kind == "user":
                yield f"acls[{i}]", al.text
    for i, rule in enumerate(pol.ssh):
        for al in [*rule.src, *rule.dst]:
            if al.kind == "user":
                yield f"ssh[{i}]", al.text


def _all_aliases(pol: Policy) -> Iterable[Alias]:
    for acl in pol.acls or []:
        yield from acl.src
        yield from (d.alias for d in acl.dst)
    for g in pol.grants or []:
        yield from g.src
        yield from g.dst
    for r in pol.ssh:
        yield from r.src
        yield from r.dst
    for na in pol.node_attrs:
        yield from na.target


def _fingerprint(users: Sequence[User], nodes: Sequence[Node]) -> tuple[Any, ...]:
    """Everything of the snapshot the policy reads (IdP groups included); equal
    fingerprints, equal results."""
    return (
        tuple((u.id, u.name, u.email, u.provider_identifier, u.groups) for u in users),
        tuple(
            (n.id, n.ipv4, n.ipv6, n.tags, n.user_id, n.announced_routes, n.approved_routes)
            for n in nodes
        ),
    )


class PolicyManager:
    """Compiled policy for one snapshot of users and nodes.

    policy_text None (or blank) means no policy: allow-all, as Headscale does.
    tailnet_domains, when given, are the e-mail domains `user:*@<domain>` and
    `localpart:*@<domain>` may name (the hosted control plane refuses others).
    run_tests: evaluate the policy's `tests`/`sshTests` and refuse it if any fails
    (Headscale does so on `policy set`; at boot it only warns, so pass False there).
    idp_groups: makes users' IdP groups usable as `group:<prefix><label>` (pyheadscale
    extension, see policy/idpgroups.py); None resolves groups as Headscale does.
    """

    def __init__(
        self,
        policy_text: str | bytes | None,
        users: Sequence[User],
        nodes: Sequence[Node],
        *,
        server_url: str = "",
        tailnet_domains: Iterable[str] | None = None,
        run_tests: bool = True,
        idp_groups: IdPGroups | None = None,
    ) -> None:
        self.server_url = server_url.rstrip("/")
        self.idp_groups = idp_groups
        self.policy: Policy | None = parse_policy(
            policy_text, idp_group=idp_groups.may_name if idp_groups is not None else None
        )
        self.tailnet_domains = set(tailnet_domains) if tailnet_domains is not None else None
        self._users: list[User] = list(users)
        self._nodes: list[Node] = list(nodes)
        self._memo = CompileMemo()  # what update() reuses of the previous snapshot
        self._parses = PieceParses()  # the evaluation index's rule parses, likewise
        self._matchers = MatcherMemo()  # and its rules' matchers and node masks
        self._check_domains()
        self._recompute()
        self._check_user_references()
        if run_tests:
            failures = self.test_failures()
            if failures:
                raise PolicyTestError(failures)

    # ------------------------------------------------------------------ lifecycle

    def update(
        self, users: Sequence[User] | None = None, nodes: Sequence[Node] | None = None
    ) -> bool:
        """Recompute after users and/or nodes changed. Returns False (and keeps every cached
        result) when nothing the policy reads changed: endpoints, keys, names, hostinfo
        other than RoutableIPs and the like never reach the policy."""
        if users is not None:
            self._users = list(users)
        if nodes is not None:
            self._nodes = list(nodes)
        if _fingerprint(self._users, self._nodes) == self._fp:
            for n in self._nodes:  # fresh objects for what reads them (hostnames in tests)
                info = self._by_id.get(n.id)
                if info is not None:
                    info.node = n
            return False
        self._recompute()
        return True

    def _recompute(self) -> None:
        self._fp = _fingerprint(self._users, self._nodes)
        self._infos = [NodeInfo.of(n) for n in self._nodes]
        self._by_id = {i.id: i for i in self._infos}
        pol = self.policy
        idp = self.idp_groups.members(self._users) if self.idp_groups is not None else None
        self._res = Resolver(pol or Policy(), self._users, self._infos, idp)
        self._grants: list[CompiledGrant] = (
            self._memo.compile_grants(pol, self._res) if pol else [])
        self._per_node = has_per_node_grants(self._grants)
        self._global = global_rules(self._grants) if pol else list(FILTER_ALLOW_ALL)
        self._global_matchers: list[Matcher] | None = None
        self._node_attrs = compile_node_attrs(pol, self._res)
        self._auto = AutoApprover(pol, self._res)
        self._via_app = via_app_pairs(pol, self._res) if pol else []
        self._eval: Evaluation | None = None
        self._steering: RouteSteering | None = None
        self._filters: dict[int, list[dict[str, Any]]] = {}
        self._ssh: dict[int, dict[str, Any] | None] = {}
        self._peers: dict[int, IdBlocks] = {}
        self._same_table: tuple[NodeTable, int] | None = None  # see _same_ids

    def _evaluation(self) -> Evaluation:
        """The snapshot's evaluation index, built on first use after each recompute."""
        if self._eval is None:
            if self.policy is None:
                pieces: list[tuple[Any, dict[str, Any]]] = [((0, 0, 0), FILTER_ALLOW_ALL[0])]
            else:
                pieces = [
                    ((gi, 0, j), r)
                    for gi, g in enumerate(self._grants)
                    for j, r in enumerate(g.rules)
                ]
            self._eval = Evaluation(
                self._infos,
                self._res,
                pieces,
                self._global,
                self._grants if self._per_node and self.policy is not None else [],
                self._via_app,
                self._parses,
                self._matchers,
            )
        return self._eval

    def prepare(self) -> None:
        """Build the snapshot's evaluation index now (it is otherwise built on first use);
        nothing any query answers changes."""
        self._evaluation()

    def _check_domains(self) -> None:
        if self.policy is None or self.tailnet_domains is None:
            return
        errs = []
        for i, rule in enumerate(self.policy.ssh):
            for u in rule.users:
                d = localpart_domain(u)
                if d is not None and d not in self.tailnet_domains:
                    errs.append(
                        f"ssh[{i}].users: [ssh] {d} is not associated with this Tailnet and "
                        "cannot be used in user:*@<domain> expressions"
                    )
        for a in _all_aliases(self.policy):
            if a.kind == "user" and a.text.startswith("user:*@"):
                d = a.text[len("user:*@") :]
                if d not in self.tailnet_domains:
                    errs.append(
                        f"[ssh] {d} is not associated with this Tailnet and cannot be used in "
                        "user:*@<domain> expressions"
                    )
        if errs:
            raise PolicyError("; ".join(errs), errs)

    def _check_user_references(self) -> None:
        if self.policy is None or not self._users:
            return
        errs = []
        for path, token in _user_aliases(self.policy):
            trimmed = token[:-1] if token.endswith("@") else token
            if any(u.provider_identifier == trimmed for u in self._users if u.provider_identifier):
                continue
            found = [u for u in self._users if u.email == trimmed or u.name == trimmed]
            if len(found) > 1:
                errs.append(
                    f"{path}: multiple users found: token {goquote(token)} found: "
                    + ", ".join(f"{u.id}: {u.name}" for u in found)
                )
        if errs:
            raise PolicyError("validating policy user references: " + "; ".join(errs), errs)

    def test_failures(self) -> list[str]:
        """Failures of the policy's embedded tests and sshTests (empty when all pass)."""
        if self.policy is None:
            return []
        out: list[str] = []
        if self.policy.tests:
            out.extend(run_policy_tests(self.policy, self._global, self._res))
        if self.policy.ssh_tests:
            out.extend(run_ssh_tests(self.policy, self._res))
        return out

    # ------------------------------------------------------------------ queries

    def _info(self, node: Node | NodeInfo) -> NodeInfo:
        if isinstance(node, NodeInfo):
            return node
        info = self._by_id.get(node.id)
        return info if info is not None else NodeInfo.of(node)

    def _node_unreduced(self, info: NodeInfo) -> list[dict[str, Any]]:
        if self.policy is None or not self._per_node:
            return self._global
        return node_rules(self._grants, info, self._res)

    def _node_matchers(self, info: NodeInfo) -> list[Matcher]:
        if self.policy is None or not self._per_node:
            if self._global_matchers is None:
                self._global_matchers = [Matcher.of(r) for r in self._global]
            return self._global_matchers
        return [Matcher.of(r) for r in self._node_unreduced(info)]

    def _known(self, node: Node | NodeInfo) -> NodeInfo | None:
        info = self._by_id.get(node.id)
        return info if info is not None and (isinstance(node, Node) or info is node) else None

    def global_filter(self) -> list[dict[str, Any]]:
        """The tailnet's FilterRules before they are reduced per node (Headscale's
        State.Filter, shown by /debug/filter)."""
        return [dict(r) for r in self._global]

    def debug_string(self) -> str:
        """A summary of the compiled snapshot (/debug/policy-manager)."""
        pol = self.policy
        lines = ["=== Policy Manager ===", "",
                 f"Policy: {'none (allow all)' if pol is None else 'loaded'}",
                 f"Users: {len(self._users)}", f"Nodes: {len(self._nodes)}",
                 f"Grants (compiled): {len(self._grants)}",
                 f"Global filter rules: {len(self._global)}",
                 f"Per-node filters: {'yes' if self._per_node else 'no'}",
                 f"Cached node filters: {len(self._filters)}"]
        return "\n".join(lines) + "\n"

    def packet_filter(self, viewer: Node) -> list[dict[str, Any]]:
        """The FilterRules to send to viewer (already reduced to what it serves)."""
        rules = self._filters.get(viewer.id)
        if rules is not None:
            return rules
        info = self._known(viewer)
        if info is None:  # not in the snapshot: the direct definition
            return reduce_rules(self._info(viewer), self._node_unreduced(self._info(viewer)))
        rules, kept = self._evaluation().filter_kept(info)
        if kept:  # a node's own filter is built again if asked again (evaluate.py says why)
            self._filters[info.id] = rules
        return rules

    def peers(self, viewer: Node) -> AbstractSet[int]:
        """IDs of the nodes viewer may see."""
        info = self._known(viewer)
        if info is None:
            a = self._info(viewer)
            ma = self._node_matchers(a)
            return {o.id for o in self._infos if o.id != a.id and self._visible(a, o, ma)}
        return self._peer_set(info).without(info.id)

    def _peer_set(self, info: NodeInfo) -> IdBlocks:
        """Evaluation.peer_set, cached: may hold the node itself; shared between nodes."""
        out = self._peers.get(info.id)
        if out is None:
            out = self._peers[info.id] = self._evaluation().peer_set(info)
        return out

    def _visible(self, a: NodeInfo, b: NodeInfo, ma: list[Matcher]) -> bool:
        if can_access(a, b, ma) or can_access(b, a, ma):
            return True
        for srcs, routers in self._via_app:
            if (b.id in routers and srcs.contains_any(a.ips)) or (
                a.id in routers and srcs.contains_any(b.ips)
            ):
                return True
        mb = self._node_matchers(b)
        if mb is ma or (self.policy is None or not self._per_node):
            return False
        return can_access(a, b, mb) or can_access(b, a, mb)

    def peer_ids(self, viewer: Node, nodes: Mapping[int, Node]) -> AbstractSet[int]:
        """The mapper's PeerIndex: everything in ``nodes`` ``viewer`` may see, from the cached
        peer set (plus a pairwise look at nodes this snapshot does not have yet). When
        ``nodes`` are the snapshot's nodes (the usual case: the policy follows every node
        change), the answer is the shared IdBlocks the mapper diffs a block at a time."""
        if viewer.id not in self._by_id:
            return {i for i, n in nodes.items() if self.can_see(viewer, n)}
        out = self.peers(viewer)
        if self._same_ids(nodes):
            return out
        # Not the snapshot's nodes: a plain set (callers intersect it with theirs).
        extra = nodes.keys() - self._by_id.keys()
        return set(out) | {i for i in extra if self.can_see(viewer, nodes[i])}

    def _same_ids(self, nodes: Mapping[int, Node]) -> bool:
        """Does ``nodes`` hold exactly this snapshot's node IDs? Comparing reads every key;
        a live ``NodeTable`` found equal once stays so until its key set changes."""
        seen = self._same_table
        if seen is not None and seen[0] is nodes and seen[1] == seen[0].key_version:
            return True
        if nodes.keys() != self._by_id.keys():
            return False
        if isinstance(nodes, NodeTable):
            self._same_table = (nodes, nodes.key_version)
        return True

    def can_see(self, viewer: Node, peer: Node) -> bool:
        if viewer.id == peer.id:
            return False
        info = self._known(viewer)
        if info is not None and peer.id in self._by_id:
            return peer.id in self._peer_set(info)
        a, b = self._info(viewer), self._info(peer)
        return self._visible(a, b, self._node_matchers(a))

    def routes_for_peer(
        self, viewer: Node, peer: Node, primaries: Sequence[IPNetwork]
    ) -> list[IPNetwork]:
        """The routes `peer` offers `viewer`: those of its primaries and approved exit routes
        the viewer may use, steered by `via` grants (policy/routes.py). `primaries` are the
        peer's elected primary subnet routes."""
        info = self._known(viewer)
        if info is None:
            return []  # not in the snapshot: nothing is known to be allowed
        if self._steering is None:
            self._steering = RouteSteering(self.policy, self._res, self._evaluation())
        return self._steering.routes_for_peer(info, self._info(peer), primaries)

    def ssh_policy(self, viewer: Node) -> dict[str, Any] | None:
        info = self._info(viewer)
        if info.id not in self._ssh:
            self._ssh[info.id] = compile_ssh_policy(self.policy, self._res, info, self.server_url)
        return self._ssh[info.id]

    def node_capmap(self, viewer: Node) -> dict[str, Any]:
        """CapMap entries policy adds to viewer's own node (nodeAttrs, randomizeClientPort)."""
        return dict(self._node_attrs.get(viewer.id, {}))

    def nodes_with_attr(self, attr: str) -> frozenset[int]:
        """IDs of the nodes node_capmap() gives `attr`."""
        return frozenset(i for i, caps in self._node_attrs.items() if attr in caps)

    def peer_capmap(self, peer: Node) -> dict[str, Any]:
        """CapMap entries of peer as every viewer sees it. The hosted plane marks every approved
        exit node with suggest-exit-node (Headscale only copies the peer's own nodeAttr)."""
        info = self._info(peer)
        if info.is_exit:
            return {"suggest-exit-node": None}
        return {}

    def node_can_approve_route(self, node: Node, route: IPNetwork) -> bool:
        return self._auto.can_approve(self._info(node), route)

    def auto_approved_routes(self, node: Node) -> list[IPNetwork]:
        """The node's announced routes that autoApprovers approve."""
        return self._auto.approvable(self._info(node))

    @property
    def resolver(self) -> Resolver:
        """How the current snapshot's users, groups and tags resolve (tag ownership)."""
        return self._res

    def tag_exists(self, tag: str) -> bool:
        return self.policy is not None and tag in self.policy.tag_owners

    def tag_owned_by_tags(self, tag: str, owner_tags: Iterable[str]) -> bool:
        """May a credential holding `owner_tags` apply `tag`? Yes for a tag it holds, and for
        one that a held tag owns through tagOwners, directly or via other tags."""
        held = set(owner_tags)
        if tag in held:
            return True
        if self.policy is None:
            return False
        seen: set[str] = set()
        todo = [tag]
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            for owner in self.policy.tag_owners.get(t, ()):
                if owner.kind == "tag":
                    if owner.text in held:
                        return True
                    todo.append(owner.text)
        return False

    def ssh_check_period(self, src: Node, dst: Node) -> float | None:
        """Seconds an approved SSH check src -> dst stays valid (0: every session), or None
        when no check rule covers the pair."""
        return ssh_check_period(self.policy, self._res, self._info(src), self._info(dst))
