"""Route auto-approval from `autoApprovers` (Headscale's NodeCanApproveRoute)."""

from __future__ import annotations

import ipaddress

from pyheadscale.policy.compile import NodeInfo, Resolver
from pyheadscale.policy.ipset import IPSet, is_exit_route
from pyheadscale.policy.model import Policy

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AutoApprover:
    def __init__(self, pol: Policy | None, res: Resolver) -> None:
        self.routes: dict[IPNetwork, IPSet] = {}
        self.exit: IPSet | None = None
        if pol is None:
            return
        for net, approvers in pol.auto_approve_routes.items():
            self.routes[net] = res.resolve_all(approvers)
        if pol.auto_approve_exit:
            self.exit = res.resolve_all(pol.auto_approve_exit)

    def can_approve(self, node: NodeInfo, route: IPNetwork) -> bool:
        if is_exit_route(route):
            return self.exit is not None and self.exit.contains_any(node.ips)
        for net, approvers in self.routes.items():
            if net.version != route.version or net.prefixlen > route.prefixlen:
                continue
            if route.subnet_of(net) and approvers.contains_any(node.ips):  # type: ignore[arg-type]
                return True
        return False

    def approvable(self, node: NodeInfo) -> list[IPNetwork]:
        """Announced routes of the node that policy auto-approves (exit routes come as a pair)."""
        out = [r for r in node.node.announced_routes if self.can_approve(node, r)]
        return out
