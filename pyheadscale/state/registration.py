"""Registering machines: with a pre-auth key, or for a user once a person approved it (CLI,
API or OIDC). A machine that registers again keeps its node (ID, addresses, name) wherever
Headscale keeps it: same owner, a key rotation, a tagged key converting the node."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from pyheadscale.auth import preauthkeys as pk
from pyheadscale.db import models as db
from pyheadscale.state import names, persist
from pyheadscale.state.base import serialized, utcnow
from pyheadscale.state.changes import Change, ChangeKind, Field
from pyheadscale.state.errors import Conflict, InvalidArgument, InvalidAuthKey, StateError
from pyheadscale.state.ipam import IPAllocationError
from pyheadscale.state.keys import KeyWrites
from pyheadscale.state.mapreq import merge_hostinfo
from pyheadscale.state.model import Node, PreAuthKey


@dataclass(frozen=True)
class JoinRequest:
    """What a registering machine asks for."""

    machine_key: bytes
    node_key: bytes
    hostinfo: dict[str, Any]
    requested_expiry: datetime | None = None
    capver: int = 0

    @property
    def hostname(self) -> str:
        return str(self.hostinfo.get("Hostname") or "")

    @property
    def request_tags(self) -> tuple[str, ...]:
        """Hostinfo.RequestTags (`--advertise-tags`), sorted and without repeats."""
        tags = self.hostinfo.get("RequestTags") or ()
        if not isinstance(tags, list | tuple):
            return ()
        return tuple(sorted({str(t) for t in tags if t}))

    @property
    def advertised_tags(self) -> list[str]:
        """Hostinfo.RequestTags as the client sent them (for messages)."""
        tags = self.hostinfo.get("RequestTags") or ()
        return [str(t) for t in tags] if isinstance(tags, list | tuple) else []


class Registration(KeyWrites):
    """Registration redeems pre-auth keys, so it builds on the key part."""

    def _existing_for_pak(self, machine_key: bytes, pak: PreAuthKey) -> Node | None:
        """Headscale findExistingNodeForPAK: the node this machine already has for the key's
        owner (or a tagged one); a tagged key without an owner may convert a single
        user-owned node. A key with an owner never takes another user's node: a user1 node
        logging in with user2's tagged key becomes a new node, user1's stays."""
        nodes = self.nodes_by_machine_key(machine_key)
        tagged = [n for n in nodes if n.is_tagged]
        if pak.user_id is not None:
            for n in nodes:
                if n.user_id == pak.user_id and not n.is_tagged:
                    return n
            return tagged[0] if tagged else None
        if pak.tags:
            if tagged:
                return tagged[0]
            owned = [n for n in nodes if n.user_id is not None and not n.is_tagged]
            if len(owned) == 1:
                return owned[0]
            if len(owned) > 1:
                raise Conflict("machine key maps to ambiguous node ownership")
        return None

    # --- with a pre-auth key -----------------------------------------------------------------

    async def register_with_authkey(
        self, machine_key: bytes, node_key: bytes, old_node_key: bytes | None,
        hostinfo: Mapping[str, Any] | None, *, key: str,
        requested_expiry: datetime | None = None, ephemeral: bool = False, capver: int = 0,
        now: datetime | None = None,
    ) -> Node:
        """Register (or re-register) the machine with a pre-auth key (Headscale
        HandleNodeFromPreAuthKey). The client's Ephemeral flag is ignored as in Headscale:
        ephemerality comes from the key."""
        pak = await self.find_preauth_key(key)  # bcrypt, outside the write lock
        join = JoinRequest(machine_key, node_key, dict(hostinfo or {}), requested_expiry,
                           capver)
        return await self._redeem(join, pak.id, old_node_key=old_node_key, now=now)

    @serialized
    async def _redeem(self, join: JoinRequest, pak_id: int, *, old_node_key: bytes | None,
                      now: datetime | None) -> Node:
        now_ = now or utcnow()
        pak = self.preauth_keys.get(pak_id)
        if pak is None:
            raise InvalidAuthKey(pk.ERR_UNKNOWN)
        existing = self._existing_for_pak(join.machine_key, pak)
        if existing is None and old_node_key:
            # A rotation from a node this machine owns keeps that node.
            prev = self.node_by_node_key(old_node_key)
            if prev is not None and prev.machine_key == join.machine_key:
                existing = prev
        converting = existing is not None and bool(pak.tags) and not existing.is_tagged
        skip = (existing is not None and existing.node_key == join.node_key
                and not existing.is_expired(now_) and not converting)
        if not skip:
            reason = pk.unusable_reason(pak, now_)
            if (reason == pk.ERR_USED and existing is not None
                    and existing.auth_key_id == pak.id and not existing.is_expired(now_)):
                reason = None  # the same machine presenting its key again
            if reason is not None:
                raise InvalidAuthKey(reason)
        if pak.user_id is None and not pak.tags:
            raise InvalidAuthKey(pk.ERR_INVALID)  # its user was deleted
        if pak.user_id is not None and not pak.tags and pak.user_id not in self.users:
            raise InvalidAuthKey(pk.ERR_INVALID)
        self._check_node_key_free(join.node_key, join.machine_key)
        mark_used = not pak.reusable and not pak.used
        if existing is not None:
            # Re-registration ignores `--advertise-tags`: the node keeps its tags and owner.
            return await self._reregister(existing, join, pak, converting=converting,
                                          mark_used=mark_used, now=now_)
        if join.request_tags:
            # Headscale 0.29.2: a node joining with a pre-auth key takes its tags from the
            # key only; any `--advertise-tags`, even the key's own tags, is refused.
            raise InvalidArgument(f"requested tags [{' '.join(join.advertised_tags)}] are "
                                  "invalid or not permitted")
        return await self._create_node(join, now=now_, pak=pak, mark_used=mark_used)

    async def _reregister(self, old: Node, join: JoinRequest, pak: PreAuthKey, *,
                          converting: bool, mark_used: bool, now: datetime) -> Node:
        fields: set[Field] = set()
        new = replace(old, node_key=join.node_key, hostname=join.hostname,
                      hostinfo=merge_hostinfo(old.hostinfo, join.hostinfo),
                      register_method="authkey", auth_key_id=pak.id, last_seen=now,
                      updated_at=now, capver=join.capver or old.capver)
        if converting:
            new = replace(new, tags=pak.tags, user_id=None, expiry=None)
            fields |= {Field.TAGS, Field.USER}
        if not new.is_tagged:
            new = replace(new, expiry=join.requested_expiry or self._default_expiry(now))
        if (join.hostname != old.hostname
                and names.is_auto_derived(old.given_name, old.hostname)):
            new = replace(new, given_name=names.unique_given_name(
                names.given_name_base(join.hostname), self._taken_names(old.id)))
        differs = {Field.NODE_KEY: new.node_key != old.node_key,
                   Field.HOSTNAME: new.hostname != old.hostname,
                   Field.HOSTINFO: new.hostinfo != old.hostinfo,
                   Field.EXPIRY: new.expiry != old.expiry,
                   Field.GIVEN_NAME: new.given_name != old.given_name}
        fields |= {f for f, changed in differs.items() if changed}
        new.version = old.version + 1
        vals = persist.node_values(new)

        def tx_fn(tx: persist.Tx) -> None:
            tx.update(db.Node, old.id, vals)
            if mark_used:
                tx.update(db.PreAuthKey, pak.id, {"used": True})

        await self._commit(tx_fn)
        if mark_used:
            self._put_pak(replace(pak, used=True))
        self._put_node(new)
        if Field.USER in fields:
            self._publish(Change(ChangeKind.POLICY))
        self._publish(Change(ChangeKind.NODE_CHANGED, new.id, frozenset(fields)))
        return new

    async def _create_node(self, join: JoinRequest, *, now: datetime,
                           pak: PreAuthKey | None = None, mark_used: bool = False,
                           user_id: int | None = None, register_method: str = "authkey",
                           tags: tuple[str, ...] = ()) -> Node:
        """A new node: owned by the key's user (or tagged by the key's tags) with `pak`,
        else by `user_id` (or tagged with `tags`)."""
        if pak is not None:
            tags = pak.tags
            user_id = None if pak.tags else pak.user_id
        tagged = bool(tags)
        try:
            v4, v6 = self.ipam.allocate()
        except IPAllocationError as e:
            raise StateError(str(e)) from None
        node = Node(
            id=0, machine_key=join.machine_key, node_key=join.node_key, disco_key=None,
            hostname=join.hostname,
            given_name=names.unique_given_name(names.given_name_base(join.hostname),
                                               self._taken_names()),
            user_id=None if tagged else user_id, ipv4=v4, ipv6=v6,
            register_method=register_method, created_at=now, updated_at=now, tags=tags,
            auth_key_id=pak.id if pak is not None else None,
            expiry=None if tagged else (join.requested_expiry or self._default_expiry(now)),
            last_seen=now, hostinfo=join.hostinfo,
            ephemeral=pak.ephemeral if pak is not None else False, capver=join.capver,
            version=1,
        )
        vals = persist.node_values(node)

        def tx_fn(tx: persist.Tx) -> int:
            nid = tx.insert(db.Node, vals)
            if mark_used and pak is not None:
                tx.update(db.PreAuthKey, pak.id, {"used": True})
            return nid

        try:
            nid = await self._commit(tx_fn)
        except BaseException:
            self.ipam.release(v4, v6)
            raise
        node = replace(node, id=nid)
        if mark_used and pak is not None:
            self._put_pak(replace(pak, used=True))
        self._put_node(node)
        self._publish(Change(ChangeKind.NODE_ADDED, nid))
        return node

    # --- for a user, once approved -----------------------------------------------------------

    async def register_for_user(
        self, machine_key: bytes, node_key: bytes, user_id: int,
        hostinfo: Mapping[str, Any] | None, *, requested_expiry: datetime | None = None,
        register_method: str = "cli", capver: int = 0, now: datetime | None = None,
    ) -> Node:
        """Interactive/OIDC completion: the machine's node for this user is re-keyed in
        place, or a new user-owned node is created. Hostinfo.RequestTags (`--advertise-tags`)
        tags the node when `tag_authorizer` allows every tag for this user (else
        InvalidArgument); re-auth without them returns a tagged node to the user."""
        join = JoinRequest(machine_key, node_key, dict(hostinfo or {}), requested_expiry,
                           capver)
        return await self._approve(join, user_id, register_method=register_method, now=now)

    @serialized
    async def _approve(self, join: JoinRequest, user_id: int, *, register_method: str,
                       now: datetime | None) -> Node:
        now_ = now or utcnow()
        requested = join.request_tags
        user = self.get_user(user_id)
        self._check_node_key_free(join.node_key, join.machine_key)
        existing = next((n for n in self.nodes_by_machine_key(join.machine_key)
                         if n.user_id == user_id or n.is_tagged), None)
        allowed = self.tag_authorizer
        rejected = [t for t in requested if allowed is None or not allowed(user, existing, t)]
        if rejected:
            raise InvalidArgument(f"requested tags [{' '.join(rejected)}] are invalid or "
                                  "not permitted")
        if existing is None:
            return await self._create_node(join, now=now_, user_id=user_id,
                                           register_method=register_method, tags=requested)
        new = replace(existing, node_key=join.node_key, hostname=join.hostname,
                      hostinfo=merge_hostinfo(existing.hostinfo, join.hostinfo),
                      register_method=register_method, last_seen=now_, updated_at=now_,
                      capver=join.capver or existing.capver, version=existing.version + 1)
        fields = {Field.NODE_KEY, Field.EXPIRY, Field.HOSTINFO}
        if requested:
            new = replace(new, tags=requested, user_id=None, expiry=None)
        elif existing.is_tagged:
            # Back to its user (Headscale); no longer tied to the tagged key, so a node
            # joined with a tagged ephemeral key is not garbage-collected as the user's.
            new = replace(new, tags=(), user_id=user_id, auth_key_id=None, ephemeral=False)
        if not new.is_tagged:
            new = replace(new, expiry=join.requested_expiry or self._default_expiry(now_))
        if (new.tags, new.user_id) != (existing.tags, existing.user_id):
            fields |= {Field.TAGS, Field.USER}
        node = await self._write_node(existing, new, ChangeKind.NODE_CHANGED, fields)
        if Field.TAGS in fields:
            self._publish(Change(ChangeKind.POLICY))
        return node
