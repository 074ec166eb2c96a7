"""The one duration module: Go's time.ParseDuration / Duration.String and Prometheus durations.

Expected values are Go's documented results (time package examples and its error texts).
"""

from datetime import timedelta

import pytest

from pyheadscale.durations import (
    format_go_duration,
    format_go_duration_ns,
    go_duration_ns,
    parse_go_duration,
    parse_prometheus_duration,
)


@pytest.mark.parametrize(("text", "ns"), [
    ("0", 0), ("-0", 0), ("+0", 0), ("1ns", 1), ("1.5us", 1500), ("1µs", 1000),
    ("300ms", 300_000_000), ("-1.5h", -5_400_000_000_000), ("1.s", 10**9), (".5m", 30 * 10**9),
    ("1h15m30.918273645s", 4530918273645), ("2562047h47m16.854775807s", 2**63 - 1),
])
def test_go_duration_ns(text: str, ns: int) -> None:
    assert go_duration_ns(text) == ns


@pytest.mark.parametrize(("text", "message"), [
    ("", 'time: invalid duration ""'),
    ("abc", 'time: invalid duration "abc"'),
    ("--1s", 'time: invalid duration "--1s"'),
    (".s", 'time: invalid duration ".s"'),
    ("1", 'time: missing unit in duration "1"'),
    ("1d", 'time: unknown unit "d" in duration "1d"'),
    ("1 h", 'time: unknown unit " h" in duration "1 h"'),
    ("2562047h47m16.854775808s", 'time: invalid duration "2562047h47m16.854775808s"'),
])
def test_go_duration_errors_carry_gos_message(text: str, message: str) -> None:
    with pytest.raises(ValueError) as e:
        go_duration_ns(text)
    assert str(e.value) == message


def test_timedelta_form_rounds_to_microseconds() -> None:
    assert parse_go_duration("1500ns") == timedelta(microseconds=2)
    assert parse_go_duration("1h30m") == timedelta(minutes=90)


@pytest.mark.parametrize(("ns", "text"), [
    (0, "0s"), (1, "1ns"), (1500, "1.5µs"), (800_000_000, "800ms"), (65 * 10**9, "1m5s"),
    (3600 * 10**9, "1h0m0s"), (-60 * 10**9, "-1m0s"), (1_500_000_001, "1.500000001s"),
])
def test_format_go_duration(ns: int, text: str) -> None:
    assert format_go_duration_ns(ns) == text
    assert go_duration_ns(text) == ns  # Go's String() parses back to the same duration


def test_format_timedelta() -> None:
    assert format_go_duration(timedelta(seconds=1.5)) == "1.5s"


def test_prometheus() -> None:
    assert parse_prometheus_duration("1w2d") == timedelta(days=9)
    with pytest.raises(ValueError):
        parse_prometheus_duration("1.5d")
