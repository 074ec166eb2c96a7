"""Go's own decoder as a test oracle: tests/gocheck/main.go on Tailscale's tailcfg types.

`GoDecoder("newest")` (or "oldest") builds the program for that pinned tailscale.com version
once into <cache>/gocheck-<which>/<hash of the sources>/ (go.mod pins the newest pinned client
release, oldest.mod the oldest) and keeps one process open; `decode(kind, value)` answers
whether encoding/json accepted the document and what Go re-encodes it to.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from tests.bench.build_go import build_local_module

SRC = Path(__file__).resolve().parent
MODFILES = {"newest": "go.mod", "oldest": "oldest.mod"}


def ensure(which: str, log: Any = sys.stderr) -> Path:
    """The built program for `which` ("newest"/"oldest"); built on first use."""
    return build_local_module(SRC, f"gocheck-{which}", log, modfile=MODFILES[which])


class GoDecoder:
    """One running gocheck process; use as a context manager."""

    def __init__(self, which: str = "newest") -> None:
        self.which = which
        self.proc = subprocess.Popen([str(ensure(which))], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)

    def decode(self, kind: str, value: Any) -> tuple[bool, Any, str]:
        """(accepted, Go's re-encoding as Python data, error text)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(orjson.dumps({"kind": kind, "data": value}) + b"\n")
        self.proc.stdin.flush()
        res = orjson.loads(self.proc.stdout.readline())
        return bool(res["ok"]), res.get("out"), res.get("err", "")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=10)

    def __enter__(self) -> GoDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> int:
    for which in MODFILES:
        print(f"ok gocheck ({which}): {ensure(which)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
