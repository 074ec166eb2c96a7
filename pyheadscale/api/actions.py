"""Every admin write, once: the REST API (/api/v1) and the web console both call these.

An action checks its input the way Headscale's API does (same messages, raised as APIError
with the API's status) and performs the write through the tailnet or the policy controller.
Callers only translate their own input (JSON bodies, form fields) into arguments and the
result into their own answer. The audit line is not written here but by the caller, from
the one table of api/audited.py keyed by the API operation: the /api/v1 guard after a 2xx
answer, the console after the action returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from pyheadscale.api.errors import APIError, bad_request, from_state, not_found, state_errors
from pyheadscale.api.request import (
    check_auth_id,
    check_tags,
    go_list,
    parse_prefix,
    validate_tag,
)
from pyheadscale.auth.webflow import UnknownAuthID
from pyheadscale.policy import PolicyError
from pyheadscale.state.errors import StateError
from pyheadscale.state.model import Node, PreAuthKey, User
from pyheadscale.state.policystore import PolicyUpdateDisabled, StoredPolicy

if TYPE_CHECKING:  # handlers/base.py builds AdminActions from its AdminDeps
    from pyheadscale.api.handlers.base import AdminDeps

class AdminActions:
    """The admin writes, with the checks and messages of Headscale's API."""

    def __init__(self, deps: AdminDeps) -> None:
        self.deps = deps
        self.tailnet = deps.tailnet

    def _node(self, node_id: int) -> Node:
        n = self.tailnet.nodes.get(node_id)
        if n is None:
            raise not_found("node not found")
        return n

    def user_by_name(self, name: str, context: str) -> User:
        u = self.tailnet.user_by_name(name) if name else None
        if u is None:
            raise not_found(f"{context}: user not found")
        return u

    # -- nodes -----------------------------------------------------------------------------

    async def delete_node(self, node_id: int) -> None:
        self._node(node_id)
        with state_errors("deleting node"):
            await self.tailnet.delete_node(node_id)

    async def expire_node(self, node_id: int, *, expiry: datetime | None = None,
                          disable: bool = False) -> Node:
        """Expire now, at `expiry`, or never (`disable`)."""
        if disable and expiry is not None:
            raise bad_request("cannot set both disable_expiry and expiry")
        with state_errors("expiring node"):
            if disable:
                n = await self.tailnet.set_expiry(node_id, None)
            elif expiry is not None:
                n = await self.tailnet.set_expiry(node_id, expiry)
            else:
                n = await self.tailnet.expire_node(node_id)
        return n

    async def rename_node(self, node_id: int, new_name: str) -> Node:
        try:
            n = await self.tailnet.rename_node(node_id, new_name)
        except StateError as e:
            # Headscale ErrNodeNameNotUnique / ErrGivenNameInvalid are 400s.
            err = from_state("renaming node", e)
            if err.status == 409:
                err.status = 400
            raise err from None
        return n

    async def set_tags(self, node_id: int, tags: Sequence[str]) -> Node:
        if not tags:
            raise bad_request("cannot remove all tags from a node - tagged nodes must have at "
                              "least one tag")
        # Headscale's SetTags messages carry no "setting tags:" context (its CLI adds it).
        for t in tags:
            if problem := validate_tag(t):
                raise bad_request(problem)
        self._node(node_id)
        invalid = [t for t in tags if not self.deps.policy.tag_exists(t)]
        if invalid:
            raise bad_request(f"requested tags {go_list(invalid)} are invalid or not permitted")
        with state_errors("setting tags"):
            n = await self.tailnet.set_tags(node_id, tags)
        return n

    async def approve_routes(self, node_id: int, routes: Sequence[str]) -> Node:
        """Replace the node's approved routes (an empty list unapproves them all)."""
        for r in routes:
            if parse_prefix(r) is None:
                raise bad_request(f'parsing route: netip.ParsePrefix("{r}"): invalid prefix')
        with state_errors("setting approved routes"):
            n = await self.tailnet.approve_routes(node_id, routes)
        return n

    async def backfill_ips(self) -> list[str]:
        with state_errors("backfilling node IPs"):
            changes = await self.tailnet.backfill_node_ips()
        return changes

    # -- pending registrations -------------------------------------------------------------

    async def register_pending(self, auth_id: str, user_name: str) -> Node:
        """Complete the interactive registration waiting under `auth_id` for a user."""
        check_auth_id(auth_id, "registering node")
        u = self.user_by_name(user_name, "looking up user")
        try:
            with state_errors("registering node"):
                n = await self.deps.register(auth_id, u.id)
        except UnknownAuthID as e:
            raise not_found(f"registering node: {e}") from None
        return n

    async def reject_pending(self, auth_id: str) -> None:
        """Refuse a waiting registration or SSH check; the client is told."""
        if auth_id in self.deps.sshchecks:  # an SSH check-mode session waits on it
            self.deps.sshchecks.reject(auth_id)
        else:
            check_auth_id(auth_id, "invalid auth_id")
            try:
                self.deps.pending.get(auth_id)
                self.deps.pending.reject(auth_id, "auth request rejected")
            except UnknownAuthID:
                raise not_found(f"no pending auth session for auth_id {auth_id}") from None

    async def approve_pending(self, auth_id: str) -> None:
        """Approve an SSH check; a registration approved without a user starts over."""
        if auth_id in self.deps.sshchecks:
            self.deps.sshchecks.approve(auth_id)
        else:
            check_auth_id(auth_id, "invalid auth_id")
            try:
                self.deps.pending.get(auth_id)
            except UnknownAuthID:
                raise not_found(f"no pending auth session for auth_id {auth_id}") from None
            # The waiting client is told to start over with a fresh AuthURL, which is what
            # Headscale's follow-up handler does with a node-less verdict.
            self.deps.pending.discard(auth_id)

    # -- users -----------------------------------------------------------------------------

    async def create_user(self, name: str, *, display_name: str = "",
                          email: str = "", picture_url: str = "") -> User:
        if name and self.tailnet.user_by_name(name) is not None:
            raise APIError(409, "user already exists")
        with state_errors("creating user"):
            u = await self.tailnet.create_user(name, display_name=display_name, email=email,
                                               profile_pic_url=picture_url)
        return u

    async def rename_user(self, user_id: int, new_name: str) -> User:
        with state_errors("renaming user"):
            self.tailnet.get_user(user_id)
            u = await self.tailnet.rename_user(user_id, new_name)
        return u

    async def delete_user(self, user_id: int) -> None:
        # Headscale ErrUserStillHasNodes (a Conflict) is a 400.
        with state_errors("deleting user", conflict_status=400):
            self.tailnet.get_user(user_id)
            await self.tailnet.delete_user(user_id)

    # -- pre-auth keys and API keys --------------------------------------------------------

    async def create_preauth_key(self, user_id: int | None, *, reusable: bool,
                                 ephemeral: bool, expiration: datetime | None,
                                 tags: Sequence[str]) -> tuple[PreAuthKey, str]:
        """A new key and its full text (shown once)."""
        check_tags(tags, "invalid tag")
        with state_errors("creating pre-auth key"):
            if user_id:
                self.tailnet.get_user(user_id)
            k, full = await self.tailnet.create_preauth_key(
                user_id or None, reusable=reusable, ephemeral=ephemeral,
                expiration=expiration, tags=list(tags))
        return k, full

    async def expire_preauth_key(self, key_id: int) -> None:
        with state_errors("expiring pre-auth key"):
            await self.tailnet.expire_preauth_key(key_id)

    async def delete_preauth_key(self, key_id: int) -> None:
        with state_errors("deleting pre-auth key"):
            await self.tailnet.delete_preauth_key(key_id)

    async def create_api_key(self, expiration: datetime | None,
                             user_id: int | None = None) -> str:
        with state_errors("creating api key"):
            a, full = await self.tailnet.create_api_key(expiration, user_id=user_id)
        return full

    async def expire_api_key(self, key_id: int) -> None:
        with state_errors("expiring api key"):
            await self.tailnet.expire_api_key(key_id)

    async def delete_api_key(self, key_id: int) -> None:
        with state_errors("deleting api key"):
            await self.tailnet.delete_api_key(key_id)

    # -- policy ----------------------------------------------------------------------------

    async def set_policy(self, text: str) -> StoredPolicy:
        """Compile, run the policy's tests, store, swap in (PolicyController.set)."""
        try:
            p = await self.deps.policy.set(text)
        except PolicyUpdateDisabled as e:
            raise bad_request(str(e)) from None
        except PolicyError as e:
            raise bad_request(f"setting policy: {e}") from None
        except StateError as e:  # the database is away: 503, nothing stored
            raise from_state("setting policy", e) from None
        return p
