"""CLI output like Headscale's: human text or tables, `-o json` (tab-indented),
`json-line` (compact) and `yaml`; errors as `Error: <msg>` or `{"error": ...}` on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import yaml

FORMATS = ("json", "json-line", "yaml")
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"  # Go layout 2006-01-02 15:04:05


def format_output(result: Any, human: str, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(result, indent="\t", ensure_ascii=False)
    if fmt == "json-line":
        return json.dumps(result, separators=(",", ":"), ensure_ascii=False)
    if fmt == "yaml":
        return yaml.safe_dump(result, sort_keys=False, allow_unicode=True).rstrip("\n")
    return human


def print_output(result: Any, human: str, fmt: str) -> None:
    print(format_output(result, human, fmt), flush=True)


def print_error(message: str, fmt: str) -> None:
    if fmt in FORMATS:
        print(format_output({"error": message}, "", fmt), file=sys.stderr, flush=True)
    else:
        print(f"Error: {message}", file=sys.stderr, flush=True)


def _colour(text: str, code: str) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if sys.stdout.isatty() else text


def green(text: str) -> str:
    return _colour(text, "92")


def red(text: str) -> str:
    return _colour(text, "91")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    from pyheadscale.api.shapes import parse_ts

    try:
        return parse_ts(text)
    except ValueError:
        return None


def fmt_time(text: str | None) -> str:
    t = parse_time(text)
    return t.astimezone(UTC).strftime(DATE_FORMAT) if t is not None else ""


def colour_time(text: str | None) -> str:
    """Headscale ColourTime: green while in the future, red once passed."""
    t = parse_time(text)
    if t is None:
        return ""
    s = t.astimezone(UTC).strftime(DATE_FORMAT)
    return green(s) if t > datetime.now(UTC) else red(s)


def render_table(rows: Sequence[Sequence[str]]) -> str:
    """A pterm-style table: header first, columns joined by ' | ', multi-line cells spread
    over several lines."""
    import re

    ansi = re.compile(r"\x1b\[[0-9;]*m")

    def width(s: str) -> int:
        return len(ansi.sub("", s))

    lines_per_row = [[str(c).split("\n") for c in row] for row in rows]
    ncols = max((len(r) for r in rows), default=0)
    widths = [0] * ncols
    for row in lines_per_row:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], *(width(x) for x in cell))
    out = []
    for row in lines_per_row:
        height = max((len(c) for c in row), default=1)
        for h in range(height):
            parts = []
            for i in range(ncols):
                cell = row[i] if i < len(row) else [""]
                text = cell[h] if h < len(cell) else ""
                parts.append(text + " " * (widths[i] - width(text)))
            out.append(" | ".join(parts).rstrip())
    return "\n".join(out)
