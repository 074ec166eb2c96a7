"""Durations as Headscale spells them, parsed and formatted in one place.

Go's `time.ParseDuration` ("800ms", "1h30m", "1.5h") is used by the config file and by the
policy's SSH `checkPeriod`; Prometheus' `model.ParseDuration` ("180d", "1w2d") by `node.expiry`
and the CLI's `--expiration`. The Go parser works in whole nanoseconds, as Go does, and its
errors carry Go's messages (`time: invalid duration "x"`); callers that word errors their own
way (the config loader) catch ValueError and say it in their terms.
"""

from __future__ import annotations

import re
from datetime import timedelta
from fractions import Fraction

from pyheadscale.gotext import goquote

_NS_PER = {"ns": 1, "us": 10**3, "µs": 10**3, "μs": 10**3, "ms": 10**6, "s": 10**9,
           "m": 60 * 10**9, "h": 3600 * 10**9}
_NUMBER = re.compile(r"([0-9]*)(?:\.([0-9]*))?")
_UNIT = re.compile(r"[^0-9.]*")
_MAX_NS = 2**63 - 1  # Go's Duration is an int64 of nanoseconds
_PROM = re.compile(r"(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?")
_PROM_MS = (365 * 86400_000, 7 * 86400_000, 86400_000, 3600_000, 60_000, 1000, 1)


def go_duration_ns(text: str) -> int:
    """Go's time.ParseDuration in nanoseconds; ValueError with Go's message otherwise."""
    invalid = ValueError(f"time: invalid duration {goquote(text)}")
    s, sign = text, 1
    if s[:1] in ("-", "+"):
        sign, s = (-1 if s[0] == "-" else 1), s[1:]
    if s == "0":
        return 0
    if not s:
        raise invalid
    total = Fraction(0)
    while s:
        num = _NUMBER.match(s)
        assert num is not None  # the pattern matches the empty string
        whole, frac = num.group(1), num.group(2)
        if not whole and not frac:
            raise invalid  # no digits on either side of the point (or no number at all)
        s = s[num.end():]
        unit = _UNIT.match(s)
        assert unit is not None
        if not unit.group(0):
            raise ValueError(f"time: missing unit in duration {goquote(text)}")
        name, s = unit.group(0), s[unit.end():]
        if name not in _NS_PER:
            raise ValueError(f"time: unknown unit {goquote(name)} in duration {goquote(text)}")
        total += Fraction(f"{whole or '0'}.{frac or '0'}") * _NS_PER[name]
        if total > _MAX_NS + 1:
            raise invalid
    ns = int(total)  # Go drops the fraction of a nanosecond
    if ns > _MAX_NS + (sign < 0):
        raise invalid
    return sign * ns


def parse_go_duration(text: str) -> timedelta:
    """go_duration_ns as a timedelta (to the nearest microsecond, timedelta's resolution)."""
    return timedelta(microseconds=round(Fraction(go_duration_ns(text), 1000)))


def format_go_duration_ns(ns: int) -> str:
    """Go's Duration.String() ("1m5s", "800ms", "1.5µs", "0s")."""
    if ns == 0:
        return "0s"
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    if ns < 10**9:
        for unit, size in (("ms", 10**6), ("µs", 10**3), ("ns", 1)):
            if ns >= size:
                return f"{sign}{_trim(Fraction(ns, size))}{unit}"
    h, rest = divmod(ns, 3600 * 10**9)
    m, rest = divmod(rest, 60 * 10**9)
    out = f"{h}h" if h else ""
    out += f"{m}m" if h or m else ""
    return f"{sign}{out}{_trim(Fraction(rest, 10**9))}s"


def format_go_duration(td: timedelta) -> str:
    """format_go_duration_ns for a timedelta."""
    return format_go_duration_ns(td // timedelta(microseconds=1) * 1000)


def parse_prometheus_duration(text: str) -> timedelta:
    """Prometheus model.ParseDuration ("180d", "1w2d", "0"); ValueError otherwise."""
    text = text.strip()
    if text in ("", "0"):
        return timedelta(0)
    m = _PROM.fullmatch(text)
    if m is None or not any(m.groups()):
        raise ValueError(f"not a valid duration: {goquote(text)} (whole numbers with units "
                         "y, w, d, h, m, s, ms, e.g. \"180d\"; \"0\" means no expiry)")
    ms = sum(int(g) * unit for g, unit in zip(m.groups(), _PROM_MS, strict=True) if g)
    return timedelta(milliseconds=ms)


def format_prometheus_duration(td: timedelta) -> str:
    """The inverse of parse_prometheus_duration ("0", "180d", "1d12h")."""
    ms = td // timedelta(milliseconds=1)
    if ms <= 0:
        return "0"
    out = ""
    for unit, size in zip(("d", "h", "m", "s", "ms"), _PROM_MS[2:], strict=True):
        count, ms = divmod(ms, size)
        out += f"{count}{unit}" if count else ""
    return out


def _trim(x: Fraction) -> str:
    return f"{float(x):.9f}".rstrip("0").rstrip(".")
