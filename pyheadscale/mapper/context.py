"""What a map depends on besides the nodes and users: config-derived values and the policy.

A ``MapContext`` is immutable. Whoever builds it (the app) must give a new one a higher
``generation`` whenever anything in it changes (policy, primary routes, DNS, DERP, base
domain); the peer-entry cache is keyed by it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol, cast, runtime_checkable

import orjson

from pyheadscale.idblocks import IdBlocks
from pyheadscale.mapper.dns import DNSSettings, build_dns_config
from pyheadscale.state.model import IPNetwork, Node
from pyheadscale.tailcfg import dumps

__all__ = ["ALLOW_ALL_FILTER", "AllowAllPolicy", "MapContext", "PeerIndex", "Policy",
           "exit_routes", "visible_ids"]

NODE_ATTR_SUGGEST_EXIT_NODE = "suggest-exit-node"
# Hides the node's IPv4 address from itself and its peers, and every peer's IPv4 address
# from it (the hosted plane's behaviour, CGNAT conflicts).
NODE_ATTR_DISABLE_IPV4 = "disable-ipv4"


@runtime_checkable
class Policy(Protocol):
    """What the mapper asks of the policy engine (policy/ implements it)."""

    def packet_filter(self, viewer: Node) -> list[dict[str, Any]]:
        """FilterRules for traffic that may reach ``viewer`` (``[]`` = deny all)."""
        ...

    def can_see(self, viewer: Node, peer: Node) -> bool:
        """Whether ``peer`` appears in ``viewer``'s netmap at all."""
        ...

    def ssh_policy(self, viewer: Node) -> dict[str, Any] | None:
        """tailcfg.SSHPolicy for ``viewer`` or None."""
        ...

    def node_capmap(self, viewer: Node) -> dict[str, list[Any]]:
        """Policy node attributes, overlaid on the baseline self CapMap."""
        ...

    def peer_capmap(self, peer: Node) -> dict[str, Any]:
        """The CapMap ``peer`` shows its viewers (empty for most peers); the same for every
        viewer, so shared peer entries can carry it."""
        ...

    def nodes_with_attr(self, attr: str) -> Collection[int]:
        """IDs of the nodes whose CapMap the policy gives ``attr``."""
        ...

    def routes_for_peer(
        self, viewer: Node, peer: Node, primaries: Sequence[IPNetwork]
    ) -> Sequence[IPNetwork]:
        """The routes ``peer`` offers ``viewer``, out of its elected ``primaries`` and its
        approved exit routes (and, with ``via`` grants, routes steered to it)."""
        ...


@runtime_checkable
class PeerIndex(Protocol):
    """A policy that knows each viewer's whole peer set at once (policy/ implements it):
    the mapper then works with set operations instead of asking `can_see` per pair."""

    def peer_ids(self, viewer: Node, nodes: Mapping[int, Node]) -> AbstractSet[int]:
        """The IDs of ``nodes`` that ``viewer`` may see, as ``can_see`` says, never its own;
        the set may also name nodes no longer in ``nodes`` (callers intersect). Read only."""
        ...


# Go's tailcfg FilterAllowAll: every source, every destination and port.
ALLOW_ALL_FILTER: list[dict[str, Any]] = [
    {"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}
]


class AllowAllPolicy:
    """Headscale's behaviour without a policy file: allow-all filter, full mesh, no SSH.

    Baseline CapMap entries (is-admin, ssh, file-sharing, default-auto-update) are added by
    the mapper for every policy, as Headscale's ``TailNode`` does, so none are returned here.
    """

    def packet_filter(self, viewer: Node) -> list[dict[str, Any]]:
        return [
            {"SrcIPs": list(r["SrcIPs"]), "DstPorts": [dict(p) for p in r["DstPorts"]]}
            for r in ALLOW_ALL_FILTER
        ]

    def can_see(self, viewer: Node, peer: Node) -> bool:
        return True

    def ssh_policy(self, viewer: Node) -> dict[str, Any] | None:
        return None

    def node_capmap(self, viewer: Node) -> dict[str, list[Any]]:
        return {}

    def nodes_with_attr(self, attr: str) -> Collection[int]:
        return ()

    def peer_capmap(self, peer: Node) -> dict[str, Any]:
        # As the hosted plane does for every policy: approved exit nodes are suggestible.
        return {NODE_ATTR_SUGGEST_EXIT_NODE: None} if exit_routes(peer) else {}

    def routes_for_peer(
        self, viewer: Node, peer: Node, primaries: Sequence[IPNetwork]
    ) -> Sequence[IPNetwork]:
        return [*primaries, *exit_routes(peer)]  # everyone may use everything


def exit_routes(node: Node) -> list[IPNetwork]:
    """The node's approved and announced exit routes (0.0.0.0/0, ::/0)."""
    announced = set(node.announced_routes)
    return [r for r in node.approved_routes if r.prefixlen == 0 and r in announced]


# isinstance() against a runtime-checkable Protocol looks up every member on each call
# (a few us, paid per viewer per policy change): the answer is kept per policy class.
_PEER_INDEX_TYPES: dict[type, bool] = {}


def _is_peer_index(policy: Policy) -> bool:
    t = type(policy)
    known = _PEER_INDEX_TYPES.get(t)
    if known is None:
        known = _PEER_INDEX_TYPES[t] = isinstance(policy, PeerIndex)
    return known


def visible_ids(policy: Policy, viewer: Node,
                nodes: Mapping[int, Node]) -> AbstractSet[int] | None:
    """The IDs in ``nodes`` the viewer may see, or None for every node but itself."""
    if type(policy) is AllowAllPolicy:
        return None
    if _is_peer_index(policy):
        return cast(PeerIndex, policy).peer_ids(viewer, nodes)
    return {i for i, n in nodes.items() if i != viewer.id and policy.can_see(viewer, n)}


def visible_blocks(policy: Policy, viewer: Node, nodes: Mapping[int, Node]) -> IdBlocks | None:
    """The viewer's visible IDs when the policy's index holds them as a shared IdBlocks (a
    lookup, no per-node test); None when it does not (ask ``can_see`` per node then)."""
    if _is_peer_index(policy):
        got = cast(PeerIndex, policy).peer_ids(viewer, nodes)
        if isinstance(got, IdBlocks):
            return got
    return None


@dataclass(frozen=True)
class MapContext:
    """Inputs shared by every viewer's map.

    ``domain`` is MapResponse.Domain (Headscale sends the server_url host); empty falls back
    to ``base_domain``. ``primary_routes`` maps node ID to the subnet routes that node is the
    elected primary for (approved, announced, online).
    """

    base_domain: str = ""
    domain: str = ""
    dns: DNSSettings = field(default_factory=DNSSettings)
    derp_map: Mapping[str, Any] = field(default_factory=dict)
    policy: Policy = field(default_factory=AllowAllPolicy)
    primary_routes: Mapping[int, Sequence[IPNetwork]] = field(default_factory=dict)
    taildrop: bool = True  # Headscale taildrop.enabled (default true) -> file-sharing cap
    auto_update: bool = False  # Headscale auto_update.enabled -> default-auto-update [bool]
    logtail: bool = False  # Headscale logtail.enabled; false -> Debug.DisableLogTail
    generation: int = 0

    @property
    def map_domain(self) -> str:
        return self.domain or self.base_domain

    @cached_property
    def dns_config(self) -> dict[str, Any]:
        return build_dns_config(self.dns, self.base_domain)

    @cached_property
    def dns_fragment(self) -> orjson.Fragment:
        # Same for every viewer: encode once per context.
        return orjson.Fragment(dumps(self.dns_config))

    @cached_property
    def derp_fragment(self) -> orjson.Fragment:
        return orjson.Fragment(dumps(dict(self.derp_map)))

    @cached_property
    def ipv4_disabled(self) -> frozenset[int]:
        """IDs of the nodes the policy gives disable-ipv4 (fixed for a context)."""
        return frozenset(self.policy.nodes_with_attr(NODE_ATTR_DISABLE_IPV4))

    def routes_of(self, node_id: int) -> tuple[IPNetwork, ...]:
        out = []
        for r in self.primary_routes.get(node_id, ()):
            out.append(r if not isinstance(r, str) else ipaddress.ip_network(r, strict=False))
        return tuple(out)
