"""`make fuzz`: python -m tests.fuzz --count 1000000 --seed 1

Drives `count` inputs in total through the targets below (each gets its weight's share)
against one real server in this process, then checks: no failure (see harness.py), the
database and the in-memory tailnet agree, and between the end of the warm-up share and the
end of the run RSS grew by at most --max-rss-growth MiB, open fds, asyncio tasks, Noise and
DERP connections did not grow. Prints a table and one JSON line; exit status 1 on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from tests.fuzz import harness, t_api, t_control, t_derp, t_h2, t_noise, t_policy

TARGETS: dict[str, tuple[float, harness.Target]] = {
    "noise": (20, t_noise.run),
    "h2": (15, t_h2.run),
    "control": (15, t_control.run),
    "derp": (25, t_derp.run),
    "stun": (15, t_derp.run_stun),
    "policy": (5, t_policy.run),
    "api": (5, t_api.run),
}


def problems(rep: harness.Report, max_rss_growth: float) -> list[str]:
    out = [f"{f.target}#{f.index}: {f.detail}" for f in rep.failures]
    out += [f"db/memory: {d}" for d in rep.db_differences]
    w, e = rep.warm, rep.end
    if e.rss_mib - w.rss_mib > max_rss_growth:
        out.append(f"RSS grew {e.rss_mib - w.rss_mib:.1f} MiB after warm-up "
                   f"(limit {max_rss_growth})")
    for name in ("fds", "tasks", "noise_connections", "derp_connections"):
        if getattr(e, name) > getattr(w, name):
            out.append(f"{name} grew: {getattr(w, name)} -> {getattr(e, name)}")
    return out


async def fuzz(count: int, seed: int, targets: list[str] | None = None,
               max_rss_growth: float = 32.0, tmp: Path | None = None,
               verbose: bool = False) -> tuple[harness.Report, list[str]]:
    chosen = {k: v for k, v in TARGETS.items() if not targets or k in targets}
    with tempfile.TemporaryDirectory(prefix="pyhs-fuzz-") as d:
        rep = await harness.run(chosen, count, seed, tmp or Path(d), verbose=verbose)
    return rep, problems(rep, max_rss_growth)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--targets", nargs="*", choices=list(TARGETS))
    ap.add_argument("--max-rss-growth", type=float, default=32.0, help="MiB")
    ap.add_argument("--verbose", action="store_true", help="a snapshot after every target")
    args = ap.parse_args(argv)
    rep, bad = asyncio.run(fuzz(args.count, args.seed, args.targets, args.max_rss_growth,
                                verbose=args.verbose))
    print(f"{'target':<10}{'inputs':>10}{'seconds':>10}{'inputs/s':>10}")
    for name, (n, secs) in rep.per_target.items():
        print(f"{name:<10}{n:>10}{secs:>10.1f}{n / max(secs, 1e-9):>10.0f}")
    print(f"{'total':<10}{rep.inputs:>10}{rep.seconds:>10.1f}")
    print(f"after warm-up: {rep.warm}\nat the end:    {rep.end}")
    for line in bad:
        print("FAIL", line)
    print(json.dumps({"count": rep.count, "seed": rep.seed, "inputs": rep.inputs,
                      "seconds": round(rep.seconds, 1), "warm": asdict(rep.warm),
                      "end": asdict(rep.end), "failures": len(bad),
                      "per_target": {k: v[0] for k, v in rep.per_target.items()}}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
