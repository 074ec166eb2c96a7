"""What a MapRequest changes about its node: a pure function, no I/O, no clock.

A client reports its endpoints, disco key and Hostinfo in every MapRequest (streaming polls
and lite updates alike). `apply_map_request` says which node fields that changes; the tailnet
persists and publishes the result. Empty values never overwrite known ones: a client that has
not found its endpoints yet, or sends the zero disco key, keeps what the server knows.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from dataclasses import replace
from typing import Any

from pyheadscale.state import names
from pyheadscale.state.changes import Field
from pyheadscale.state.model import Node

ZERO_KEY = bytes(32)


def merge_hostinfo(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The Hostinfo to keep: clients >= 1.66 omit NetInfo when unchanged, so the one we have
    stays."""
    if "NetInfo" not in new and "NetInfo" in old:
        return {**new, "NetInfo": old["NetInfo"]}
    return dict(new)


def home_derp(hostinfo: Mapping[str, Any]) -> object:
    """Hostinfo.NetInfo.PreferredDERP (None when absent or malformed)."""
    ni = hostinfo.get("NetInfo")
    return ni.get("PreferredDERP") if isinstance(ni, dict) else None


def _netinfo_rest(hostinfo: Mapping[str, Any]) -> dict[str, Any]:
    ni = hostinfo.get("NetInfo")
    if not isinstance(ni, dict):
        return {}
    return {k: v for k, v in ni.items() if k != "PreferredDERP"}


def hostinfo_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> set[Field]:
    """Which of HOME_DERP, ROUTES and HOSTINFO (everything else) differ."""
    fields: set[Field] = set()
    if home_derp(new) != home_derp(old):
        fields.add(Field.HOME_DERP)
    if new.get("RoutableIPs") != old.get("RoutableIPs"):
        fields.add(Field.ROUTES)
    rest_old = {k: v for k, v in old.items() if k != "NetInfo"}
    rest_new = {k: v for k, v in new.items() if k != "NetInfo"}
    if rest_old != rest_new or _netinfo_rest(new) != _netinfo_rest(old):
        fields.add(Field.HOSTINFO)
    return fields


def apply_map_request(
    old: Node, *, endpoints: Iterable[str] = (), disco_key: bytes | None = None,
    hostinfo: Mapping[str, Any] | None = None, taken_names: Container[str] = (),
) -> tuple[Node, frozenset[Field]]:
    """`old` with what the request reports, and which fields changed; `old` itself (the same
    object) when nothing did. A new hostname renames a node whose name was derived from the
    old one, to a name not in `taken_names`; an admin's rename sticks. Version, capability
    version and timestamps are the caller's."""
    changes: dict[str, Any] = {}
    fields: set[Field] = set()
    eps = tuple(endpoints)
    if eps and eps != old.endpoints:
        changes["endpoints"] = eps
        fields.add(Field.ENDPOINTS)
    if disco_key and disco_key != ZERO_KEY and disco_key != old.disco_key:
        changes["disco_key"] = disco_key
        fields.add(Field.DISCO_KEY)
    if hostinfo:
        hi = merge_hostinfo(old.hostinfo, hostinfo)
        if hi != old.hostinfo:
            changes["hostinfo"] = hi
            fields |= hostinfo_fields(old.hostinfo, hi)
            hn = hi.get("Hostname")
            if isinstance(hn, str) and hn and hn != old.hostname:
                changes["hostname"] = hn
                fields.add(Field.HOSTNAME)
                if names.is_auto_derived(old.given_name, old.hostname):
                    gn = names.unique_given_name(names.given_name_base(hn), taken_names)
                    if gn != old.given_name:
                        changes["given_name"] = gn
                        fields.add(Field.GIVEN_NAME)
    if not changes:
        return old, frozenset()
    return replace(old, **changes), frozenset(fields)
