"""The /api/v1 route table: one row per endpoint, the single source for the router (v1.py)
and the OpenAPI documents (openapi.py).

Paths and verbs follow Headscale's grpc-gateway paths; `handler` names a V1API method.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: str  # V1API method name
    op_id: str  # Headscale 0.30 (OpenAPI 3) operation id
    rpc: str  # Headscale <= 0.29 gRPC method (Swagger 2 id HeadscaleService_<rpc>)
    summary: str
    tag: str
    body: str | None = None  # request schema name
    response: str = "Empty"  # response schema name
    query: tuple[tuple[str, str], ...] = ()  # (name, type)
    path_params: tuple[str, ...] = field(default=())


ROUTES: tuple[Route, ...] = (
    # users
    Route("GET", "/api/v1/user", "list_users", "listUsers", "ListUsers", "List users", "Users",
          response="ListUsersResponse",
          query=(("id", "uint64"), ("name", "string"), ("email", "string"))),
    Route("POST", "/api/v1/user", "create_user", "createUser", "CreateUser", "Create user",
          "Users", body="CreateUserRequest", response="UserResponse"),
    Route("POST", "/api/v1/user/{oldId}/rename/{newName}", "rename_user", "renameUser",
          "RenameUser", "Rename user", "Users", response="UserResponse",
          path_params=("oldId", "newName")),
    Route("DELETE", "/api/v1/user/{id}", "delete_user", "deleteUser", "DeleteUser",
          "Delete user", "Users", path_params=("id",)),
    # nodes (static paths before {nodeId})
    Route("GET", "/api/v1/node", "list_nodes", "listNodes", "ListNodes", "List nodes", "Nodes",
          response="ListNodesResponse", query=(("user", "string"),)),
    Route("POST", "/api/v1/node/register", "register_node", "registerNode", "RegisterNode",
          "Register node", "Nodes", response="NodeResponse",
          query=(("user", "string"), ("key", "string"))),
    Route("POST", "/api/v1/node/backfillips", "backfill_ips", "backfillNodeIPs",
          "BackfillNodeIPs", "Backfill node IPs", "Nodes", response="BackfillNodeIPsResponse",
          query=(("confirmed", "boolean"),)),
    Route("GET", "/api/v1/node/{nodeId}", "get_node", "getNode", "GetNode", "Get node",
          "Nodes", response="NodeResponse", path_params=("nodeId",)),
    Route("DELETE", "/api/v1/node/{nodeId}", "delete_node", "deleteNode", "DeleteNode",
          "Delete node", "Nodes", path_params=("nodeId",)),
    Route("POST", "/api/v1/node/{nodeId}/expire", "expire_node", "expireNode", "ExpireNode",
          "Expire node", "Nodes", body="ExpireNodeRequest", response="NodeResponse",
          query=(("expiry", "date-time"), ("disableExpiry", "boolean")),
          path_params=("nodeId",)),
    Route("POST", "/api/v1/node/{nodeId}/rename/{newName}", "rename_node", "renameNode",
          "RenameNode", "Rename node", "Nodes", response="NodeResponse",
          path_params=("nodeId", "newName")),
    Route("POST", "/api/v1/node/{nodeId}/tags", "set_tags", "setTags", "SetTags", "Set tags",
          "Nodes", body="SetTagsRequest", response="NodeResponse", path_params=("nodeId",)),
    Route("POST", "/api/v1/node/{nodeId}/approve_routes", "approve_routes", "setApprovedRoutes",
          "SetApprovedRoutes", "Set approved routes", "Nodes", body="SetApprovedRoutesRequest",
          response="NodeResponse", path_params=("nodeId",)),
    Route("POST", "/api/v1/debug/node", "debug_create_node", "debugCreateNode",
          "DebugCreateNode", "Debug create node", "Nodes", body="DebugCreateNodeRequest",
          response="NodeResponse"),
    # interactive auth
    Route("POST", "/api/v1/auth/register", "auth_register", "authRegister", "AuthRegister",
          "Register node via auth flow", "Auth", body="AuthRegisterRequest",
          response="NodeResponse"),
    Route("POST", "/api/v1/auth/approve", "auth_approve", "authApprove", "AuthApprove",
          "Approve a pending auth session", "Auth", body="AuthIdRequest"),
    Route("POST", "/api/v1/auth/reject", "auth_reject", "authReject", "AuthReject",
          "Reject a pending auth session", "Auth", body="AuthIdRequest"),
    # pre-auth keys
    Route("GET", "/api/v1/preauthkey", "list_preauth_keys", "listPreAuthKeys",
          "ListPreAuthKeys", "List pre-auth keys", "PreAuthKeys",
          response="ListPreAuthKeysResponse"),
    Route("POST", "/api/v1/preauthkey", "create_preauth_key", "createPreAuthKey",
          "CreatePreAuthKey", "Create pre-auth key", "PreAuthKeys",
          body="CreatePreAuthKeyRequest", response="PreAuthKeyResponse"),
    Route("POST", "/api/v1/preauthkey/expire", "expire_preauth_key", "expirePreAuthKey",
          "ExpirePreAuthKey", "Expire pre-auth key", "PreAuthKeys", body="IdRequest"),
    Route("DELETE", "/api/v1/preauthkey", "delete_preauth_key", "deletePreAuthKey",
          "DeletePreAuthKey", "Delete pre-auth key", "PreAuthKeys", query=(("id", "uint64"),)),
    # api keys
    Route("GET", "/api/v1/apikey", "list_api_keys", "listApiKeys", "ListApiKeys",
          "List API keys", "ApiKeys", response="ListApiKeysResponse"),
    Route("POST", "/api/v1/apikey", "create_api_key", "createApiKey", "CreateApiKey",
          "Create API key", "ApiKeys", body="CreateApiKeyRequest",
          response="CreateApiKeyResponse"),
    Route("POST", "/api/v1/apikey/expire", "expire_api_key", "expireApiKey", "ExpireApiKey",
          "Expire API key", "ApiKeys", body="ExpireApiKeyRequest"),
    Route("DELETE", "/api/v1/apikey/{prefix}", "delete_api_key", "deleteApiKey",
          "DeleteApiKey", "Delete API key", "ApiKeys", query=(("id", "uint64"),),
          path_params=("prefix",)),
    # policy
    Route("GET", "/api/v1/policy", "get_policy", "getPolicy", "GetPolicy", "Get policy",
          "Policy", response="PolicyResponse"),
    Route("PUT", "/api/v1/policy", "set_policy", "setPolicy", "SetPolicy", "Set policy",
          "Policy", body="PolicyRequest", response="PolicyResponse"),
    Route("POST", "/api/v1/policy/check", "check_policy", "checkPolicy", "CheckPolicy",
          "Check policy", "Policy", body="PolicyRequest"),
    # health
    Route("GET", "/api/v1/health", "health", "health", "Health", "Health check", "Health",
          response="HealthResponse"),
)

