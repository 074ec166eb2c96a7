"""h2's SETTINGS bookkeeping in a few bytes per setting instead of a deque each.

``h2.settings.Settings`` keeps every setting as a ``collections.deque`` (the current value,
then values waiting for their ACK): ~630 bytes each, whatever it holds, and a server
connection has two such objects of 6-8 settings, ~9 KiB per connection (9 MiB of a
1,000-node server). A value rarely waits: a list does the same job in ~90 bytes.

This leans on h2 internals: ``Settings._settings`` maps each setting to a sequence that
``__getitem__`` indexes, ``__setitem__`` appends to and ``acknowledge`` pops from the left, and
``_validate_setting`` answers 0 for a valid value. ``SETTINGS_CLASS`` is CompactSettings only
when the installed h2 still looks and behaves so (checked once at import), else h2's own
class: an h2 release that stores them otherwise costs memory, never a connection.
tests/unit/test_h2settings.py runs a connection with these against one with h2's own through
SETTINGS changes and ACKs.
"""

from __future__ import annotations

import collections
import logging

import h2.settings

log = logging.getLogger("pyheadscale.control")


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


def _h2_fits(base: type[h2.settings.Settings]) -> bool:
    """True when `base` keeps its settings as CompactSettings expects, and a CompactSettings
    over it reads, changes and acknowledges a setting as `base` does."""
    try:
        store = getattr(base(client=False), "_settings", None)
        if not isinstance(store, dict) or not store or not all(
                isinstance(v, collections.deque) for v in store.values()):
            return False
        if not callable(getattr(h2.settings, "_validate_setting", None)):
            return False
        ours: h2.settings.Settings = type("_Probe", (CompactSettings, base), {})(client=False)
        code = h2.settings.SettingCodes.INITIAL_WINDOW_SIZE
        before = ours[code]
        ours[code] = 1000
        ours[0x99] = 7  # a setting h2 has no name for
        changed = ours.acknowledge()
        return bool(ours[code] == 1000 and ours[0x99] == 7
                    and changed[code].original_value == before
                    and changed[code].new_value == 1000)
    except Exception:  # noqa: BLE001 - any surprise means h2 changed: use its own class
        return False


def settings_class(base: type[h2.settings.Settings] = h2.settings.Settings,
                   ) -> type[h2.settings.Settings]:
    """CompactSettings when the installed h2 fits it, else `base` itself."""
    if _h2_fits(base):
        return CompactSettings
    log.debug("h2 %s stores SETTINGS differently than expected; using its own Settings "
              "(~9 KiB per connection)", getattr(h2, "__version__", "?"))
    return base


SETTINGS_CLASS = settings_class()
