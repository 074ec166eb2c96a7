"""h2's SETTINGS bookkeeping in a few bytes per setting instead of a deque each.

``h2.settings.Settings`` keeps every setting as a ``collections.deque`` (the current value,
then values waiting for their ACK): ~630 bytes each, whatever it holds, and a server
connection has two such objects of 6-8 settings, ~9 KiB per connection (9 MiB of a
1,000-node server). A value rarely waits: a list does the same job in ~90 bytes.

This leans on h2 internals: ``Settings._settings`` maps each setting to a sequence that
``__getitem__`` indexes, ``__setitem__`` appends to and ``acknowledge`` pops from the left, and
``_validate_setting`` answers 0 for a valid value. tests/unit/test_h2settings.py runs a connection with these against one with h2's own
through SETTINGS changes and ACKs, so an h2 release that stores them otherwise fails there.
"""

from __future__ import annotations

import h2.settings


class _Values(list[int | None]):
    """The deque operations h2's Settings uses, on a list (at most a few values)."""

    __slots__ = ()

    def popleft(self) -> int | None:
        return self.pop(0)


class CompactSettings(h2.settings.Settings):
    def __init__(self, client: bool = True,
                 initial_values: dict[h2.settings.SettingCodes, int] | None = None) -> None:
        super().__init__(client=client, initial_values=initial_values)
        store: dict[h2.settings.SettingCodes | int, _Values] = {
            k: _Values(v) for k, v in self._settings.items()}
        self._settings = store  # type: ignore[assignment]

    def __setitem__(self, key: h2.settings.SettingCodes | int, value: int) -> None:
        # h2 would create a deque for a setting it lacks; an invalid value it refuses first.
        if key not in self._settings and not h2.settings._validate_setting(key, value):
            self._settings[key] = _Values([None])  # type: ignore[assignment]
        super().__setitem__(key, value)
