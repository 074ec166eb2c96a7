"""Build (or reuse) the pinned official Tailscale clients: `python -m tests.integration.build_clients`.

Binaries land in <cache>/tailscale/<version>/ (see versions.py). Each build goes to a temporary
directory first and is moved into place only when every requested binary built, so an
interrupted or failed build never leaves a half-populated cache.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.buildutil import BuildError, file_lock, report
from tests.integration import versions

CORE_TOOLS = ("tailscale", "tailscaled")
EXTRA_TOOLS = ("derper", "derpprobe")


def _version_probe(tool: str) -> list[str]:
    # tailscale has a `version` subcommand; the daemons take a --version flag.
    return ["version"] if tool == "tailscale" else ["--version"]


def binary_works(path: Path, tool: str) -> bool:
    if not path.is_file() or not os.access(path, os.X_OK):
        return False
    if tool == "derpprobe":
        # derpprobe has no version flag; existence plus the exec bit is the best cheap check.
        return True
    try:
        res = subprocess.run(
            [str(path), *_version_probe(tool)], capture_output=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


# tailscaled with DERP over WebSocket compiled in (Tailscale's `ts_debug_websockets` build
# tag; the TS_DEBUG_DERP_WS_CLIENT envknob then turns it on). Built next to the plain binaries.
WS_DERP_TAGS = ("ts_debug_websockets",)


def variant_dir(version: str, tags: Sequence[str] = ()) -> Path:
    """Where `version`'s binaries built with `tags` live (the plain ones without tags)."""
    vdir = versions.version_dir(version)
    return vdir / ("tags-" + "+".join(tags)) if tags else vdir


def have(version: str, tools: Sequence[str] = CORE_TOOLS, *, tags: Sequence[str] = ()) -> bool:
    vdir = variant_dir(version, tags)
    return all(binary_works(vdir / t, t) for t in tools)


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        raise BuildError(
            "Go is not installed (no `go` on PATH); it is needed to build the official "
            "Tailscale clients. Install Go >= 1.24 and re-run `make clients`."
        )
    return go


def _go_install(go: str, gobin: Path, version: str, tools: Sequence[str], log,
                tags: Sequence[str] = ()) -> None:
    pkgs = [f"tailscale.com/cmd/{t}@{version}" for t in tools]
    env = dict(os.environ)
    env["GOBIN"] = str(gobin)
    flags = " -trimpath" + (f" -tags={','.join(tags)}" if tags else "")
    env["GOFLAGS"] = (env.get("GOFLAGS", "") + flags).strip()
    env["CGO_ENABLED"] = env.get("CGO_ENABLED", "0")
    attempts = [env.get("GOTOOLCHAIN", "local"), versions.FALLBACK_TOOLCHAIN]
    last = ""
    for toolchain in attempts:
        env["GOTOOLCHAIN"] = toolchain
        print(f"  go install {' '.join(pkgs)} (GOTOOLCHAIN={toolchain})", file=log, flush=True)
        res = subprocess.run(
            [go, "install", *pkgs], env=env, capture_output=True, text=True, check=False
        )
        if res.returncode == 0:
            return
        last = (res.stderr or res.stdout).strip()
        # Only a "needs a newer Go" failure is worth a retry with a newer toolchain.
        if "requires go >=" not in last and "toolchain" not in last:
            break
    raise BuildError(f"building {', '.join(pkgs)} failed:\n{last}")


def ensure(version: str, tools: Sequence[str] = CORE_TOOLS, log=sys.stderr, *,
           tags: Sequence[str] = ()) -> Path:
    """Make sure `tools` for `version` (built with Go build `tags`) exist and run; build the
    missing ones. Returns the dir."""
    vdir = variant_dir(version, tags)
    if have(version, tools, tags=tags):
        return vdir
    # Parallel pytest workers may all ask for the clients; only one may build at a time.
    with file_lock(versions.cache_dir() / "tailscale"):
        if have(version, tools, tags=tags):  # another process built it while we waited
            return vdir
        missing = [t for t in tools if not binary_works(vdir / t, t)]
        go = _go()
        print(f"building {', '.join(missing)} {version} into {vdir}", file=log, flush=True)
        vdir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=vdir.parent))
        try:
            _go_install(go, tmp, version, missing, log, tags)
            for t in missing:
                if not binary_works(tmp / t, t):
                    raise BuildError(f"{t} {version} built but does not run")
            vdir.mkdir(parents=True, exist_ok=True)
            for t in missing:
                os.replace(tmp / t, vdir / t)  # same filesystem: atomic per binary
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not have(version, tools, tags=tags):
        raise BuildError(f"{version}: binaries still missing after build in {vdir}")
    return vdir


def ensure_all(log=sys.stderr) -> dict[str, Path]:
    return {v: ensure(v, CORE_TOOLS, log) for v in versions.PINNED}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--extra",
        default="",
        help="comma-separated extra tools built at the newest pinned version (derper,derpprobe)",
    )
    parser.add_argument(
        "--ws-derp", action="store_true",
        help="also build tailscaled with DERP over WebSocket compiled in, for every version",
    )
    parser.add_argument(
        "--version", action="append", dest="only", help="only this version (repeatable)"
    )
    args = parser.parse_args(argv)
    extras = [e for e in (x.strip() for x in args.extra.split(",")) if e]
    bad = [e for e in extras if e not in EXTRA_TOOLS]
    if bad:
        parser.error(f"unknown --extra tool(s): {', '.join(bad)} (known: {', '.join(EXTRA_TOOLS)})")
    wanted = args.only or versions.PINNED
    unknown = [v for v in wanted if v not in versions.PINNED]
    if unknown:
        parser.error(f"not a pinned version: {', '.join(unknown)}")
    def steps() -> Iterator[tuple[str, Path]]:
        for v in wanted:
            yield v, ensure(v)
        if extras:
            yield f"{versions.newest()} {','.join(extras)}", ensure(versions.newest(), extras)
        if args.ws_derp:
            for v in wanted:
                yield f"{v} tailscaled +{','.join(WS_DERP_TAGS)}", ensure(
                    v, ["tailscaled"], tags=WS_DERP_TAGS)

    return report(steps)


if __name__ == "__main__":
    sys.exit(main())
