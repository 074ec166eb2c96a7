"""Run `pyheadscale ... serve` under tracemalloc and keep the heap's make-up at its peak.

    python -m tests.bench.memprofile OUT.txt -c config.yaml serve

A thread looks at the traced heap every few seconds; whenever it is 5 % above the largest
seen so far it takes a snapshot and rewrites OUT.txt with the biggest holders (by line, and
by the call path that allocated them), so the file describes the peak, not the shutdown
(which frees the sessions first). tracemalloc slows the server several times and adds its
own memory: use the holders' shares, not the totals. Used by `control.py --profile
tracemalloc`.
"""

from __future__ import annotations

import sys
import threading
import time
import tracemalloc
from pathlib import Path

FRAMES = 8
INTERVAL_S = 3.0


def _report(snap: tracemalloc.Snapshot, current: int) -> str:
    snap = snap.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    lines = [f"traced heap {current / 2**20:.1f} MiB at {time.strftime('%H:%M:%S')}", "",
             "== by line =="]
    for st in snap.statistics("lineno")[:40]:
        fr = st.traceback[0]
        lines.append(f"{st.size / 2**20:8.1f} MiB {st.count:9d} blocks  {fr.filename}:{fr.lineno}")
    lines += ["", "== by call path (innermost last) =="]
    for st in snap.statistics("traceback")[:15]:
        lines.append(f"{st.size / 2**20:8.1f} MiB {st.count:9d} blocks")
        lines += [f"      {fr.filename}:{fr.lineno}" for fr in st.traceback]
    return "\n".join(lines) + "\n"


def _watch(out: Path) -> None:
    best = 0
    while True:
        time.sleep(INTERVAL_S)
        current, _ = tracemalloc.get_traced_memory()
        if current > best * 1.05:
            best = current
            out.write_text(_report(tracemalloc.take_snapshot(), current))


def main() -> None:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    # The server's modules are imported before tracing starts: traced imports slowed start-up
    # past the benchmark's /health timeout on a busy machine, and what the imports hold is
    # a fixed cost better seen in the idle server's RSS.
    import pyheadscale.app  # noqa: F401

    tracemalloc.start(FRAMES)
    threading.Thread(target=_watch, args=(out,), daemon=True).start()
    from pyheadscale.cli import main as cli_main

    try:
        cli_main(argv)
    except SystemExit:
        pass


if __name__ == "__main__":
    main()
