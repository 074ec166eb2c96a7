"""The one exception configuration problems raise, and the helpers that word its message."""

from __future__ import annotations

import json
from typing import Any


class ConfigError(Exception):
    """A configuration problem; str() is the one-line message the CLI prints before exit 1."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.key = key

    def __str__(self) -> str:
        return self.message


def key_error(key: str, problem: str) -> ConfigError:
    """`config: <key>: <problem>`, the one-line shape every configuration error has."""
    return ConfigError(f"config: {key}: {problem}", key)


def quoted(value: Any) -> str:
    """Quote a value Go-style for messages ("x" for strings)."""
    return json.dumps(value, default=str) if isinstance(value, str) else str(value)
