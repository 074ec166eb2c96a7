"""Headplane's rule for finding the server it sends SIGHUP to (its native integration), as
the tests apply it: every process whose /proc/<pid>/comm is `headscale` and whose cmdline,
split on NUL bytes with empty words dropped, has `serve` as its second word."""

from __future__ import annotations

from pathlib import Path


def matches(pid: int, proc: Path = Path("/proc")) -> bool:
    try:
        comm = (proc / str(pid) / "comm").read_text()
        cmdline = (proc / str(pid) / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False  # gone meanwhile, or not ours to read
    args = [a for a in cmdline.split("\0") if a]
    return comm.strip() == "headscale" and len(args) > 1 and args[1] == "serve"


def headscale_serve_pids(proc: Path = Path("/proc")) -> list[int]:
    return sorted(int(p.name) for p in proc.iterdir()
                  if p.name.isdigit() and matches(int(p.name), proc))
