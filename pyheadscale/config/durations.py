"""Durations as Headscale's config spells them: Go's time.ParseDuration and Prometheus' model
durations (node.expiry), parsed and formatted back so a dumped config loads again."""

from __future__ import annotations

import re
from datetime import timedelta
from fractions import Fraction
from typing import Any

from pyheadscale.config.errors import quoted

_NS = {"ns": 1, "us": 10**3, "µs": 10**3, "μs": 10**3, "ms": 10**6, "s": 10**9,
       "m": 60 * 10**9, "h": 3600 * 10**9}
_GO_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_PROM = re.compile(r"(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?")
_PROM_MS = (365 * 86400_000, 7 * 86400_000, 86400_000, 3600_000, 60_000, 1000, 1)


def parse_go_duration(value: Any) -> timedelta:
    """Go's time.ParseDuration ("800ms", "1h30m", "1.5h", "0"); as viper, a YAML 0 is 0.

    A bare non-zero number is refused: viper would read it as nanoseconds, always a mistake.
    """
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"must be a duration such as \"30s\" or \"1h30m\", got {quoted(value)}")
    text = str(value).strip()
    if text in ("0", "+0", "-0"):
        return timedelta(0)
    body = text.lstrip("+-")
    sign = -1 if text.startswith("-") else 1
    total, pos = Fraction(0), 0
    for m in _GO_PART.finditer(body):
        if m.start() != pos:
            break
        total += Fraction(m.group(1)) * _NS[m.group(2)]
        pos = m.end()
    if not body or pos != len(body) or len(text) - len(body) > 1:
        hint = " (missing unit: ns, us, ms, s, m or h)" if body.replace(".", "").isdigit() else ""
        raise ValueError(f"not a valid duration: {quoted(text)}{hint}")
    return timedelta(microseconds=sign * round(total / 1000))


def parse_prometheus_duration(value: Any) -> timedelta:
    """Prometheus model.ParseDuration as Headscale uses for node.expiry ("180d", "1w2d", "0")."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"must be a duration such as \"180d\", got {quoted(value)}")
    text = str(value).strip()
    if text in ("", "0"):
        return timedelta(0)
    m = _PROM.fullmatch(text)
    if m is None or not any(m.groups()):
        raise ValueError(f"not a valid duration: {quoted(text)} (whole numbers with units "
                         "y, w, d, h, m, s, ms, e.g. \"180d\"; \"0\" means no expiry)")
    ms = sum(int(g) * unit for g, unit in zip(m.groups(), _PROM_MS, strict=True) if g)
    return timedelta(milliseconds=ms)


def format_go_duration(td: timedelta) -> str:
    """Go's Duration.String(), for messages that quote Headscale's ("1m5s", "800ms", "0s")."""
    us = td // timedelta(microseconds=1)
    if us == 0:
        return "0s"
    sign, us = ("-", -us) if us < 0 else ("", us)
    if us < 1000:
        return f"{sign}{us}µs"
    if us < 1_000_000:
        return f"{sign}{_trim(us / 1000)}ms"
    h, rest = divmod(us, 3_600_000_000)
    m, rest = divmod(rest, 60_000_000)
    out = f"{h}h" if h else ""
    out += f"{m}m" if h or m else ""
    return f"{sign}{out}{_trim(rest / 1_000_000)}s"


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


def _trim(x: float) -> str:
    return f"{x:.6f}".rstrip("0").rstrip(".")

