"""Build (or reuse) our tailscale-rs node (tests/integration/tsrs: a Rust program on the
`tailscale` crate from crates.io; its Cargo.lock pins every crate) with `cargo build --release
--locked`. `python -m tests.integration.tsrs_build`.

The binary lands in <cache>/tsrs-axum/<hash of the sources>/ (an edit rebuilds it, nothing
else does); cargo's own build directory, <cache>/tsrs-target, keeps the compiled crates, so a
rebuild after an edit takes a few minutes (the last crate) where the first takes half an hour
on a busy two-core machine.

The crates need Rust >= 1.92: the machine's rustup toolchain (~/.cargo/bin, often missing
from a non-login PATH) or Debian's cargo-web, which .ci/run installs when neither is there.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from tests.buildutil import BuildError, file_lock, report
from tests.integration import versions

SRC = Path(__file__).resolve().parent / "tsrs"
NAME = "tsrs-axum"
BUILD_TIMEOUT = 60 * 60  # a cold build took 29 minutes on two busy cores
MIN_RUST = (1, 92)  # the rust-version of the tailscale crates


def binary_path() -> Path:
    h = hashlib.sha256()
    # What cargo builds from (a `target/` left by a hand-run `cargo build` is not).
    sources = [SRC / "Cargo.toml", SRC / "Cargo.lock", *(SRC / "src").rglob("*.rs")]
    for f in sorted(sources):
        h.update(str(f.relative_to(SRC)).encode() + b"\0" + f.read_bytes())
    return versions.cache_dir() / NAME / h.hexdigest()[:16] / NAME


def _cargo() -> str:
    found = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
    need = f"{NAME} needs Rust >= {MIN_RUST[0]}.{MIN_RUST[1]} (rustup, or Debian's cargo-web)"
    if not os.access(found, os.X_OK):
        raise BuildError(f"Rust is not installed (no `cargo`); {need}")
    said = subprocess.run([found, "--version"], capture_output=True, text=True,
                          check=False).stdout
    m = re.match(r"cargo (\d+)\.(\d+)", said)
    if m is None or (int(m[1]), int(m[2])) < MIN_RUST:
        raise BuildError(f"{found} is {said.strip() or 'not cargo'}; {need}")
    return found


def ensure(log: TextIO = sys.stderr) -> Path:
    out = binary_path()
    if out.is_file() and os.access(out, os.X_OK):
        return out
    cargo = _cargo()
    target = versions.cache_dir() / "tsrs-target"
    with file_lock(out.parent.parent):
        if out.is_file():
            return out
        print(f"cargo build {NAME} into {out.parent} (many minutes the first time)", file=log,
              flush=True)
        env = dict(os.environ, CARGO_TARGET_DIR=str(target),
                   PATH=f"{Path(cargo).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        try:
            r = subprocess.run([cargo, "build", "--release", "--locked"], cwd=SRC, env=env,
                               capture_output=True, text=True, check=False,
                               timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise BuildError(f"building {NAME} took over {BUILD_TIMEOUT}s") from exc
        if r.returncode != 0:
            raise BuildError(f"building {NAME} failed:\n{r.stderr[-3000:]}")
        built = target / "release" / NAME
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{NAME}-", dir=out.parent))
        try:  # copy, then rename: a reader never sees half a binary
            shutil.copy2(built, tmp / NAME)
            os.replace(tmp / NAME, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> int:
    return report(lambda: iter([(NAME, ensure())]))


if __name__ == "__main__":
    sys.exit(main())
