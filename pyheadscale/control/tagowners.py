"""Who may put which tag on a node at interactive/OIDC registration (`--advertise-tags`).

Headscale validates Hostinfo.RequestTags against the policy's tagOwners: a tag is allowed
when the authenticating user owns it (directly, or through a group), or when the node already
carries a tag that owns it (tags may own tags). Without a policy no tag exists, so none is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pyheadscale.policy import PolicyManager
from pyheadscale.state.model import Node, User

if TYPE_CHECKING:
    from pyheadscale.control.policyctl import PolicyController


def user_can_have_tag(manager: PolicyManager, user: User, node: Node | None, tag: str) -> bool:
    pol = manager.policy
    if pol is None:
        return False
    owners = pol.tag_owners.get(tag)
    if owners is None:
        return False
    # The compiled policy's resolver knows how `name@`/e-mail tokens and groups map to users.
    res = manager.resolver
    for owner in owners:
        if owner.kind == "user" and user.id in res.user_ids(owner.text):
            return True
        if owner.kind == "group":
            members = pol.groups.get(owner.text)
            if members is None:
                if user.id in res.idp_groups.get(owner.text, frozenset()):
                    return True
                continue
            if any(user.id in res.user_ids(m) for m in members):
                return True
        if owner.kind == "tag" and node is not None and owner.text in node.tags:
            return True
    return False


def tag_authorizer(policy_controller: PolicyController
                   ) -> Callable[[User, Node | None, str], bool]:
    """A check bound to whatever policy is running when it is called."""

    def allowed(user: User, node: Node | None, tag: str) -> bool:
        manager = policy_controller.manager
        return manager is not None and user_can_have_tag(manager, user, node, tag)

    return allowed
