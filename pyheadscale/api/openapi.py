"""The API description, generated from routes.ROUTES: OpenAPI 3.0 at /api/v1/openapi.{yaml,json}
(Headscale 0.30) and a Swagger 2.0 export at /swagger/v1/openapiv2.json (Headscale <= 0.29,
what go-swagger clients such as the Terraform provider are generated from; operation ids
`HeadscaleService_<Rpc>`).
"""

from __future__ import annotations

import copy
import html
from collections.abc import Callable
from typing import Any

import yaml
from aiohttp import web

from pyheadscale.api.routes import ROUTES, Route

_S = {"type": "string"}
_B = {"type": "boolean"}
_T = {"type": "string", "format": "date-time"}
_ID = {"type": "string", "format": "uint64"}
_STRS = {"type": "array", "items": {"type": "string"}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


def _obj(props: dict[str, Any], required: bool = True) -> dict[str, Any]:
    d: dict[str, Any] = {"type": "object", "properties": props}
    if required and props:
        d["required"] = list(props)
    return d


SCHEMAS: dict[str, dict[str, Any]] = {
    "User": _obj({"id": _ID, "name": _S, "createdAt": _T, "displayName": _S, "email": _S,
                  "providerId": _S, "provider": _S, "profilePicUrl": _S}),
    "NodePreAuthKey": _obj({"user": _nullable(_ref("User")), "id": _ID, "key": _S,
                            "reusable": _B, "ephemeral": _B, "used": _B,
                            "expiration": _nullable(_T), "createdAt": _nullable(_T),
                            "aclTags": _STRS}),
    "PreAuthKey": _obj({"user": _nullable(_ref("User")), "id": _ID, "key": _S, "reusable": _B,
                        "ephemeral": _B, "used": _B, "expiration": _T, "createdAt": _T,
                        "aclTags": _STRS}),
    "Node": _obj({
        "id": _ID, "machineKey": _S, "nodeKey": _S, "discoKey": _S, "ipAddresses": _STRS,
        "name": _S, "user": _nullable(_ref("User")), "lastSeen": _nullable(_T),
        "expiry": _nullable(_T), "preAuthKey": _nullable(_ref("NodePreAuthKey")),
        "createdAt": _T,
        "registerMethod": {"type": "string", "enum": [
            "REGISTER_METHOD_UNSPECIFIED", "REGISTER_METHOD_AUTH_KEY", "REGISTER_METHOD_CLI",
            "REGISTER_METHOD_OIDC"]},
        "givenName": _S, "online": _B, "approvedRoutes": _STRS, "availableRoutes": _STRS,
        "subnetRoutes": _STRS, "tags": _STRS}),
    "ApiKey": _obj({"id": _ID, "prefix": _S, "expiration": _nullable(_T),
                    "createdAt": _nullable(_T), "lastSeen": _nullable(_T)}),
    "Empty": _obj({}),
    "Error": _obj({"code": {"type": "integer", "format": "int32"}, "message": _S,
                   "details": {"type": "array", "items": {"type": "object"}}}),
    # responses
    "UserResponse": _obj({"user": _ref("User")}),
    "ListUsersResponse": _obj({"users": {"type": "array", "items": _ref("User")}}),
    "NodeResponse": _obj({"node": _ref("Node")}),
    "ListNodesResponse": _obj({"nodes": {"type": "array", "items": _ref("Node")}}),
    "BackfillNodeIPsResponse": _obj({"changes": _STRS}),
    "PreAuthKeyResponse": _obj({"preAuthKey": _ref("PreAuthKey")}),
    "ListPreAuthKeysResponse": _obj({"preAuthKeys": {"type": "array",
                                                     "items": _ref("PreAuthKey")}}),
    "CreateApiKeyResponse": _obj({"apiKey": _S}),
    "ListApiKeysResponse": _obj({"apiKeys": {"type": "array", "items": _ref("ApiKey")}}),
    "PolicyResponse": _obj({"policy": _S, "updatedAt": _nullable(_T)}),  # null: file mode
    "HealthResponse": _obj({"databaseConnectivity": _B}),
    # requests
    "CreateUserRequest": _obj({"name": _S, "displayName": _S, "email": _S, "pictureUrl": _S},
                              required=False),
    "ExpireNodeRequest": _obj({"expiry": _T, "disableExpiry": _B}, required=False),
    "SetTagsRequest": _obj({"tags": _STRS}, required=False),
    "SetApprovedRoutesRequest": _obj({"routes": _STRS}, required=False),
    "DebugCreateNodeRequest": _obj({"user": _S, "key": _S, "name": _S, "routes": _STRS},
                                   required=False),
    "AuthRegisterRequest": _obj({"user": _S, "authId": _S}, required=False),
    "AuthIdRequest": _obj({"authId": _S}, required=False),
    "CreatePreAuthKeyRequest": _obj({"user": _ID, "reusable": _B, "ephemeral": _B,
                                     "expiration": _T, "aclTags": _STRS}, required=False),
    "IdRequest": _obj({"id": _ID}, required=False),
    "CreateApiKeyRequest": _obj({"expiration": _T}, required=False),
    "ExpireApiKeyRequest": _obj({"prefix": _S, "id": _ID}, required=False),
    "PolicyRequest": _obj({"policy": _S}, required=False),
}

_QTYPES = {"uint64": _ID, "string": _S, "boolean": _B, "date-time": _T}


def _params(r: Route) -> list[dict[str, Any]]:
    out = [{"name": p, "in": "path", "required": True,
            "schema": _ID if p in ("id", "oldId", "nodeId") else _S} for p in r.path_params]
    out += [{"name": n, "in": "query", "required": False, "schema": _QTYPES[t]}
            for n, t in r.query]
    return out


def openapi3() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for r in ROUTES:
        op: dict[str, Any] = {
            "operationId": r.op_id, "summary": r.summary, "tags": [r.tag],
            "security": [{"bearer": []}],
            "responses": {
                "200": {"description": "OK", "content": {
                    "application/json": {"schema": _ref(r.response)}}},
                "401": {"description": "Unauthorized",
                        "content": {"text/plain": {"schema": _S}}},
                "default": {"description": "Error", "content": {
                    "application/json": {"schema": _ref("Error")}}},
            },
        }
        params = _params(r)
        if params:
            op["parameters"] = params
        if r.body:
            op["requestBody"] = {"required": False, "content": {
                "application/json": {"schema": _ref(r.body)}}}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "Headscale API", "version": "v1",
                 "description": "Headscale-compatible control server API (pyheadscale)."},
        "paths": paths,
        "components": {"schemas": copy.deepcopy(SCHEMAS),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def _to_v2(schema: Any) -> Any:
    """OpenAPI 3 schema -> Swagger 2 (refs move to #/definitions, nullable is dropped)."""
    if isinstance(schema, dict):
        out = {}
        for k, v in schema.items():
            if k == "nullable":
                out["x-nullable"] = v
            elif k == "$ref":
                out[k] = v.replace("#/components/schemas/", "#/definitions/")
            else:
                out[k] = _to_v2(v)
        return out
    if isinstance(schema, list):
        return [_to_v2(x) for x in schema]
    return schema


def swagger2() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for r in ROUTES:
        params = []
        for p in _params(r):
            q = {"name": p["name"], "in": p["in"], "required": p["required"],
                 **_to_v2(p["schema"])}
            params.append(q)
        if r.body:
            params.append({"name": "body", "in": "body", "required": True,
                           "schema": {"$ref": f"#/definitions/{r.body}"}})
        op: dict[str, Any] = {
            "operationId": f"HeadscaleService_{r.rpc}", "summary": r.summary,
            "tags": ["HeadscaleService"],
            "responses": {
                "200": {"description": "A successful response.",
                        "schema": {"$ref": f"#/definitions/{r.response}"}},
                "default": {"description": "An unexpected error response.",
                            "schema": {"$ref": "#/definitions/Error"}},
            },
        }
        if params:
            op["parameters"] = params
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "swagger": "2.0",
        "info": {"title": "headscale/v1/headscale.proto", "version": "version not set"},
        "consumes": ["application/json"], "produces": ["application/json"],
        "securityDefinitions": {"ApiKey": {"type": "apiKey", "name": "Authorization",
                                           "in": "header"}},
        "security": [{"ApiKey": []}],
        "paths": paths,
        "definitions": _to_v2(copy.deepcopy(SCHEMAS)),
    }


_DOCS = """<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<title>Headscale API</title></head><body><h1>Headscale API (pyheadscale)</h1>
<ul>{items}</ul></body></html>"""


def _docs_page() -> str:
    items = []
    for r in ROUTES:
        items.append(f"<li><code>{r.method} {html.escape(r.path)}</code> - "
                     f"{html.escape(r.summary)}</li>")
    links = ('<li><a href="/api/v1/openapi.yaml">openapi.yaml</a></li>'
             '<li><a href="/swagger/v1/openapiv2.json">openapiv2.json</a></li>')
    return _DOCS.format(items=links + "".join(items))


def public_routes() -> list[tuple[str, Callable[[web.Request], Any]]]:
    async def yaml_doc(request: web.Request) -> web.Response:
        text = yaml.safe_dump(openapi3(), sort_keys=False)
        return web.Response(text=text, content_type="application/yaml")

    async def json_doc(request: web.Request) -> web.Response:
        return web.json_response(openapi3())

    async def v2_doc(request: web.Request) -> web.Response:
        return web.json_response(swagger2())

    async def docs(request: web.Request) -> web.Response:
        return web.Response(text=_docs_page(), content_type="text/html")

    return [("/api/v1/openapi.yaml", yaml_doc), ("/api/v1/openapi.json", json_doc),
            ("/api/v1/docs", docs), ("/swagger/v1/openapiv2.json", v2_doc),
            ("/swagger", docs)]


