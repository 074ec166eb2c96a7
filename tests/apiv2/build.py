"""Build (or reuse) the Go programs the v2 API tests run: `python -m tests.apiv2.build`.

- apiv2goclient: our own program (tests/apiv2/goclient) on Tailscale's Go API client,
  `tailscale.com/client/tailscale/v2` from the Go module proxy. It is cached under
  <cache>/apiv2goclient/<hash of its sources>/, so an edit rebuilds it and nothing else does.

The Tailscale Terraform provider cannot be built here: the Go module proxy answers
403 "This module version is not available" for github.com/tailscale/terraform-provider-tailscale
at every version (its version list, v0.17.2 ... v0.29.2, and commit pseudo-versions), and there
is no other registry that carries it. So OpenTofu, which would only drive that provider, is not
built either; docs/api-v2.md records this and what the Go program does instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.bench.build_go import build_local_module, local_module_path
from tests.buildutil import report

SRC = Path(__file__).resolve().parent / "goclient"
NAME = "apiv2goclient"


def goclient_path() -> Path:
    return local_module_path(SRC, NAME)


def ensure_goclient(log=sys.stderr) -> Path:
    """The built program; builds it (minutes the first time: it fetches its modules)."""
    return build_local_module(SRC, NAME, log)


def main() -> int:
    return report(lambda: [(NAME, ensure_goclient())])


if __name__ == "__main__":
    sys.exit(main())
