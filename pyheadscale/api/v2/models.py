"""Wire types of /api/v2: request bodies (validated, bounded) and response objects, in
Tailscale's shapes. Field names are the JSON names. Optional response fields left as None are
dropped on output (Go's `omitempty`); the OpenAPI document is generated from these classes.

Request models ignore unknown fields (the SDK sends more than Headscale uses) but are strict
about the types of the fields they read, as Go's decoder is.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_TAGS = 64
MAX_ROUTES = 1024
MAX_SCOPES = 32
Tag = Annotated[str, StringConstraints(min_length=5, max_length=128)]
ScopeName = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Route = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- requests --------------------------------------------------------------------------------


class SetAuthorizedRequest(_Request):
    authorized: bool = False


class SetNameRequest(_Request):
    name: Annotated[str, StringConstraints(max_length=255)] = ""


class SetTagsRequest(_Request):
    # The SDK sends "tags": null for "make untagged".
    tags: list[Tag] | None = Field(default=None, max_length=MAX_TAGS)


class SetKeyRequest(_Request):
    keyExpiryDisabled: bool = False


class SetRoutesRequest(_Request):
    routes: list[Route] | None = Field(default=None, max_length=MAX_ROUTES)


class CreateKeyDeviceCreate(_Request):
    reusable: bool = False
    ephemeral: bool = False
    preauthorized: bool = False
    tags: list[Tag] | None = Field(default=None, max_length=MAX_TAGS)


class CreateKeyDevices(_Request):
    create: CreateKeyDeviceCreate = CreateKeyDeviceCreate()


class CreateKeyCapabilities(_Request):
    devices: CreateKeyDevices = CreateKeyDevices()


class CreateKeyRequest(_Request):
    """keyType "auth" (default) creates an auth key from capabilities; "client" creates an
    OAuth client from the top-level scopes and tags."""

    keyType: Literal["", "auth", "client"] = ""
    capabilities: CreateKeyCapabilities | None = None
    # Auth keys: lifetime in seconds, default 90 days; at most ten years.
    expirySeconds: Annotated[int, Field(ge=0, le=10 * 365 * 86400)] = 0
    description: Annotated[str, StringConstraints(max_length=50)] = ""
    scopes: list[ScopeName] | None = Field(default=None, max_length=MAX_SCOPES)
    tags: list[Tag] | None = Field(default=None, max_length=MAX_TAGS)


class SetOAuthClientRequest(_Request):
    keyType: Literal["", "client"] = ""
    description: Annotated[str, StringConstraints(max_length=50)] = ""
    scopes: list[ScopeName] | None = Field(default=None, max_length=MAX_SCOPES)
    tags: list[Tag] | None = Field(default=None, max_length=MAX_TAGS)


# --- responses -------------------------------------------------------------------------------


class Device(_Response):
    addresses: list[str]
    name: str
    id: str
    nodeId: str
    authorized: bool
    user: str
    tags: list[str]
    keyExpiryDisabled: bool
    created: str
    expires: str | None = None
    hostname: str
    isEphemeral: bool
    lastSeen: str | None = None
    machineKey: str
    nodeKey: str
    os: str
    clientVersion: str
    updateAvailable: bool
    connectedToControl: bool  # Tailscale's field (Headscale omits it); the SDK reads it
    # Only with ?fields=all, as Tailscale.
    advertisedRoutes: list[str] | None = None
    enabledRoutes: list[str] | None = None


class DeviceList(_Response):
    devices: list[Device]


class DeviceRoutes(_Response):
    advertisedRoutes: list[str]
    enabledRoutes: list[str]


class KeyDeviceCreate(_Response):
    reusable: bool
    ephemeral: bool
    preauthorized: bool
    tags: list[str]


class KeyDevices(_Response):
    create: KeyDeviceCreate


class KeyCapabilities(_Response):
    devices: KeyDevices


class Key(_Response):
    id: str
    keyType: Literal["auth", "client"]
    key: str | None = None  # the secret, on create only
    description: str | None = None
    expirySeconds: int | None = None  # seconds (the Go SDK reads it as a Duration)
    created: str
    expires: str | None = None
    revoked: str | None = None
    invalid: bool
    capabilities: KeyCapabilities
    scopes: list[str] | None = None
    tags: list[str] | None = None
    userId: str | None = None


class KeyList(_Response):
    keys: list[Key]


class User(_Response):
    id: str
    displayName: str
    loginName: str
    profilePicUrl: str
    tailnetId: str
    created: str
    type: str
    role: str
    status: str
    deviceCount: int
    lastSeen: str
    currentlyConnected: bool


class UserList(_Response):
    users: list[User]


class TailnetSettings(_Response):
    aclsExternallyManagedOn: bool
    aclsExternalLink: str
    devicesApprovalOn: bool
    devicesAutoUpdatesOn: bool
    devicesKeyDurationDays: int
    usersApprovalOn: bool
    usersRoleAllowedToJoinExternalTailnets: str
    networkFlowLoggingOn: bool
    regionalRoutingOn: bool
    postureIdentityCollectionOn: bool
    httpsEnabled: bool


class TokenResponse(_Response):
    access_token: str
    token_type: Literal["Bearer"]
    expires_in: int
    scope: str | None = None


class ErrorBody(_Response):
    message: str
    data: list[dict[str, list[str]]] | None = None
    status: int


class Empty(_Response):
    pass
