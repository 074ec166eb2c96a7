"""The REST API (/api/v1 and /api/v2, every route of both route tables) with hostile JSON
bodies, path parameters and query strings, over the server's admin unix socket."""

from __future__ import annotations

import random
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from pyheadscale.api.routes import ROUTES as V1
from pyheadscale.api.v2.routes import ROUTES as V2
from tests.fuzz.harness import FuzzContext
from tests.fuzz.mutate import HOSTILE_VALUES, mutate, mutate_json, to_json

BODIES: dict[str, dict[str, Any]] = {
    "create_user": {"name": "u1", "displayName": "U", "email": "u@example.com",
                    "pictureUrl": "https://x/y.png"},
    "set_tags": {"tags": ["tag:a", "tag:b"]},
    "approve_routes": {"routes": ["10.0.0.0/8", "0.0.0.0/0", "::/0"]},
    "debug_create_node": {"user": "fuzz", "key": "hskey-authreq-" + "ab" * 12, "name": "dbg",
                          "routes": ["10.1.0.0/16"]},
    "auth_register": {"authId": "hskey-authreq-" + "ab" * 12, "user": "fuzz"},
    "auth_approve": {"authId": "hskey-authreq-" + "ab" * 12},
    "auth_reject": {"authId": "hskey-authreq-" + "ab" * 12},
    "create_preauth_key": {"user": "1", "reusable": True, "ephemeral": False,
                           "expiration": "2099-01-01T00:00:00Z", "aclTags": ["tag:a"]},
    "expire_preauth_key": {"user": "1", "key": "hskey-auth-x"},
    "create_api_key": {"expiration": "2099-01-01T00:00:00Z"},
    "expire_api_key": {"prefix": "abcdef"},
    "set_policy": {"policy": '{"acls":[{"action":"accept","src":["*"],"dst":["*:*"]}]}'},
    "check_policy": {"policy": '{"acls":[]}'},
    "backfill_ips": {"confirmed": True},
    "register_node": {},
}
V2_BODY: dict[str, Any] = {"capabilities": {"devices": {"create": {
    "reusable": True, "ephemeral": False, "tags": ["tag:a"]}}}, "expirySeconds": 3600,
    "description": "k", "routes": ["10.0.0.0/8"], "tags": ["tag:a"], "name": "n",
    "authorized": True, "keyExpiryDisabled": True, "ipv4": "100.64.0.9"}
PARAMS = ["1", "2", "0", "-1", "999999", "fuzz", "u1", "-", "tag:x", "a" * 300, "%00", "..",
          "9" * 30, "hskey-api-x", "1.5"]


def _path(rng: random.Random, template: str) -> str:
    out = template
    while "{" in out:
        i, j = out.index("{"), out.index("}")
        out = out[:i] + quote(rng.choice(PARAMS), safe="") + out[j + 1:]
    return out


def _body(rng: random.Random, seed: Any) -> bytes:
    if rng.random() < 0.1:
        return to_json(rng.choice(HOSTILE_VALUES))
    raw = to_json(mutate_json(rng, seed) if rng.random() < 0.8 else seed)
    return mutate(rng, raw) if rng.random() < 0.15 else raw


def _error_shape(body: bytes) -> bool:
    try:
        d = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(d, dict) and ("code" in d or "message" in d) and "message" in d


async def run(ctx: FuzzContext, part: int, n: int) -> int:
    rng = ctx.rng("api", part)
    routes = [(r.method, r.path, BODIES.get(r.handler, {})) for r in V1]
    routes += [(r.method, r.path, V2_BODY) for r in V2]
    conn = aiohttp.UnixConnector(path=ctx.socket_path)
    async with aiohttp.ClientSession(connector=conn) as http:
        for i in range(n):
            method, template, seed = rng.choice(routes)
            url = "http://local" + _path(rng, template)
            if rng.random() < 0.2:
                url += "?" + "&".join(f"{k}={quote(rng.choice(PARAMS))}"
                                      for k in rng.sample(["user", "key", "id", "confirmed",
                                                           "expiration", "prefix"], 2))
            body = _body(rng, seed) if method in ("POST", "PUT", "PATCH") else None
            try:
                async with http.request(method, url, data=body,
                                        headers={"content-type": "application/json"}) as r:
                    text = await r.read()
                    # A 5xx is a finding unless it is a deliberate error answer in Headscale's
                    # shape (Headscale itself answers e.g. "policy not found" with 500).
                    if r.status >= 500 and not _error_shape(text):
                        ctx.fail("api", i, f"{method} {url} -> {r.status} {text[:300]!r} "
                                           f"body {body!r:.300}")
            except aiohttp.ClientError as e:
                ctx.fail("api", i, f"{method} {url}: {e!r}")
    return n
