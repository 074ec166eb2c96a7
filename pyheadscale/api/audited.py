"""Which API operations are admin actions, and the audit line each one leaves.

The /api/v1 and /api/v2 guards (which the CLI's unix socket goes through too) record the
caller (`set_actor`) and, after a handler answered 2xx for an operation listed here, call
`audited` once: one audit line per action, whatever the transport. The web console makes
the same writes (api/actions.py) and calls `record` with the operation each one is and what
the API would have seen, so a console action leaves the very line its API call leaves.
The target comes from the path, the v1 request body (read by the guard before the handler,
which then gets aiohttp's cached copy) and the JSON answer; secrets in answers (new API
keys, pre-auth keys, client secrets) are never copied, only their public prefix or ID.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from pyheadscale import audit
from pyheadscale.audit import Actor

_ACTOR = web.RequestKey("pyheadscale_actor", Actor)


def set_actor(request: web.Request, actor: Actor) -> None:
    request[_ACTOR] = actor


def actor_of(request: web.Request) -> Actor:
    return request.get(_ACTOR) or Actor("system", "unknown")


@dataclass(frozen=True)
class Seen:
    """What an action's target is read from."""

    path: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)
    body: Mapping[str, Any] = field(default_factory=dict)  # the v1 request's JSON object
    answer: Mapping[str, Any] = field(default_factory=dict)  # the JSON answer, if an object


Describe = Callable[[Seen], tuple[str, dict[str, object]]]


def _d(obj: Any, *keys: str) -> Any:
    for k in keys:
        obj = obj.get(k) if isinstance(obj, Mapping) else None
    return obj


def _node(s: Seen) -> tuple[str, dict[str, object]]:
    n = _d(s.answer, "node") or {}
    nid = n.get("id") or s.path.get("nodeId") or s.path.get("id", "")  # v1, then v2's {id}
    return f"node {nid}", {"name": n.get("givenName"), "user": _d(n, "user", "name"),
                           "tags": n.get("tags") or None}


def _user(s: Seen) -> tuple[str, dict[str, object]]:
    u = _d(s.answer, "user") or {}
    uid = u.get("id") or s.path.get("oldId") or s.path.get("id", "")
    return f"user {uid}", {"name": u.get("name") or s.path.get("newName")}


def _policy(text: object) -> dict[str, object]:
    raw = text.encode() if isinstance(text, str) else b""
    return {"policy_sha256": hashlib.sha256(raw).hexdigest()[:16], "bytes": len(raw)}


def _api_key_prefix(full: object) -> str:
    """`hskey-api-<prefix>-<secret>` (or a legacy `<prefix>.<secret>`): the prefix only."""
    text = str(full or "")
    if text.startswith("hskey-api-"):
        return text[len("hskey-api-"):].split("-", 1)[0]
    return text.split(".", 1)[0][:10]


def _pak(s: Seen) -> tuple[str, dict[str, object]]:
    k = _d(s.answer, "preAuthKey") or {}
    kid = k.get("id") or s.body.get("id") or s.query.get("id", "")
    return f"preauthkey {kid}", {"user": _d(k, "user", "name"), "reusable": k.get("reusable"),
                                 "ephemeral": k.get("ephemeral"),
                                 "tags": k.get("aclTags") or None}


def _v2_key(s: Seen) -> tuple[str, dict[str, object]]:
    kind = "oauthclient" if s.answer.get("keyType") == "client" else "authkey"
    kid = s.answer.get("id") or s.path.get("keyId", "")
    return f"{kind} {kid}", {"scopes": s.answer.get("scopes"), "tags": s.answer.get("tags")}


# op_id -> (action, how to describe its target); op_ids are unique across v1 and v2 for
# every operation that changes something.
ACTIONS: Mapping[str, tuple[str, Describe]] = {
    # /api/v1 (and the CLI)
    "createUser": ("user.create", _user),
    "renameUser": ("user.rename", _user),
    "deleteUser": ("user.delete", _user),
    "registerNode": ("node.register", _node),
    "debugCreateNode": ("node.create", _node),
    "authRegister": ("node.register", _node),
    "deleteNode": ("node.delete", _node),
    "expireNode": ("node.expire", lambda s: (_node(s)[0], {
        "expiry": _d(s.answer, "node", "expiry")})),
    "renameNode": ("node.rename", _node),
    "setTags": ("node.tags", _node),
    "setApprovedRoutes": ("node.routes.approve", lambda s: (_node(s)[0], {
        "routes": _d(s.answer, "node", "approvedRoutes") or []})),
    "backfillNodeIPs": ("node.backfill_ips", lambda s: (
        "nodes", {"changes": len(s.answer.get("changes") or [])})),
    "authApprove": ("auth.approve", lambda s: (f"auth {s.body.get('authId', '')}", {})),
    "authReject": ("auth.reject", lambda s: (f"auth {s.body.get('authId', '')}", {})),
    "createPreAuthKey": ("preauthkey.create", _pak),
    "expirePreAuthKey": ("preauthkey.expire", _pak),
    "deletePreAuthKey": ("preauthkey.delete", _pak),
    "createApiKey": ("apikey.create", lambda s: (
        f"apikey {_api_key_prefix(s.answer.get('apiKey'))}", {})),
    "expireApiKey": ("apikey.expire", lambda s: (
        f"apikey {s.body.get('prefix') or s.body.get('id', '')}", {})),
    "deleteApiKey": ("apikey.delete", lambda s: (f"apikey {s.path.get('prefix', '')}", {})),
    "setPolicy": ("policy.set", lambda s: ("policy", _policy(s.body.get("policy")))),
    # /api/v2
    "deleteDevice": ("node.delete", _node),
    "authorizeDevice": ("node.authorize", _node),
    "setDeviceName": ("node.rename", _node),
    "setDeviceTags": ("node.tags", _node),
    "setDeviceKey": ("node.key", _node),
    "setDeviceRoutes": ("node.routes.approve", lambda s: (_node(s)[0], {
        "routes": s.answer.get("enabledRoutes") or []})),
    "createKey": ("key.create", _v2_key),
    "deleteKey": ("key.delete", _v2_key),
    "setOAuthClient": ("oauthclient.update", _v2_key),
    "setACL": ("policy.set", lambda s: ("policy", {})),
    "updateTailnetSettings": ("settings.update", lambda s: ("tailnet settings", {})),
}


def _json_of(raw: bytes | None) -> Mapping[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, Mapping) else {}


def is_audited(op_id: str) -> bool:
    return op_id in ACTIONS


def audited(op_id: str, request: web.Request, response: web.StreamResponse,
            body: bytes | None = None) -> None:
    """Record the action `op_id` if it is one and it succeeded (`body`: the request's, when
    the guard read it)."""
    if op_id not in ACTIONS or not 200 <= response.status < 300:
        return
    answer = _json_of(response.body if isinstance(response, web.Response) and
                      isinstance(response.body, bytes) else None)
    record(op_id, actor_of(request), Seen(path=dict(request.match_info),
                                          query=dict(request.query), body=_json_of(body),
                                          answer=answer))


def record(op_id: str, actor: Actor, seen: Seen) -> None:
    """The audit line of the admin action `op_id` (a key of ACTIONS) that took effect."""
    action, describe = ACTIONS[op_id]
    target, details = describe(seen)
    audit.record(actor, action, target, **details)
