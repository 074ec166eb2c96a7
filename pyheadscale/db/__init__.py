"""Persistence: SQLModel tables shaped like Headscale 0.29's, engines, and migrations."""

from pyheadscale.db import cluster as cluster  # registers the cluster tables in metadata
from pyheadscale.db.engine import (
    HEADSCALE_COMPAT_VERSION,
    DatabaseConfigError,
    MigrationError,
    engine_from_config,
    make_engine,
    migrate,
)
from pyheadscale.db.models import (
    ApiKey,
    DatabaseVersion,
    Node,
    Policy,
    PreAuthKey,
    User,
    metadata,
    utcnow,
)

__all__ = [
    "HEADSCALE_COMPAT_VERSION",
    "ApiKey",
    "DatabaseConfigError",
    "DatabaseVersion",
    "MigrationError",
    "Node",
    "Policy",
    "PreAuthKey",
    "User",
    "engine_from_config",
    "make_engine",
    "metadata",
    "migrate",
    "utcnow",
]
