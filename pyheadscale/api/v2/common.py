"""What every /api/v2 handler shares: who is calling, Tailscale's error body, reading typed
request bodies, and Go-compatible JSON output.

Errors are Tailscale's `{"message", "data"?, "status"}` (what its Go client, and so the
Terraform provider and tscli, decode); the HTTP status is the one that counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from pyheadscale.auth.oauth import Scope, grants
from pyheadscale.state.errors import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    InvalidAuthKey,
    NotFound,
    StateError,
    Unavailable,
)

M = TypeVar("M", bound=BaseModel)

ZERO_TIME = "0001-01-01T00:00:00Z"
MAX_BODY = 1 << 20  # policy files are the largest bodies; Tailscale caps them near 1 MiB


class V2Error(Exception):
    """Answered as Tailscale's error body with this HTTP status."""

    def __init__(self, status: int, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details or []

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.details)


def error_response(status: int, message: str, details: list[str] | None = None) -> web.Response:
    body: dict[str, Any] = {"message": message}
    if details:
        body["data"] = [{"errors": details}]
    body["status"] = status
    return web.json_response(body, status=status)


def from_state(context: str, e: StateError) -> V2Error:
    msg = f"{context}: {e}" if context else str(e)
    if isinstance(e, NotFound):
        return V2Error(404, msg)
    if isinstance(e, InvalidArgument | InvalidAuthKey | AlreadyExists | Conflict):
        return V2Error(400, msg)
    if isinstance(e, Unavailable):
        return V2Error(503, msg)  # nothing was written: retry once the database is back
    return V2Error(500, msg)


@dataclass(frozen=True)
class Principal:
    """The authenticated caller. An admin API key (or the local socket) is all-access; an
    OAuth access token holds scopes and tags."""

    kind: Literal["local", "apikey", "token"]
    scopes: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    user_id: int | None = None  # the API key's user, if it has one

    @property
    def is_token(self) -> bool:
        return self.kind == "token"

    def allows(self, scope: Scope) -> bool:
        return not self.is_token or grants(self.scopes, scope)

    def require(self, scope: Scope) -> None:
        if not self.allows(scope):
            raise V2Error(403, f"token is missing the required scope {scope.value}")


def require_tailnet(request: web.Request) -> None:
    """Headscale has one tailnet, addressed as "-"; any other name does not exist."""
    if request.match_info.get("tailnet") != "-":
        raise V2Error(404, "tailnet not found")


def parse_id(text: str, subject: str) -> int:
    """A decimal entity id; anything else names no entity (404, so IsNotFound works)."""
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise V2Error(404, f"{subject} not found")
    return int(text)


async def read_capped(request: web.Request, limit: int = MAX_BODY) -> bytes:
    """The whole body, refusing (413) anything over `limit` without buffering more of it."""
    if request.content_length is not None and request.content_length > limit:
        raise V2Error(413, "request body too large")
    buf = bytearray()
    while chunk := await request.content.read(limit + 1 - len(buf)):
        buf += chunk
        if len(buf) > limit:
            raise V2Error(413, "request body too large")
    return bytes(buf)


async def read_model(request: web.Request, model: type[M], *, allow_empty: bool = False) -> M:
    """A JSON object body validated against `model` (strict types, bounded fields)."""
    raw = await read_capped(request)
    if not raw.strip():
        if allow_empty:
            return model()
        raise V2Error(400, "request body is empty")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise V2Error(400, f"invalid JSON body: {e}") from None
    if not isinstance(data, dict):
        raise V2Error(400, "invalid JSON body: expected an object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        details = [f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
                   for err in e.errors(include_url=False)]
        raise V2Error(400, "invalid request body: " + "; ".join(details), details) from None


def go_time(dt: datetime | None) -> str:
    """Go's time.Time JSON (RFC 3339 with trailing fraction zeros trimmed), in UTC."""
    if dt is None:
        return ZERO_TIME
    dt = dt.astimezone(UTC)
    base = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if dt.microsecond:
        base += "." + f"{dt.microsecond:06d}".rstrip("0")
    return base + "Z"


def json_ok(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status)


def model_json(model: BaseModel) -> dict[str, Any]:
    """A response model as the wire object: unset optional (Go `omitempty`) fields dropped."""
    return model.model_dump(mode="json", exclude_none=True)
