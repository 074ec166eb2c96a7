"""The cyclic garbage collector's settings for the serving process.

CPython's defaults suit short scripts: a young-generation collection every 700 container
allocations, and every full collection walks every tracked object, the start-up's modules,
classes and tables included (~250,000 objects before the first node joins). A connect storm
allocates millions of short-lived containers (requests, frames, dicts of changes), almost
all freed by reference counting: measured with `tests/bench/control.py --profile gc` at
1,000 nodes, the collector took ~7 % of the server's CPU, most of it full collections
walking what start-up left behind.

So, once start-up is over: one collection of start-up's garbage, then ``gc.freeze()`` moves
what is left (imports, the loaded tailnet) out of every later collection's walk (CPython
keeps reclaiming it by reference counting; only a cycle among those objects would no longer
be freed, and start-up's objects live as long as the process), and the young generation is
collected every YOUNG_THRESHOLD allocations instead of 700, so a request's temporaries are
freed by reference counting before a collection has to look at them.
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "settle_after_start"]

# Container allocations (net of deallocations) between young-generation collections. The
# older generations keep CPython's ratios (10 young collections per middle one, and a full
# collection only when the long-lived objects grew by a quarter).
YOUNG_THRESHOLD = 10_000


def settle_after_start() -> None:
    """Collect start-up's garbage, freeze what survives, then space the young collections."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
