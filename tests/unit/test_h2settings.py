"""CompactSettings against h2's own Settings: two server connections, one with each, meet the
same client through SETTINGS frames, changes and ACKs; every byte and event must match."""

from __future__ import annotations

import collections
import sys
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest

from pyheadscale.control.h2settings import CompactSettings

S = h2.settings.SettingCodes
UNKNOWN_SETTING = 0x99  # peers may send settings h2 has no name for (RFC 9113 6.5.2)


def _server(compact: bool) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    cls = CompactSettings if compact else h2.settings.Settings
    conn.local_settings = cls(client=False, initial_values={S.MAX_CONCURRENT_STREAMS: 100})
    conn.remote_settings = cls(client=True)
    conn.initiate_connection()
    return conn


def _summary(events: list[Any]) -> list[Any]:
    out: list[Any] = []
    for e in events:
        changed = getattr(e, "changed_settings", None)
        if changed is not None:
            out.append((type(e).__name__, sorted(
                (int(k), v.original_value, v.new_value) for k, v in changed.items())))
        else:
            out.append(type(e).__name__)
    return out


def _run(compact: bool) -> list[Any]:
    server = _server(compact)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.update_settings({S.INITIAL_WINDOW_SIZE: 1 << 20, S.MAX_HEADER_LIST_SIZE: 10_000,
                            UNKNOWN_SETTING: 7})
    trace: list[Any] = [server.data_to_send()]
    trace.append(_summary(server.receive_data(client.data_to_send())))
    client.receive_data(server.data_to_send())  # the server's SETTINGS and ACKs
    server.update_settings({S.INITIAL_WINDOW_SIZE: 200_000, S.MAX_FRAME_SIZE: 32_768})
    server.update_settings({S.INITIAL_WINDOW_SIZE: 300_000})  # two values wait for ACKs
    trace.append(dict(server.local_settings))
    client.receive_data(server.data_to_send())
    trace.append(_summary(server.receive_data(client.data_to_send())))
    trace += [dict(server.local_settings), dict(server.remote_settings),
              server.max_outbound_frame_size, server.max_inbound_frame_size,
              server.local_flow_control_window(1) if 1 in server.streams else None,
              server.data_to_send()]
    with pytest.raises(KeyError):  # created when received, never given a value: KeyError
        server.local_settings[UNKNOWN_SETTING]
    return trace


def test_compact_settings_behave_as_h2s_own() -> None:
    assert _run(compact=True) == _run(compact=False)


def test_compact_settings_hold_no_deque_and_are_small() -> None:
    plain, compact = _server(False), _server(True)
    for conn in (plain, compact):
        conn.remote_settings[UNKNOWN_SETTING] = 1  # a setting h2 has no default for
    stores = [conn.remote_settings._settings for conn in (plain, compact)]
    assert not any(isinstance(v, collections.deque) for v in stores[1].values())

    def size(store: dict[Any, Any]) -> int:
        return sum(sys.getsizeof(v) for v in store.values())

    assert size(stores[1]) * 4 < size(stores[0])


def test_invalid_value_is_refused_and_not_recorded() -> None:
    s = CompactSettings(client=False)
    with pytest.raises(h2.exceptions.InvalidSettingsValueError):
        s[S.MAX_FRAME_SIZE] = 1  # below 16,384
    with pytest.raises(h2.exceptions.InvalidSettingsValueError):
        s[S.MAX_HEADER_LIST_SIZE] = -1
    assert S.MAX_HEADER_LIST_SIZE not in s._settings
    assert s[S.MAX_FRAME_SIZE] == 16_384


class _TupleStore(h2.settings.Settings):
    """An h2 that keeps each setting as something other than a deque."""

    def __init__(self, client: bool = True,
                 initial_values: dict[h2.settings.SettingCodes, int] | None = None) -> None:
        super().__init__(client=client, initial_values=initial_values)
        self._settings = {k: tuple(v) for k, v in self._settings.items()}  # type: ignore[misc]


class _ElsewhereStore(h2.settings.Settings):
    """An h2 that keeps its settings under another name."""

    def __init__(self, client: bool = True,
                 initial_values: dict[h2.settings.SettingCodes, int] | None = None) -> None:
        super().__init__(client=client, initial_values=initial_values)
        self._values = self.__dict__.pop("_settings")


def test_installed_h2_gets_the_compact_settings() -> None:
    from pyheadscale.control.h2settings import SETTINGS_CLASS, settings_class

    assert settings_class() is CompactSettings
    assert SETTINGS_CLASS is CompactSettings


@pytest.mark.parametrize("other", [_TupleStore, _ElsewhereStore])
def test_h2_storing_settings_otherwise_falls_back_to_its_own(
        other: type[h2.settings.Settings], caplog: pytest.LogCaptureFixture) -> None:
    from pyheadscale.control.h2settings import settings_class

    with caplog.at_level("DEBUG", logger="pyheadscale.control"):
        assert settings_class(other) is other
    assert "using its own Settings" in caplog.text
