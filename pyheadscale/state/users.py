"""Writes of users: create (CLI, API or an OIDC login), update from the IdP, rename, delete."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from pyheadscale.db import models as db
from pyheadscale.state import names, persist
from pyheadscale.state.base import TailnetBase, serialized, utcnow
from pyheadscale.state.changes import Change, ChangeKind
from pyheadscale.state.errors import AlreadyExists, Conflict, InvalidArgument
from pyheadscale.state.model import User

_UPDATABLE = frozenset({"name", "display_name", "email", "provider", "profile_pic_url",
                        "groups"})


def _groups(groups: Iterable[str]) -> tuple[str, ...]:
    """IdP groups as stored on User: a tuple of strings (a bare string is one group)."""
    if isinstance(groups, str):
        return (groups,)
    out = tuple(groups)
    if not all(isinstance(g, str) for g in out):
        raise InvalidArgument("user groups must be strings")
    return out


def _valid_username(name: str) -> None:
    try:
        names.validate_username(name)
    except names.InvalidName as e:
        raise InvalidArgument(str(e)) from None


class UserWrites(TailnetBase):
    @serialized
    async def create_user(self, name: str, *, display_name: str = "", email: str = "",
                          provider_identifier: str | None = None, provider: str = "",
                          profile_pic_url: str = "", groups: Iterable[str] = ()) -> User:
        """A local user (a valid Headscale user name) or, with provider_identifier, an IdP
        user (whose name is whatever the IdP says)."""
        if provider_identifier is None:
            _valid_username(name)
        for u in self.users.values():
            same_local = provider_identifier is None and u.provider_identifier is None
            if (same_local and u.name == name) or (
                    provider_identifier is not None
                    and u.provider_identifier == provider_identifier):
                raise AlreadyExists("user already exists")
        now = utcnow()
        user = User(id=0, name=name, display_name=display_name, email=email,
                    provider_identifier=provider_identifier, provider=provider,
                    profile_pic_url=profile_pic_url, created_at=now, groups=_groups(groups))
        vals = persist.user_values(user) | {"created_at": now, "updated_at": now}
        uid = await self._commit(lambda tx: tx.insert(db.User, vals))
        user = replace(user, id=uid)
        self.users[uid] = user
        self._publish(Change(ChangeKind.USER, user_id=uid))
        return user

    @serialized
    async def update_user(self, user_id: int, /, **fields: Any) -> User:
        """Update profile fields (display_name, email, profile_pic_url, ...) e.g. from OIDC."""
        if set(fields) - _UPDATABLE:
            raise InvalidArgument(f"cannot update user fields {sorted(set(fields) - _UPDATABLE)}")
        if "groups" in fields:
            fields["groups"] = _groups(fields["groups"])
        old = self.get_user(user_id)
        new = replace(old, **fields)
        if new == old:
            return old
        vals = persist.user_values(new) | {"updated_at": utcnow()}
        await self._commit(lambda tx: tx.update(db.User, user_id, vals))
        self.users[user_id] = new
        self._publish(Change(ChangeKind.USER, user_id=user_id))
        return new

    @serialized
    async def rename_user(self, user_id: int, new_name: str) -> User:
        _valid_username(new_name)
        old = self.get_user(user_id)
        if old.provider == "oidc":
            raise InvalidArgument("cannot edit OIDC user")
        if any(u.id != user_id and u.name == new_name and u.provider_identifier is None
               for u in self.users.values()) and old.provider_identifier is None:
            raise AlreadyExists("user already exists")
        new = replace(old, name=new_name)
        vals = {"name": new_name, "updated_at": utcnow()}
        await self._commit(lambda tx: tx.update(db.User, user_id, vals))
        self.users[user_id] = new
        self._publish(Change(ChangeKind.USER, user_id=user_id))
        return new

    @serialized
    async def delete_user(self, user_id: int) -> None:
        """Only a user without nodes; their pre-auth keys go too."""
        self.get_user(user_id)
        if any(n.user_id == user_id for n in self.nodes.values()):
            raise Conflict("user not empty: node(s) found")
        key_ids = [k.id for k in self.preauth_keys.values() if k.user_id == user_id]

        def tx_fn(tx: persist.Tx) -> None:
            for kid in key_ids:
                tx.clear_auth_key_refs(kid)
                tx.delete(db.PreAuthKey, kid)
            tx.delete(db.User, user_id)

        await self._commit(tx_fn)
        for kid in key_ids:
            self._drop_pak(kid)
            self._clear_node_key_refs(kid)
        del self.users[user_id]
        self._publish(Change(ChangeKind.USER, user_id=user_id))
