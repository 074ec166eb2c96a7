"""HuJSON ("human JSON") parser: JSON plus // and /* */ comments and trailing commas.

Sans-IO: takes text (str or UTF-8 bytes) and returns plain Python values, exactly what
json.loads would return for the same document with comments and trailing commas removed.
Every syntax problem raises HuJSONError carrying a 1-based line and column.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pyheadscale.policy.errors import PolicyError

__all__ = ["HuJSONError", "loads", "standardize", "value_positions"]

# Deep nesting is legal JSON, but a recursive parser must bound it to stay crash-free.
MAX_DEPTH = 400

_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_WS = " \t\r\n"
_LITERALS = (("true", True), ("false", False), ("null", None))


class HuJSONError(PolicyError):
    """A HuJSON syntax error at a given place in the input."""

    def __init__(self, message: str, line: int, column: int, offset: int) -> None:
        self.line = line
        self.column = column
        self.offset = offset
        super().__init__(f"parsing HuJSON: line {line}, column {column}: {message}")


class _Parser:
    def __init__(self, text: str, reject_duplicates: bool) -> None:
        self.s = text
        self.i = 0
        self.n = len(text)
        self.reject_duplicates = reject_duplicates

    def error(self, message: str, at: int | None = None) -> HuJSONError:
        pos = self.i if at is None else at
        pos = min(pos, self.n)
        line = self.s.count("\n", 0, pos) + 1
        column = pos - (self.s.rfind("\n", 0, pos) + 1) + 1
        return HuJSONError(message, line, column, pos)

    def skip(self) -> None:
        """Skip whitespace and comments."""
        s, n = self.s, self.n
        while self.i < n:
            c = s[self.i]
            if c in _WS:
                self.i += 1
            elif c == "/" and self.i + 1 < n and s[self.i + 1] == "/":
                end = s.find("\n", self.i + 2)
                self.i = n if end < 0 else end + 1
            elif c == "/" and self.i + 1 < n and s[self.i + 1] == "*":
                end = s.find("*/", self.i + 2)
                if end < 0:
                    raise self.error("unterminated block comment")
                self.i = end + 2
            elif c == "/":
                raise self.error("invalid character '/'")
            else:
                return

    def value(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise self.error("nesting too deep")
        self.skip()
        if self.i >= self.n:
            raise self.error("unexpected end of input")
        c = self.s[self.i]
        if c == "{":
            return self.obj(depth)
        if c == "[":
            return self.arr(depth)
        if c == '"':
            return self.string()
        if c == "-" or c.isdigit():
            m = _NUMBER.match(self.s, self.i)
            if not m:
                raise self.error("invalid number")
            self.i = m.end()
            return json.loads(m.group(0))
        for word, val in _LITERALS:
            if self.s.startswith(word, self.i):
                self.i += len(word)
                return val
        raise self.error(f"invalid character {c!r} looking for beginning of value")

    def string(self) -> str:
        start = self.i
        s, n = self.s, self.n
        j = start + 1
        while True:
            if j >= n:
                raise self.error("unterminated string", start)
            c = s[j]
            if c == '"':
                break
            if c == "\\":
                j += 2
                continue
            if c < " ":
                raise self.error("invalid control character in string", j)
            j += 1
        token = s[start : j + 1]
        try:
            out = json.loads(token)
        except (ValueError, RecursionError) as e:
            raise self.error(f"invalid string: {e}", start) from None
        self.i = j + 1
        return str(out)

    def peek(self, where: str) -> str:
        """The next significant character inside an object or array (`where`); EOF is an error."""
        self.skip()
        if self.i >= self.n:
            raise self.error(f"unexpected end of input in {where}")
        return self.s[self.i]

    def obj(self, depth: int) -> dict[str, Any]:
        self.i += 1
        out: dict[str, Any] = {}
        while True:
            if self.peek("object") == "}":
                self.i += 1
                return out
            if self.s[self.i] != '"':
                raise self.error("expected string for object member name")
            key_at = self.i
            key = self.string()
            if self.reject_duplicates and key in out:
                raise self.error(f"duplicate object member name {json.dumps(key)}", key_at)
            self.skip()
            if self.i >= self.n or self.s[self.i] != ":":
                raise self.error("expected ':' after object member name")
            self.i += 1
            out[key] = self.value(depth + 1)
            c = self.peek("object")
            if c == ",":
                self.i += 1
            elif c != "}":
                raise self.error("expected ',' or '}' after object member")

    def arr(self, depth: int) -> list[Any]:
        self.i += 1
        out: list[Any] = []
        while True:
            if self.peek("array") == "]":
                self.i += 1
                return out
            out.append(self.value(depth + 1))
            c = self.peek("array")
            if c == ",":
                self.i += 1
            elif c != "]":
                raise self.error("expected ',' or ']' after array element")


def loads(data: str | bytes, *, reject_duplicates: bool = True) -> Any:
    """Parse one HuJSON document. Duplicate member names are refused by default, as the
    Go JSON v2 decoder Headscale uses does."""
    if isinstance(data, bytes | bytearray):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise HuJSONError(f"invalid UTF-8: {e.reason}", 1, 1, e.start) from None
    else:
        text = data
    p = _Parser(text, reject_duplicates)
    value = p.value(0)
    p.skip()
    if p.i != p.n:
        raise p.error("invalid character after top-level value")
    return value


def standardize(data: str | bytes) -> str:
    """Return the document as standard (minified) JSON text."""
    return json.dumps(loads(data), separators=(",", ":"), ensure_ascii=False)


Path = tuple[str | int, ...]


class _Positions(_Parser):
    """A second walk over a document that already parsed, noting where each value (and
    each object member's name) starts; it relies on the first parse for every check."""

    def __init__(self, text: str) -> None:
        super().__init__(text, reject_duplicates=False)
        self.path: list[str | int] = []
        self.at: dict[Path, tuple[int, int]] = {}

    def note(self, pos: int) -> None:
        line = self.s.count("\n", 0, pos) + 1
        self.at.setdefault(tuple(self.path), (line, pos - (self.s.rfind("\n", 0, pos) + 1) + 1))

    def walk(self) -> None:
        self.skip()
        c = self.s[self.i]
        if c not in "{[":
            self.note(self.i)
            self.value(0)  # a scalar: the parser's own reading moves past it
            return
        self.note(self.i)
        self.i += 1
        index = 0
        while True:
            self.skip()
            if self.s[self.i] in "}]":
                self.i += 1
                return
            if c == "{":
                key_at = self.i
                self.path.append(self.string())
                self.note(key_at)
                self.skip()
                self.i += 1  # the colon
            else:
                self.path.append(index)
                index += 1
            self.skip()
            self.walk()
            self.path.pop()
            self.skip()
            if self.s[self.i] == ",":
                self.i += 1


def value_positions(text: str) -> dict[Path, tuple[int, int]]:
    """Where each value of a valid document starts, as 1-based (line, column), keyed by its
    path (member names and array indexes); an object member's entry points at its name.
    Raises HuJSONError for a document that does not parse."""
    loads(text)
    p = _Positions(text)
    p.walk()
    return p.at
