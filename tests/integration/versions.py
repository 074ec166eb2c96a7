"""Pinned official Tailscale client versions and where their binaries are cached."""

from __future__ import annotations

import os
from pathlib import Path

# Oldest supported, a middle release, and the newest stable release that builds from the Go
# module proxy. v1.104.x needs Go 1.27.3 and dependency versions (gvisor, gliderssh) that the
# proxy answers 403 for, so v1.102.5 is the newest buildable stable release.
PINNED: list[str] = ["v1.80.3", "v1.92.5", "v1.102.5"]
OLDEST, MIDDLE, NEWEST = PINNED[0], PINNED[len(PINNED) // 2], PINNED[-1]

# Go toolchain to fall back to when a release's go.mod needs a newer Go than the local one.
FALLBACK_TOOLCHAIN = "go1.27.3"


def cache_dir() -> Path:
    """Root of the build cache (outside the repository)."""
    env = os.environ.get("PYHEADSCALE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pyheadscale"


def version_dir(version: str) -> Path:
    return cache_dir() / "tailscale" / version


def tailscale_bin(version: str) -> Path:
    return version_dir(version) / "tailscale"


def tailscaled_bin(version: str) -> Path:
    return version_dir(version) / "tailscaled"


def newest() -> str:
    return PINNED[-1]
