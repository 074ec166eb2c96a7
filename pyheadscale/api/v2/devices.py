"""/api/v2 devices: Tailscale's Device shape over the tailnet's nodes.

Headscale has no post-registration approval, so every device reports authorized and
de-authorizing is refused; tags cannot be removed (tags are an identity), so an empty set is a
no-op that keeps Terraform destroys working; re-enabling key expiry has no lifetime to restore,
so it is a no-op too. All three follow Headscale 0.30.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from aiohttp import web

from pyheadscale.api.v2 import models as m
from pyheadscale.api.v2.common import (
    Principal,
    V2Error,
    from_state,
    go_time,
    json_ok,
    model_json,
    parse_id,
    read_model,
    require_tailnet,
)
from pyheadscale.api.v2.deps import V2Deps
from pyheadscale.state.errors import StateError
from pyheadscale.state.model import IPNetwork, Node
from pyheadscale.tailcfg import KeyKind, encode_key

TAGGED_DEVICES = "tagged-devices"
_EXIT = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def _routes_text(routes: Any) -> list[str]:
    return [str(r) for r in routes]


def device(d: V2Deps, n: Node, all_fields: bool) -> m.Device:
    tn = d.tailnet
    owner = tn.users.get(n.user_id) if n.user_id is not None else None
    user = TAGGED_DEVICES if n.is_tagged else (tn.username(owner) if owner else "")
    hi = n.hostinfo or {}
    dev = m.Device(
        addresses=[str(a) for a in n.addresses], name=n.given_name, id=str(n.id),
        nodeId=str(n.id), authorized=True, user=user, tags=sorted(n.tags),
        keyExpiryDisabled=n.expiry is None, created=go_time(n.created_at),
        expires=go_time(n.expiry) if n.expiry is not None else None, hostname=n.hostname,
        isEphemeral=n.ephemeral,
        # Reported only while offline, as tailcfg does.
        lastSeen=go_time(n.last_seen) if n.last_seen is not None and not n.online else None,
        machineKey=encode_key(KeyKind.MACHINE, n.machine_key),
        nodeKey=encode_key(KeyKind.NODE, n.node_key),
        os=str(hi.get("OS") or ""), clientVersion=str(hi.get("IPNVersion") or ""),
        updateAvailable=False, connectedToControl=n.online)
    if all_fields:
        dev.advertisedRoutes = _routes_text(n.announced_routes)
        dev.enabledRoutes = _routes_text(n.approved_routes)
    return dev


def routes(n: Node) -> m.DeviceRoutes:
    return m.DeviceRoutes(advertisedRoutes=_routes_text(n.announced_routes),
                          enabledRoutes=_routes_text(n.approved_routes))


def _node(d: V2Deps, request: web.Request) -> Node:
    n = d.tailnet.nodes.get(parse_id(request.match_info["id"], "device"))
    if n is None:
        raise V2Error(404, "device not found")
    return n


def _all_fields(request: web.Request) -> bool:
    return request.query.get("fields", "") == "all"


async def get_device(d: V2Deps, who: Principal, request: web.Request) -> web.Response:
    return json_ok(model_json(device(d, _node(d, request), _all_fields(request))))


async def list_devices(d: V2Deps, who: Principal, request: web.Request) -> web.Response:
    require_tailnet(request)
    every = _all_fields(request)
    out = [model_json(device(d, n, every)) for n in d.tailnet.list_nodes()]
    return json_ok({"devices": out})


async def delete_device(d: V2Deps, who: Principal, request: web.Request) -> web.Response:
    n = _node(d, request)
    try:
        await d.tailnet.delete_node(n.id)
    except StateError as e:
        raise from_state("deleting device", e) from None
    return json_ok({})


async def authorize_device(d: V2Deps, who: Principal, request: web.Request) -> web.Response:
    _node(d, request)
    body = await read_model(request, m.SetAuthorizedRequest)
    if not body.authorized:
        raise V2Error(400, "Headscale does not support de-authorizing a device; delete or "
                           "expire it instead")
    return json_ok({})


async def set_device_name(d: V2Deps, who: Principal, request: web.Request) -> web.Response:
    n = _node(d, request)
    body = await read_model(request, m.SetNameRequest)
    try:
        await d.tailnet.rename_node(n.id, body.name)
    except StateError as e:
        raise from_state("renaming device", e) from None
    return json_ok({})


async def set_device_tags(d: V2Deps, who: Principal, request: web.Request) -> web.Response:
    n = _node(d, request)
    tags = (await read_model(request, m.SetTagsRequest)).tags or []
    if not tags:
        return json_ok({})
    for t in tags:
        # devices:core alone must not let a token stamp any policy tag on any node.
        if who.is_token and not d.policy.tag_owned_by_tags(t, who.tags):
            raise V2Error(403, f"token may not assign tag {t}")
    invalid = [t for t in tags if not d.policy.tag_exists(t)]
    if invalid:
        raise V2Error(400, f"setting device tags: requested tags [{' '.join(invalid)}] are "
                           "invalid or not permitted")
    try:
        await d.tailnet.set_tags(n.id, tags)
    except StateError as e:
        raise from_state("setting device tags", e) from None
    return json_ok({})


async def set_device_key(d: V2Deps, who: Principal, request: web.Request) -> web.Response:
    n = _node(d, request)
    body = await read_model(request, m.SetKeyRequest)
    if body.keyExpiryDisabled and n.expiry is not None:
        try:
            await d.tailnet.set_expiry(n.id, None)
        except StateError as e:
            raise from_state("setting device key expiry", e) from None
    return json_ok({})


def parse_routes(texts: list[str]) -> list[IPNetwork]:
    """Enabled routes; an exit route enables both families (else no exit node)."""
    out: set[IPNetwork] = set()
    for r in texts:
        try:
            p = ipaddress.ip_network(r.strip(), strict=False) if "/" in r else None
        except ValueError:
            p = None
        if p is None:
            raise V2Error(400, f'parsing route: netip.ParsePrefix("{r}"): invalid prefix')
        out.update(_EXIT if p in _EXIT else (p,))
    return sorted(out, key=lambda p: (p.version, p.network_address, p.prefixlen))


async def set_device_routes(d: V2Deps, who: Principal, request: web.Request) -> web.Response:
    n = _node(d, request)
    wanted = parse_routes((await read_model(request, m.SetRoutesRequest)).routes or [])
    try:
        n = await d.tailnet.approve_routes(n.id, wanted)
    except StateError as e:
        raise from_state("setting device routes", e) from None
    return json_ok(model_json(routes(n)))


async def get_device_routes(d: V2Deps, who: Principal, request: web.Request) -> web.Response:
    return json_ok(model_json(routes(_node(d, request))))
