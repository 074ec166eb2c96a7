"""The v1 API error shape: `{"code": <gRPC code>, "message": ..., "details": []}`.

Headscale <= 0.29 answered through grpc-gateway, so the body carries the gRPC status code
while the HTTP status follows the corrected 0.30 mapping (400/404/409 instead of 500s), which
is what the conformance goldens pin. Tools read `message` and match substrings in it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from aiohttp import web

from pyheadscale.state.errors import (
    AlreadyExists,
    Conflict,
    InvalidAPIKey,
    InvalidArgument,
    InvalidAuthKey,
    NotFound,
    StateError,
    Unavailable,
)

# HTTP status -> gRPC code (google.golang.org/grpc/codes) that grpc-gateway turns back into
# that status (runtime.HTTPStatusFromCode); statuses it never produces get Unknown (2).
GRPC_CODE = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 429: 8, 500: 13, 501: 12, 503: 14,
             504: 4}


class APIError(Exception):
    """An error answered as {code, message, details} with an HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> web.Response:
        return error_response(self.status, self.message)


def error_response(status: int, message: str) -> web.Response:
    body = {"code": GRPC_CODE.get(status, 2), "message": message, "details": []}
    return web.json_response(body, status=status)


def unauthorized() -> web.Response:
    # headscale-admin treats exactly this plain-text 401 as "bad API key".
    return web.Response(status=401, text="Unauthorized", content_type="text/plain")


def bad_request(message: str) -> APIError:
    return APIError(400, message)


def not_found(message: str) -> APIError:
    return APIError(404, message)


def from_state(context: str, e: StateError, *, conflict_status: int = 409) -> APIError:
    """Map a typed state error to an API error, prefixing Headscale's context text."""
    msg = f"{context}: {e}" if context else str(e)
    if isinstance(e, NotFound):
        return APIError(404, msg)
    if isinstance(e, InvalidArgument | InvalidAuthKey | InvalidAPIKey):
        return APIError(400, msg)
    if isinstance(e, AlreadyExists):
        return APIError(409, msg)
    if isinstance(e, Conflict):
        return APIError(conflict_status, msg)
    if isinstance(e, Unavailable):
        return APIError(503, msg)  # nothing was written: retry once the database is back
    return APIError(500, msg)


@contextmanager
def state_errors(context: str, *, conflict_status: int = 409) -> Iterator[None]:
    """Answer a typed state error raised in the block as from_state maps it."""
    try:
        yield
    except StateError as e:
        raise from_state(context, e, conflict_status=conflict_status) from None
