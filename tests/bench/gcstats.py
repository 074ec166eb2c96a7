"""Run `pyheadscale ... serve` and record what the cyclic GC cost it.

    python -m tests.bench.gcstats OUT.json -c config.yaml serve

Per generation: collections, objects collected and the thread CPU seconds spent collecting
(gc.callbacks; CPU, not wall, for the reason cpuprofile.py gives), plus the objects the GC
tracked at exit. Written as JSON when the server exits (SIGTERM/SIGINT stop it cleanly).
Used by `control.py --profile gc`.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from typing import Any


class GCClock:
    def __init__(self) -> None:
        self.cpu = [0.0, 0.0, 0.0]
        self.runs = [0, 0, 0]
        self.collected = [0, 0, 0]
        self.longest = [0.0, 0.0, 0.0]
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.thread_time()
            return
        g = info["generation"]
        spent = time.thread_time() - self._t0
        self.cpu[g] += spent
        self.longest[g] = max(self.longest[g], spent)
        self.runs[g] += 1
        self.collected[g] += info["collected"]

    def report(self) -> dict[str, Any]:
        return {"gc_cpu_s": [round(c, 3) for c in self.cpu], "gc_runs": self.runs,
                "gc_longest_s": [round(c, 4) for c in self.longest],
                "gc_collected": self.collected, "gc_tracked_at_exit": len(gc.get_objects()),
                "process_cpu_s": round(time.process_time(), 2)}


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    from pyheadscale.cli import main as cli_main

    clock = GCClock()
    gc.callbacks.append(clock)
    try:
        cli_main(argv)
    except SystemExit:
        pass
    finally:
        gc.callbacks.remove(clock)
        with open(out, "w") as f:
            json.dump(clock.report(), f)


if __name__ == "__main__":
    main()
