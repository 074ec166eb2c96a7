"""Where the conformance data lives: recorded outside this repository (Tailscale's hosted
control plane, Headscale's API), so it is found through an environment variable, by default
in the `shared/conformance/` directory beside the repository checkout."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def conformance_dir(env_var: str, name: str) -> Path:
    """$env_var if set, else <repository's parent>/shared/conformance/<name>."""
    return Path(os.environ.get(env_var) or REPO.parent / "shared" / "conformance" / name)
