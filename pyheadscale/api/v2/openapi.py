"""The /api/v2 OpenAPI 3.1 document, generated from the route table and the pydantic wire
models. Each operation states the OAuth scope it needs, as an `x-required-scope` extension and
a sentence in its description; operations Headscale has not ported carry
`x-tailscale-extension: true`."""

from __future__ import annotations

import html
import json
import re
from functools import cache
from typing import Any

import yaml
from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from pyheadscale.api.v2 import models as m
from pyheadscale.api.v2.routes import ROUTES, Route

_REF = "#/components/schemas/{model}"
_QUERY: dict[str, list[tuple[str, str]]] = {
    "getDevice": [("fields", 'Set to "all" for the route fields.')],
    "listDevices": [("fields", 'Set to "all" for the route fields.')],
    "listKeys": [("all", "Accepted for compatibility; every key is listed.")],
    "listUsers": [("type", 'Only "member" matches.'), ("role", 'Only "member" matches.')],
}


def _models() -> list[type[BaseModel]]:
    found = {r.body for r in ROUTES if r.body} | {r.response for r in ROUTES if r.response}
    found |= {m.ErrorBody, m.TokenResponse}
    return sorted((x for x in found if x is not None), key=lambda c: c.__name__)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _error_responses(statuses: list[int]) -> dict[str, Any]:
    return {str(s): {"description": "Error", "content": {
        "application/json": {"schema": _ref(m.ErrorBody)}}} for s in statuses}


def _operation(r: Route) -> dict[str, Any]:
    scope = f"`{r.scope.value}`" if r.scope else r.scope_doc
    op: dict[str, Any] = {
        "operationId": r.op_id, "summary": r.summary, "tags": [r.tag, "Tailscale compat"],
        "security": [{"basicAuth": []}, {"bearerAuth": []}],
        "description": f"Requires the {scope} OAuth scope (an admin API key is all-access).",
        "x-required-scope": r.scope.value if r.scope else re.sub(r"`([^`]+)`[^`]*", r"\1 ",
                                                                 r.scope_doc).strip(),
    }
    if r.extension:
        op["x-tailscale-extension"] = True
    params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
              for p in re.findall(r"{(\w+)}", r.path)]
    params += [{"name": n, "in": "query", "required": False, "description": doc,
                "schema": {"type": "string"}} for n, doc in _QUERY.get(r.op_id, [])]
    if params:
        op["parameters"] = params
    if r.body is not None:
        op["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": _ref(r.body)}}}
    elif r.body_text:
        op["requestBody"] = {"required": False, "content": {
            t: {"schema": {"type": "string"}} for t in ("application/hujson", "application/json")}}
    if r.response is not None:
        ok: dict[str, Any] = {"description": "OK", "content": {
            "application/json": {"schema": _ref(r.response)}}}
    elif r.op_id in ("getACL", "setACL"):
        ok = {"description": "The policy file (HuJSON)", "headers": {
            "ETag": {"schema": {"type": "string"}}}, "content": {
            t: {"schema": {"type": "string"}} for t in ("application/json", "application/hujson")}}
    else:
        ok = {"description": "OK"}
    op["responses"] = {"200": ok, **_error_responses([400, 401, 403, 404])}
    if r.op_id == "setACL":
        op["responses"].update(_error_responses([412]))
    return op


def _token_operation() -> dict[str, Any]:
    form = {"type": "object", "properties": {
        "grant_type": {"type": "string", "enum": ["client_credentials"]},
        "client_id": {"type": "string"}, "client_secret": {"type": "string"},
        "scope": {"type": "string", "description": "Space-separated subset of the client's"},
        "tags": {"type": "string", "description": "Space-separated subset of the client's"}}}
    oauth_err = {"type": "object", "properties": {"error": {"type": "string"},
                                                  "error_description": {"type": "string"}}}
    return {"post": {
        "operationId": "oauthToken", "summary": "Mint a one-hour access token",
        "tags": ["OAuth", "Tailscale compat"],
        "description": "OAuth 2.0 client credentials. The secret may also be sent as HTTP "
                       "Basic. Errors follow RFC 6749.",
        "requestBody": {"required": True, "content": {
            "application/x-www-form-urlencoded": {"schema": form}}},
        "responses": {"200": {"description": "OK", "content": {
            "application/json": {"schema": _ref(m.TokenResponse)}}},
            **{s: {"description": "Error", "content": {
                "application/json": {"schema": oauth_err}}} for s in ("400", "401")}}}}


@cache
def document() -> dict[str, Any]:
    bodies = {r.body for r in ROUTES if r.body}
    _, defs = models_json_schema(
        [(x, "validation" if x in bodies else "serialization") for x in _models()],
        ref_template=_REF)
    paths: dict[str, dict[str, Any]] = {}
    for r in ROUTES:
        paths.setdefault(r.path, {})[r.method.lower()] = _operation(r)
    paths["/api/v2/oauth/token"] = _token_operation()
    return {
        "openapi": "3.1.0",
        "info": {"title": "pyheadscale API", "version": "v2", "description":
                 "Tailscale-compatible API (Headscale 0.30's /api/v2) with OAuth clients."},
        "paths": paths,
        "components": {"schemas": defs.get("$defs", {}), "securitySchemes": {
            "basicAuth": {"type": "http", "scheme": "basic"},
            "bearerAuth": {"type": "http", "scheme": "bearer"}}},
    }


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(text=json.dumps(document(), indent=2), content_type="application/json")


async def openapi_yaml(request: web.Request) -> web.Response:
    return web.Response(text=yaml.safe_dump(document(), sort_keys=False),
                        content_type="application/yaml")


async def docs(request: web.Request) -> web.Response:
    rows = "".join(
        f"<tr><td>{html.escape(r.method)}</td><td><code>{html.escape(r.path)}</code></td>"
        f"<td>{html.escape(r.summary)}</td><td><code>"
        f"{html.escape(r.scope.value if r.scope else r.scope_doc.replace('`', ''))}</code></td>"
        "</tr>" for r in ROUTES)
    page = ("<!doctype html><title>pyheadscale API v2</title><h1>API v2</h1>"
            '<p>OpenAPI: <a href="/api/v2/openapi.json">JSON</a>, '
            '<a href="/api/v2/openapi.yaml">YAML</a>. Token endpoint: '
            "<code>POST /api/v2/oauth/token</code>.</p><table border=1 cellpadding=4>"
            "<tr><th>Method</th><th>Path</th><th>Summary</th><th>OAuth scope</th></tr>"
            f"{rows}</table>")
    return web.Response(text=page, content_type="text/html")
