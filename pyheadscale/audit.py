"""The audit log: exactly one line per admin action, naming who did it.

Every admin path calls `record` once per action that changed something: the REST APIs
(/api/v1, /api/v2, and the CLI through the unix socket) from their route guards
(api/audited.py), the web console through the same table, OIDC logins from the web flow.
Lines go to the `pyheadscale.audit` logger at info, message `audit`, with the fields
`action` (e.g. `user.create`), `actor` (`api_key:<prefix>`, `cli_socket`,
`oauth_client:<client id>`, `oidc:<user>`, `console:<session user>`), `target` (what was
acted on) and, for some actions, details. Secrets (keys, tokens, client secrets) never
appear; a key is named by its public prefix or ID.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from pyheadscale.logs import fields

log = logging.getLogger("pyheadscale.audit")

ActorKind = Literal["api_key", "cli_socket", "oauth_client", "oidc", "console", "system"]


@dataclass(frozen=True)
class Actor:
    """Who did it: the kind of credential and its public name."""

    kind: ActorKind
    name: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" if self.name else self.kind


CLI_SOCKET = Actor("cli_socket")


def record(actor: Actor, action: str, target: str, **details: object) -> None:
    """One admin action that took effect."""
    clean = {k: v for k, v in details.items() if v not in (None, "", [], ())}
    log.info("audit", extra=fields(action=action, actor=str(actor), target=target, **clean))
