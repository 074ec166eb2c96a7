"""Build (or reuse) our /ts2021-over-WebSocket client (tests/integration/ts2021ws, a Go
module on tailscale.com at the newest pinned client version): natively, and for GOOS=js to
run under Node with Go's wasm_exec_node.js. `python -m tests.integration.ts2021ws_build`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.bench.build_go import build_local_module
from tests.buildutil import BuildError, report

SRC = Path(__file__).resolve().parent / "ts2021ws"


def native() -> Path:
    return build_local_module(SRC, "ts2021ws")


def wasm() -> Path:
    return build_local_module(SRC, "ts2021ws.wasm", goenv={"GOOS": "js", "GOARCH": "wasm"})


def wasm_exec_node() -> Path:
    """Go's launcher for js/wasm programs under Node (it loads wasm_exec.js beside it)."""
    go = shutil.which("go")
    if go is None:
        raise BuildError("Go is not installed (no `go` on PATH)")
    root = subprocess.run([go, "env", "GOROOT"], capture_output=True, text=True,
                          check=True).stdout.strip()
    path = Path(root) / "lib" / "wasm" / "wasm_exec_node.js"
    if not path.is_file():
        raise BuildError(f"{path} missing (Go >= 1.24 ships it)")
    return path


def main() -> int:
    return report(lambda: iter([("ts2021ws", native()), ("ts2021ws.wasm", wasm()),
                                ("wasm_exec_node.js", wasm_exec_node())]))


if __name__ == "__main__":
    sys.exit(main())
