"""Admin writes of nodes: addresses, key rotation, logout and expiry, names, deletion, tags
and approved routes."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from datetime import datetime

from pyheadscale.auth import preauthkeys as pk
from pyheadscale.state import names
from pyheadscale.state.base import TailnetBase, serialized, utcnow
from pyheadscale.state.changes import Change, ChangeKind, Field
from pyheadscale.state.errors import AlreadyExists, InvalidArgument, PersistError
from pyheadscale.state.model import IPNetwork, Node

EXIT_ROUTES = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def _route_set(routes: Iterable[str | IPNetwork]) -> tuple[IPNetwork, ...]:
    """Parsed, sorted, and with both exit routes when either is there."""
    parsed: set[IPNetwork] = set()
    for r in routes:
        try:
            parsed.add(ipaddress.ip_network(r, strict=False))
        except (ValueError, TypeError):
            raise InvalidArgument(f"invalid route {r!r}") from None
    if parsed & set(EXIT_ROUTES):
        parsed |= set(EXIT_ROUTES)
    return tuple(sorted(parsed, key=lambda n: (n.version, n.network_address, n.prefixlen)))


def _tag_set(tags: Iterable[str]) -> tuple[str, ...]:
    tag_list = list(tags)
    if not tag_list:
        raise InvalidArgument("cannot set empty tags")
    try:
        return pk.validate_tags(tag_list)
    except ValueError as e:
        raise InvalidArgument(str(e).replace("auth-key tag", "tag")) from None


class NodeWrites(TailnetBase):
    @serialized
    async def backfill_node_ips(self) -> list[str]:
        """Give every node an address in each configured prefix and drop addresses of a
        family no longer configured (Headscale's `nodes backfillips`); returns what changed."""
        done: list[str] = []
        for old in sorted(self.nodes.values(), key=lambda n: n.id):
            v4, v6, notes = old.ipv4, old.ipv6, []
            if self.ipam.v4 is not None and v4 is None:
                v4 = self.ipam.allocate_v4()
                notes.append(f"assigned IPv4 {v4} to Node({old.id}) {old.hostname}")
            if self.ipam.v6 is not None and v6 is None:
                v6 = self.ipam.allocate_v6()
                notes.append(f"assigned IPv6 {v6} to Node({old.id}) {old.hostname}")
            if self.ipam.v4 is None and v4 is not None:
                notes.append(f"removing IPv4 {v4} from Node({old.id}) {old.hostname}")
                v4 = None
            if self.ipam.v6 is None and v6 is not None:
                notes.append(f"removing IPv6 {v6} from Node({old.id}) {old.hostname}")
                v6 = None
            if not notes:
                continue
            new = self._bump(old, ipv4=v4, ipv6=v6, updated_at=utcnow())
            try:
                await self._write_node(old, new, ChangeKind.NODE_CHANGED, {Field.ADDRESSES})
            except PersistError:
                self.ipam.release(*(a for a in (v4, v6) if a not in (old.ipv4, old.ipv6)))
                raise
            done.extend(notes)
        return done

    @serialized
    async def rotate_node_key(self, node_id: int, new_node_key: bytes) -> Node:
        old = self.get_node(node_id)
        if old.node_key == new_node_key:
            return old
        self._check_node_key_free(new_node_key, old.machine_key)
        new = self._bump(old, node_key=new_node_key, updated_at=utcnow())
        return await self._write_node(old, new, ChangeKind.NODE_CHANGED, {Field.NODE_KEY})

    @serialized
    async def logout(self, node_id: int, at: datetime | None = None) -> Node | None:
        """Client logout: expire the key (delete ephemeral nodes); None if deleted."""
        old = self.get_node(node_id)
        if old.ephemeral:
            await self._delete_node_locked(old)
            return None
        now = utcnow()
        expiry = min(at, now) if at is not None else now
        new = self._bump(old, expiry=expiry, updated_at=now)
        return await self._write_node(old, new, ChangeKind.NODE_KEY_EXPIRY, {Field.EXPIRY})

    @serialized
    async def set_expiry(self, node_id: int, expiry: datetime | None) -> Node:
        """Admin expire (a time, now) or disable expiry (None)."""
        old = self.get_node(node_id)
        new = self._bump(old, expiry=expiry, updated_at=utcnow())
        return await self._write_node(old, new, ChangeKind.NODE_KEY_EXPIRY, {Field.EXPIRY})

    async def expire_node(self, node_id: int, at: datetime | None = None) -> Node:
        return await self.set_expiry(node_id, at or utcnow())

    @serialized
    async def rename_node(self, node_id: int, new_name: str) -> Node:
        try:
            names.validate_given_name(new_name, self.base_domain)
        except names.InvalidName as e:
            raise InvalidArgument(str(e)) from None
        old = self.get_node(node_id)
        holder = self._by_given_name.get(new_name)
        if holder is not None and holder != node_id:
            raise AlreadyExists(f"node name is not unique: {new_name}")
        if old.given_name == new_name:
            return old
        new = self._bump(old, given_name=new_name, updated_at=utcnow())
        return await self._write_node(old, new, ChangeKind.NODE_CHANGED, {Field.GIVEN_NAME})

    @serialized
    async def delete_node(self, node_id: int) -> None:
        await self._delete_node_locked(self.get_node(node_id))

    @serialized
    async def set_tags(self, node_id: int, tags: Iterable[str]) -> Node:
        """Admin SetTags: a non-empty set of "tag:" tags; makes the node tagged (no user,
        no expiry). Whether the tags exist in the policy is checked by the caller."""
        tag_t = _tag_set(tags)
        old = self.get_node(node_id)
        if old.tags == tag_t:
            return old
        new = self._bump(old, tags=tag_t, user_id=None, expiry=None, updated_at=utcnow())
        node = await self._write_node(old, new, ChangeKind.NODE_CHANGED,
                                      {Field.TAGS, Field.USER, Field.EXPIRY})
        self._publish(Change(ChangeKind.POLICY))
        return node

    @serialized
    async def approve_routes(self, node_id: int, routes: Iterable[str | IPNetwork]) -> Node:
        """Replace the approved routes. Approving either exit route approves both."""
        ordered = _route_set(routes)
        old = self.get_node(node_id)
        if old.approved_routes == ordered:
            return old
        new = self._bump(old, approved_routes=ordered, updated_at=utcnow())
        return await self._write_node(old, new, ChangeKind.NODE_CHANGED,
                                      {Field.APPROVED_ROUTES})
