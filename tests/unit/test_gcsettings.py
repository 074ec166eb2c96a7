"""The serving process's collector settings: start-up's objects frozen out of later
collections, young collections spaced out (and put back for the other tests)."""

from __future__ import annotations

import gc

from pyheadscale.gcsettings import YOUNG_THRESHOLD, settle_after_start


def test_settle_after_start_freezes_and_spaces_young_collections() -> None:
    before = gc.get_threshold()
    kept = object()
    holder = [kept]  # a tracked container alive across the call
    try:
        settle_after_start()
        assert gc.get_threshold() == (YOUNG_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > 0
        assert not any(o is holder for o in gc.get_objects())  # frozen: out of every walk
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
