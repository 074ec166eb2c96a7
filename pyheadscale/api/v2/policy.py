"""/api/v2 policy file (`.../acl`, HuJSON, ETag/If-Match) and tailnet settings.

The ETag is the quoted SHA-256 of the exact policy bytes served. `If-Match: "ts-default"`
matches only while the tailnet runs the untouched default policy, which is what the Terraform
provider sends before its first write. An empty body resets the policy to that default (the
provider's destroy); Headscale has not ported that, nor `acl/validate`, which the provider
calls while planning.
"""

from __future__ import annotations

import hashlib

from aiohttp import web

from pyheadscale.api.v2 import models as m
from pyheadscale.api.v2.common import (
    Principal,
    V2Error,
    json_ok,
    model_json,
    read_capped,
    require_tailnet,
)
from pyheadscale.api.v2.deps import V2Deps
from pyheadscale.policy import PolicyError
from pyheadscale.state.policystore import PolicyNotFound, PolicyReadError, PolicyUpdateDisabled

HUJSON = "application/hujson"

# Served when no policy is set (allow-all, what the server does without one).
DEFAULT_POLICY = """{
	// Headscale default policy. Allows all communication.
	"acls": [
		{"action": "accept", "src": ["*"], "dst": ["*:*"]},
	],
}
"""


def etag(data: str) -> str:
    return '"' + hashlib.sha256(data.encode()).hexdigest() + '"'


def _matches(if_match: str, current: str) -> bool:
    tags = [t.strip() for t in if_match.split(",")]
    for t in tags:
        if t == "*" or t == etag(current):
            return True
        if t in ('"ts-default"', "ts-default") and current == DEFAULT_POLICY:
            return True
    return False


async def _current(d: V2Deps) -> str:
    try:
        text = (await d.policy.get()).data
    except PolicyNotFound:
        return DEFAULT_POLICY
    except PolicyReadError as e:
        if d.policy.mode != "database" and not d.settings.policy_path_set:
            return DEFAULT_POLICY
        raise V2Error(500, str(e)) from None
    return text or DEFAULT_POLICY


def _policy_response(request: web.Request, data: str) -> web.Response:
    ctype = HUJSON if HUJSON in request.headers.get("Accept", "") else "application/json"
    return web.Response(body=data.encode(), headers={"ETag": etag(data),
                                                     "Content-Type": ctype})


async def _read_text(request: web.Request) -> str:
    raw = await read_capped(request)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise V2Error(400, "policy file is not valid UTF-8") from None


async def get_acl(d: V2Deps, who: Principal, request: web.Request) -> web.Response:
    require_tailnet(request)
    return _policy_response(request, await _current(d))


async def set_acl(d: V2Deps, who: Principal, request: web.Request) -> web.Response:
    require_tailnet(request)
    if d.policy.mode != "database":
        raise V2Error(400, "update is disabled for modes other than 'database'")
    text = await _read_text(request)
    if not text.strip():
        text = DEFAULT_POLICY
    if_match = request.headers.get("If-Match", "").strip()
    if if_match and not _matches(if_match, await _current(d)):
        raise V2Error(412, "precondition failed, invalid old hash")
    try:
        stored = await d.policy.set(text)
    except PolicyUpdateDisabled as e:
        raise V2Error(400, str(e)) from None
    except PolicyError as e:
        raise V2Error(400, f"setting policy: {e}") from None
    return _policy_response(request, stored.data)


async def validate_acl(d: V2Deps, who: Principal, request: web.Request) -> web.Response:
    """Check a policy (and its tests) without storing it: 200 with an empty body when it
    passes, Tailscale's error body otherwise."""
    require_tailnet(request)
    text = await _read_text(request)
    try:
        await d.policy.check(text)
    except PolicyError as e:
        raise V2Error(400, str(e)) from None
    return web.Response(status=200)


def settings(d: V2Deps) -> m.TailnetSettings:
    s = d.settings
    return m.TailnetSettings(
        aclsExternallyManagedOn=s.policy_mode == "file", aclsExternalLink="",
        devicesApprovalOn=False, devicesAutoUpdatesOn=False,
        devicesKeyDurationDays=s.key_duration_days, usersApprovalOn=False,
        usersRoleAllowedToJoinExternalTailnets="none", networkFlowLoggingOn=False,
        regionalRoutingOn=False, postureIdentityCollectionOn=False, httpsEnabled=s.https)


async def get_settings(d: V2Deps, who: Principal, request: web.Request) -> web.Response:
    require_tailnet(request)
    return json_ok(model_json(settings(d)))


async def update_settings(d: V2Deps, who: Principal, request: web.Request) -> web.Response:
    require_tailnet(request)
    await read_capped(request)  # accepted and ignored
    raise V2Error(501, "updating tailnet settings is not supported by Headscale")
