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

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.bench.build_go import BuildError, _lock
from tests.integration import versions

SRC = Path(__file__).resolve().parent / "goclient"
NAME = "apiv2goclient"


def _source_hash() -> str:
    h = hashlib.sha256()
    for f in sorted(SRC.iterdir()):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def goclient_path() -> Path:
    return versions.cache_dir() / NAME / _source_hash() / NAME


def ensure_goclient(log=sys.stderr) -> Path:
    """The built program; builds it (minutes the first time: it fetches its modules)."""
    out = goclient_path()
    if out.is_file() and os.access(out, os.X_OK):
        return out
    go = shutil.which("go")
    if go is None:
        raise BuildError("Go is not installed (no `go` on PATH); needed to build apiv2goclient")
    group = out.parent.parent
    with _lock(group):
        if out.is_file():
            return out
        print(f"building {NAME} into {out.parent}", file=log, flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{NAME}-", dir=group))
        env = dict(os.environ, GOTOOLCHAIN="local", CGO_ENABLED="0",
                   GOFLAGS="-mod=readonly -trimpath")
        try:
            res = subprocess.run([go, "build", "-o", str(tmp / NAME), "."], cwd=SRC, env=env,
                                 capture_output=True, text=True, check=False, timeout=1800)
            if res.returncode != 0:
                raise BuildError(f"building {NAME} failed:\n{(res.stderr or res.stdout)[-3000:]}")
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / NAME, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> int:
    try:
        print(f"ok {NAME}: {ensure_goclient()}")
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
