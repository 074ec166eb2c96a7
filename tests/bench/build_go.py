"""Build (or reuse) the Go programs the benchmarks and the ACME tests run.

`python -m tests.bench.build_go` builds Headscale, Tailscale's derper and Pebble with `go
install <pkg>@<version>` into <cache>/<tool>/<version>/ (cache: $PYHEADSCALE_CACHE or
~/.cache/pyheadscale), and our DERP load generator (tests/bench/derpload, a Go module using
Tailscale's own DERP client package) with `go build` into <cache>/derpload/<source hash>/.
Modules come from the Go module proxy. A binary already there is reused. Builds go to a
temporary directory first, so an interrupted build never leaves a half-written binary behind.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.buildutil import BuildError, file_lock, report
from tests.integration import versions

# v0.29.3 is the newest v0.29 patch the Go module proxy serves (v0.29.4 answers 403).
HEADSCALE_VERSION = "v0.29.3"
# derper at the newest pinned client version; the integration build may already have made it.
DERPER_VERSION = versions.newest()


@dataclass(frozen=True)
class GoTool:
    name: str  # binary name
    cache_group: str  # <cache>/<cache_group>/<version>/<name>
    package: str  # go install path without @version
    version: str
    probe: tuple[str, ...] = ("--version",)  # arguments that make a working binary exit 0

    @property
    def path(self) -> Path:
        return versions.cache_dir() / self.cache_group / self.version / self.name


DERPLOAD_SRC = Path(__file__).resolve().parent / "derpload"

HEADSCALE = GoTool("headscale", "headscale", "github.com/juanfont/headscale/cmd/headscale",
                   HEADSCALE_VERSION)
DERPER = GoTool("derper", "tailscale", "tailscale.com/cmd/derper", DERPER_VERSION)
# Let's Encrypt's test ACME server and its challenge/DNS test server (the ACME tests).
PEBBLE_VERSION = "v2.10.3"
PEBBLE = GoTool("pebble", "pebble", "github.com/letsencrypt/pebble/v2/cmd/pebble",
                PEBBLE_VERSION, probe=("-version",))
CHALLTESTSRV = GoTool("pebble-challtestsrv", "pebble",
                      "github.com/letsencrypt/pebble/v2/cmd/pebble-challtestsrv",
                      PEBBLE_VERSION, probe=("-h",))
TOOLS = {"headscale": HEADSCALE, "derper": DERPER, "pebble": PEBBLE,
         "pebble-challtestsrv": CHALLTESTSRV}
EVERYTHING = [*TOOLS, "derpload"]


def _works(tool: GoTool) -> bool:
    p = tool.path
    if not p.is_file() or not os.access(p, os.X_OK):
        return False
    probe = ["version"] if tool.name == "headscale" else list(tool.probe)
    try:
        res = subprocess.run([str(p), *probe], capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


def _run(argv: list[str], env: dict[str, str], cwd: str | None = None) -> str:
    """Run a go command; returns "" on success, else its error output."""
    res = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    return "" if res.returncode == 0 else (res.stderr or res.stdout).strip()


def _go_build(go: str, tool: GoTool, out: Path, env: dict[str, str]) -> None:
    """`go install pkg@version` into `out`; retried with the fallback toolchain if needed.

    `go install @version` also reads the module's version list (for deprecation notices),
    which the proxy refuses for some modules (Headscale). Then the module's source is
    fetched with `go mod download` and built inside its own module directory instead.
    """
    pkg = f"{tool.package}@{tool.version}"
    last = ""
    for toolchain in (env.get("GOTOOLCHAIN", "local"), versions.FALLBACK_TOOLCHAIN):
        env["GOTOOLCHAIN"] = toolchain
        env["GOBIN"] = str(out)
        last = _run([go, "install", pkg], env)
        if not last:
            return
        if "@v/list" in last:
            module, _, sub = _split_module(tool.package)
            res = subprocess.run([go, "mod", "download", "-json", f"{module}@{tool.version}"],
                                 env=env, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise BuildError(f"go mod download {module}@{tool.version} failed:\n"
                                 f"{(res.stdout + res.stderr)[-3000:]}")
            src = json.loads(res.stdout)["Dir"]
            last = _run([go, "build", "-o", str(out / tool.name), f"./{sub}"], env, cwd=src)
            if not last:
                return
        # Only "needs a newer Go" is worth a retry with the fallback toolchain.
        if "requires go >=" not in last and "toolchain" not in last:
            break
    raise BuildError(f"building {pkg} failed:\n{last[-3000:]}")


def _split_module(package: str) -> tuple[str, str, str]:
    """github.com/o/r/cmd/x -> (github.com/o/r, /, cmd/x); good for github.com paths only."""
    parts = package.split("/")
    return "/".join(parts[:3]), "/", "/".join(parts[3:])


def ensure(tool: GoTool, log=sys.stderr) -> Path:
    """Return the path of a working `tool` binary, building it first if needed."""
    if _works(tool):
        return tool.path
    go = shutil.which("go")
    if go is None:
        raise BuildError(f"Go is not installed (no `go` on PATH); needed to build {tool.name}")
    group = tool.path.parent.parent
    with file_lock(group):
        if _works(tool):
            return tool.path
        pkg = f"{tool.package}@{tool.version}"
        print(f"building {pkg} into {tool.path.parent} (takes minutes)", file=log, flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{tool.name}-", dir=group))
        env = dict(os.environ)
        env["GOFLAGS"] = (env.get("GOFLAGS", "") + " -trimpath").strip()
        env["CGO_ENABLED"] = env.get("CGO_ENABLED", "0")
        try:
            _go_build(go, tool, tmp, env)
            tool.path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / tool.name, tool.path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not _works(tool):
        raise BuildError(f"{tool.name} {tool.version} built but does not run")
    return tool.path


def _derpload_pin() -> str:
    """The tailscale.com version derpload's go.mod requires (must be the newest pinned)."""
    for line in (DERPLOAD_SRC / "go.mod").read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["require"] and parts[1:2] == ["tailscale.com"]:
            return parts[2]
        if parts[:1] == ["tailscale.com"]:
            return parts[1]
    raise BuildError("tests/bench/derpload/go.mod does not require tailscale.com")


def local_module_path(src: Path, name: str) -> Path:
    """Where our Go program in `src` builds to: <cache>/<name>/<hash of its files>/<name>, so
    an edit rebuilds it and nothing else does."""
    h = hashlib.sha256()
    for f in sorted(src.iterdir()):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return versions.cache_dir() / name / h.hexdigest()[:16] / name


def build_local_module(src: Path, name: str, log=sys.stderr, modfile: str = "go.mod",
                       goenv: dict[str, str] | None = None) -> Path:
    """`go build` our Go program in `src` (its go.mod and go.sum, or `modfile` and its .sum,
    pin every module, fetched from the Go module proxy) with the local toolchain; reuses an
    earlier build of the same files. `goenv`: extra environment (GOOS/GOARCH to cross-build)."""
    out = local_module_path(src, name)
    if out.is_file() and os.access(out, os.X_OK):
        return out
    go = shutil.which("go")
    if go is None:
        raise BuildError(f"Go is not installed (no `go` on PATH); needed to build {name}")
    group = out.parent.parent
    with file_lock(group):
        if out.is_file():
            return out
        print(f"building {name} into {out.parent} (minutes the first time)", file=log,
              flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=group))
        env = dict(os.environ, GOTOOLCHAIN="local", CGO_ENABLED="0",
                   GOFLAGS="-mod=readonly -trimpath", **(goenv or {}))
        try:
            err = _run([go, "build", f"-modfile={modfile}", "-o", str(tmp / name), "."], env,
                       cwd=str(src))
            if err:
                raise BuildError(f"building {name} failed:\n{err[-3000:]}")
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_derpload(log=sys.stderr) -> Path:
    """The DERP load generator, on tailscale.com at the newest pinned client version."""
    pin = _derpload_pin()
    if pin != versions.newest():
        raise BuildError(f"tests/bench/derpload/go.mod pins tailscale.com {pin}, the newest "
                         f"pinned client is {versions.newest()}: in that directory run "
                         f"`go get tailscale.com@{versions.newest()} && go mod tidy`")
    return build_local_module(DERPLOAD_SRC, "derpload", log)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tools", nargs="*", choices=[*EVERYTHING, []], help="default: all")
    args = parser.parse_args(argv)
    return report(lambda: ((name, ensure_derpload() if name == "derpload" else ensure(TOOLS[name]))
                           for name in args.tools or EVERYTHING))


if __name__ == "__main__":
    sys.exit(main())
