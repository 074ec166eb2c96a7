"""Run `pyheadscale ... serve` under cProfile timed by the event loop thread's CPU time.

    python -m tests.bench.cpuprofile OUT.prof -c config.yaml serve

On a machine other work keeps busy, wall-time profiles charge the time a process waits for
a CPU (or sits in epoll) to whatever call it was in; CPU time does not. Thread time, not
process time: the database thread's work would otherwise be charged to whatever the event
loop was doing meanwhile (control.py reports the two threads' CPU apart). The profile is
written when the server exits (SIGTERM/SIGINT stop it cleanly). Used by `control.py
--profile cprofile`.
"""

from __future__ import annotations

import cProfile
import sys
import time


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    from pyheadscale.cli import main as cli_main

    prof = cProfile.Profile(time.thread_time)  # the event loop thread (the DB thread is apart)
    try:
        prof.runcall(cli_main, argv)
    except SystemExit:
        pass
    finally:
        prof.dump_stats(out)


if __name__ == "__main__":
    main()
