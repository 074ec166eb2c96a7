"""Refusals of the OIDC relying party: what the browser is shown, and a provider that is down."""

from __future__ import annotations


class OIDCError(Exception):
    """A refused login step; `status` and `message` are what the browser is shown."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class DiscoveryError(Exception):
    """The provider's discovery document or JWKS could not be loaded."""
