"""Headscale-compatible admin REST API (`/api/v1`)."""

from pyheadscale.api.v1 import ROUTES, AdminDeps, add_api_routes, version_info

__all__ = ["ROUTES", "AdminDeps", "add_api_routes", "version_info"]
