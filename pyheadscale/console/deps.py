"""What the console's pages use, handed over by the control plane (never the plane itself)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyheadscale.api.actions import AdminActions
from pyheadscale.auth.webflow import PendingRegistrations
from pyheadscale.config import AdminConsoleConfig, DNSConfig
from pyheadscale.mapper.context import MapContext
from pyheadscale.state.tailnet import Tailnet

if TYPE_CHECKING:
    from pyheadscale.auth.oidc import OIDCProvider
    from pyheadscale.control.policyctl import PolicyController


@dataclass(frozen=True)
class ConsoleDeps:
    tailnet: Tailnet  # read users, nodes and keys
    actions: AdminActions  # every write, the same path as /api/v1
    policy: PolicyController  # the running policy, its store (history) and checks
    pending: PendingRegistrations  # interactive registrations waiting for an admin
    context: Callable[[], MapContext]  # DERP map, DNS, primary routes as clients get them
    dns: DNSConfig  # the config file's dns section (what is and is not editable)
    oidc: OIDCProvider | None  # sign-in with the configured provider
    relay_clients: Callable[[], int | None]  # clients on the embedded relay (None: none)
    embedded_region: int | None  # the embedded relay's region id
    # Replace the extra DNS records (only with dns.extra_records_path: the config file
    # itself is never written).
    write_extra_records: Callable[[Sequence[Mapping[str, str]]], Awaitable[None]] | None
    settings: AdminConsoleConfig
    server_url: str
