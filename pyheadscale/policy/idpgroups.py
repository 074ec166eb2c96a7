"""IdP groups as policy groups (pyheadscale extension, off unless `oidc.policy_groups.enabled`).

The groups claim of a user's last OIDC login (User.groups) makes that user a member of
`group:<prefix><label>`, where <label> is the IdP group name with surrounding slashes and
space stripped, lower-cased, and every run of characters outside [a-z0-9._-] replaced by "-"
("Eng Team" and Keycloak's "/eng team" both become `eng-team`), leading/trailing "-" dropped.

Rules, chosen so an enabled server still behaves like Headscale for policy-defined groups:
- A group defined in the policy's `groups` section always wins: its members are exactly the
  listed ones, even when an IdP group maps to the same name (no merge, so the IdP cannot widen
  a group the policy spells out).
- A reference to an undefined group is accepted only when its name is one the mapping can
  produce under the prefix (`group:<prefix><label>`, label in [a-z0-9._-]); it resolves to the
  current members, possibly none. Any other undefined group keeps Headscale's error
  ("group not defined in policy"), so a non-empty prefix keeps typo detection for the rest.
- Membership is recomputed whenever users change (the next login updates it live).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from pyheadscale.state.model import User

_LABEL_CHARS = re.compile(r"[^a-z0-9._-]+")
_LABEL = re.compile(r"[a-z0-9._-]+")


def policy_group_name(idp_group: str, prefix: str = "") -> str:
    """`group:<prefix><label>` for one IdP group name (label may be empty: see above)."""
    label = _LABEL_CHARS.sub("-", idp_group.strip().strip("/").strip().lower())
    return f"group:{prefix}{label.strip('-')}"


def policy_groups(users: Iterable[User], prefix: str = "") -> dict[str, list[str]]:
    """IdP groups as policy groups: `group:<prefix><label>` -> member tokens (sorted).

    Tokens are what a policy would write for the user (e-mail, else `name@`); for display.
    """
    out: dict[str, set[str]] = {}
    for u in users:
        token = u.email or (f"{u.name}@" if u.name else "")
        if not token:
            continue
        for name in IdPGroups(prefix).user_groups(u):
            out.setdefault(name, set()).add(token)
    return {k: sorted(v) for k, v in sorted(out.items())}


@dataclass(frozen=True)
class IdPGroups:
    """The mapping in force: pass one to PolicyManager to enable IdP groups."""

    prefix: str = ""

    def name(self, idp_group: str) -> str:
        return policy_group_name(idp_group, self.prefix)

    def user_groups(self, user: User) -> set[str]:
        """Policy group names the user belongs to through the IdP (empty labels dropped)."""
        empty = f"group:{self.prefix}"
        return {n for n in map(self.name, user.groups) if n != empty}

    def may_name(self, group: str) -> bool:
        """Could `group` ("group:...") be produced by the mapping under this prefix?"""
        head = f"group:{self.prefix}"
        if not group.startswith(head):
            return False
        label = group[len(head):]
        return bool(_LABEL.fullmatch(label)) and label == label.strip("-")

    def members(self, users: Iterable[User]) -> dict[str, frozenset[int]]:
        """Policy group name -> IDs of the users in it."""
        out: dict[str, set[int]] = {}
        for u in users:
            for name in self.user_groups(u):
                out.setdefault(name, set()).add(u.id)
        return {k: frozenset(v) for k, v in out.items()}


__all__ = ["IdPGroups", "policy_group_name", "policy_groups"]
