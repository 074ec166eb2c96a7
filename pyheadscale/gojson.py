"""Decode JSON the way Go's encoding/json fills a typed struct, with size caps.

Tailscale's clients and Headscale decode every control message into Go types. A value the Go
decoder would refuse (a number where a string is declared, a float in an int, a bad netip
prefix) must never be stored or forwarded: official peers would then fail to decode their
whole map. So client data goes through a schema of the Go types before anything keeps it:

* object keys match struct fields exactly or, failing that, case-insensitively (as Go does);
  unknown keys are dropped; a later duplicate key wins;
* ``null`` leaves a scalar unset and makes a pointer, slice or map nil;
* a JSON type the Go field cannot hold is an error (Go's ``UnmarshalTypeError``), as are
  integers out of the field's range and text that the type's ``UnmarshalText`` refuses;
* every string, list and map has a cap (Go has none; ours keep memory bounded).

The result is canonical JSON data: known keys only, zero values omitted (Go's
``omitempty``/``omitzero``), so re-encoding it gives what a Go client would have sent.
``lenient=True`` (for data already stored by an older server) drops offending fields instead
of failing the whole value.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ABSENT",
    "Bool",
    "Bytes",
    "DecodeError",
    "Float",
    "GoType",
    "Int",
    "JSONValue",
    "List",
    "Map",
    "OptBool",
    "Ptr",
    "Str",
    "Struct",
    "Text",
    "addrport_text",
    "json_kind",
    "prefix_text",
]

JSONValue = Any  # what orjson produces: dict/list/str/int/float/bool/None
ABSENT: Any = object()  # what decode returns for a Go zero value (omitted on output)


class DecodeError(ValueError):
    """The value cannot be decoded into the Go type; the message names the field path."""


class GoType:
    """One Go type: ``decode`` returns the canonical value, or ABSENT for the zero value."""

    def decode(self, value: JSONValue, path: str, lenient: bool) -> Any:
        raise NotImplementedError


def json_kind(v: JSONValue) -> str:
    """The JSON kind of a decoded value, named as Go's JSON decoders name it in type errors."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def _type_error(path: str, v: JSONValue, want: str) -> DecodeError:
    return DecodeError(f"{path}: cannot decode JSON {json_kind(v)} into Go {want}")


@dataclass(frozen=True)
class Str(GoType):
    max_len: int = 256  # in UTF-8 bytes
    no_controls: bool = False  # refuse C0 controls and DEL (names that reach DB columns)

    def decode(self, value: JSONValue, path: str, lenient: bool) -> Any:
        if value is None:
            return ABSENT
        if not isinstance(value, str):
            raise _type_error(path, value, "string")
        if len(value) > self.max_len or len(value.encode("utf-8", "surrogatepass")) > self.max_len:
            raise DecodeError(f"{path}: longer than {self.max_len} bytes")
        if self.no_controls and any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise DecodeError(f"{path}: contains control characters")
        return value if value else ABSENT


class _BoolType(GoType):
    def decode(self, value: JSONValue, path: str, lenient: bool) -> Any:
        if value is None:
            return ABSENT
        if not isinstance(value, bool):
            raise _type_error(path, value, "bool")
        return True if value else ABSENT


class _OptBoolType(GoType):
    """tailscale's opt.Bool: JSON true, false or null. Null is kept: Go stores it as
    "unset", which is not its zero value and re-encodes as null."""

    def decode(self, value: JSONValue, path: str, lenient: bool) -> Any:
        if value is None:
            return None
        if not isinstance(value, bool):
            raise DecodeError(f"{path}: invalid opt.Bool value (want true, false or null)")
        return value  # false is set, not zero


Bool = _BoolType()
OptBool = _OptBoolType()


@dataclass(frozen=True)
class Int(GoType):
    bits: int = 64
    signed: bool = True

    def decode(self, value: JSONValue, path: str, lenient: bool) -> Any:
        if value is None:
            return ABSENT
        # Go parses the number literal for an int field: 1.0 and 1e3 are errors.
        if not isinstance(value, int) or isinstance(value, bool):
            raise _type_error(path, value, f"{'' if self.signed else 'u'}int{self.bits}")
        lo, hi = ((-(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1) if self.signed
                  else (0, (1 << self.bits) - 1))
        if not lo <= value <= hi:
            raise DecodeError(f"{path}: {value} overflows Go "
                              f"{'' if self.signed else 'u'}int{self.bits}")
        return value if value else ABSENT


class _FloatType(GoType):
    def decode(self, value: JSONValue, path: str, lenient: bool) -> Any:
        if value is None:
            return ABSENT
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise _type_error(path, value, "float64")
        f = float(value)
        if not math.isfinite(f):
            raise DecodeError(f"{path}: number out of float64 range")
        return f if f else ABSENT


Float = _FloatType()


@dataclass(frozen=True)
class Text(GoType):
    """A type with UnmarshalText (netip.Prefix, netip.AddrPort, ...): a JSON string whose
    text ``parse`` turns into its canonical form or refuses with ValueError."""

    name: str
    parse: Callable[[str], str]
    max_len: int = 128

    def decode(self, value: JSONValue, path: str, lenient: bool) -> Any:
        if value is None:
            return ABSENT
        if not isinstance(value, str):
            raise _type_error(path, value, self.name)
        if value == "":
            return ABSENT  # Go's zero value: UnmarshalText("") succeeds with it
        if len(value) > self.max_len:
            raise DecodeError(f"{path}: longer than {self.max_len} bytes")
        try:
            return self.parse(value)
        except ValueError as e:
            raise DecodeError(f"{path}: invalid {self.name} {value!r}: {e}") from None


@dataclass(frozen=True)
class Bytes(GoType):
    """[]byte: standard base64 with padding, as encoding/json writes it."""

    max_len: int = 4096  # decoded bytes

    def decode(self, value: JSONValue, path: str, lenient: bool) -> Any:
        if value is None:
            return ABSENT
        if not isinstance(value, str):
            raise _type_error(path, value, "[]uint8")
        if len(value) > (self.max_len + 2) // 3 * 4 + 64:
            raise DecodeError(f"{path}: longer than {self.max_len} bytes")
        try:
            raw = base64.b64decode(value.replace("\r", "").replace("\n", ""), validate=True)
        except (binascii.Error, ValueError):
            raise DecodeError(f"{path}: invalid base64") from None
        if len(raw) > self.max_len:
            raise DecodeError(f"{path}: longer than {self.max_len} bytes")
        return value if raw else ABSENT


@dataclass(frozen=True)
class List(GoType):
    elem: GoType
    max_items: int

    def decode(self, value: JSONValue, path: str, lenient: bool) -> Any:
        if value is None:
            return ABSENT
        if not isinstance(value, list):
            raise _type_error(path, value, "slice")
        if len(value) > self.max_items:
            if not lenient:
                raise DecodeError(f"{path}: {len(value)} entries, limit {self.max_items}")
            value = value[: self.max_items]
        out = []
        for i, v in enumerate(value):
            try:
                d = self.elem.decode(v, f"{path}[{i}]", lenient)
            except DecodeError:
                if not lenient:
                    raise
                continue
            if d is ABSENT and isinstance(self.elem, Text):
                continue  # an empty netip text is the zero value: useless to every reader
            # Any other null or zero element stays in a Go slice; keep its zero form.
            out.append(_zero_of(self.elem) if d is ABSENT else d)
        return out if out else ABSENT


@dataclass(frozen=True)
class Map(GoType):
    """map[string]T."""

    elem: GoType
    max_entries: int
    max_key_len: int = 64

    def decode(self, value: JSONValue, path: str, lenient: bool) -> Any:
        if value is None:
            return ABSENT
        if not isinstance(value, dict):
            raise _type_error(path, value, "map")
        if len(value) > self.max_entries and not lenient:
            raise DecodeError(f"{path}: {len(value)} entries, limit {self.max_entries}")
        out: dict[str, Any] = {}
        for k, v in value.items():
            if len(out) >= self.max_entries:
                break
            try:
                if len(k) > self.max_key_len:
                    raise DecodeError(f"{path}: key longer than {self.max_key_len} bytes")
                d = self.elem.decode(v, f"{path}[{k!r}]", lenient)
            except DecodeError:
                if not lenient:
                    raise
                continue
            out[k] = _zero_of(self.elem) if d is ABSENT else d
        return out if out else ABSENT


# encoding/json folds a key rune by rune to the smallest rune of its unicode.SimpleFold set
# (ASCII a-z to A-Z). Only these non-ASCII runes fold to ASCII (computed over all of Unicode
# with Go), so only they can match one of our ASCII field names.
_NON_ASCII_FOLDS = {0x17F: "S", 0x212A: "K"}


def go_fold(key: str) -> str | None:
    """Go's folded form of `key`, or None when it cannot equal an ASCII name's."""
    out = []
    for ch in key:
        if ch.isascii():
            out.append(ch.upper())
        elif (f := _NON_ASCII_FOLDS.get(ord(ch))) is not None:
            out.append(f)
        else:
            return None
    return "".join(out)


class Struct(GoType):
    """A Go struct: JSON names -> field types. Fields decode in the order keys arrive."""

    def __init__(self, name: str, fields: Mapping[str, GoType]) -> None:
        assert all(k.isascii() for k in fields)
        self.name = name
        self.fields = dict(fields)
        self._folded = {k.upper(): k for k in self.fields}

    def field_for(self, key: str) -> str | None:
        """Go's rule: the exact JSON name first, else a case-insensitive match."""
        if key in self.fields:
            return key
        folded = go_fold(key)
        return None if folded is None else self._folded.get(folded)

    def decode(self, value: JSONValue, path: str, lenient: bool) -> Any:
        if value is None:
            return ABSENT
        return self.decode_object(value, path, lenient)

    def decode_object(self, value: JSONValue, path: str, lenient: bool) -> dict[str, Any]:
        """Like decode, but a non-nil struct value is always an object (``{}`` when empty)."""
        if not isinstance(value, dict):
            raise _type_error(path, value, self.name)
        out: dict[str, Any] = {}
        for key, v in value.items():
            name = self.field_for(key) if isinstance(key, str) else None
            if name is None:
                continue  # unknown keys are ignored, as Go does
            try:
                d = self.fields[name].decode(v, f"{path}.{name}", lenient)
            except DecodeError:
                if not lenient:
                    raise
                continue
            if d is ABSENT:
                if v is None and isinstance(self.fields[name], _NULL_IGNORED):
                    continue  # Go ignores null for strings, numbers, bools and text types
                out.pop(name, None)  # a zero value, or null for a pointer/slice/map
                continue
            out[name] = d
        return out


@dataclass(frozen=True)
class Ptr(GoType):
    """*Struct: null is nil (omitted); an object, even ``{}``, is kept."""

    target: Struct

    def decode(self, value: JSONValue, path: str, lenient: bool) -> Any:
        if value is None:
            return ABSENT
        return self.target.decode_object(value, path, lenient)


_NULL_IGNORED = (Str, _BoolType, Int, _FloatType, Text)


def _zero_of(t: GoType) -> Any:
    if isinstance(t, Str | Text | Bytes):
        return ""
    if isinstance(t, _BoolType):
        return False
    if isinstance(t, Int):
        return 0
    if isinstance(t, _FloatType):
        return 0.0
    if isinstance(t, Struct):
        return {}
    return None  # opt.Bool, pointers, slices, maps: JSON null


# -- netip text forms ---------------------------------------------------------------------------


def prefix_text(text: str) -> str:
    """netip.ParsePrefix: ``addr/bits`` (host bits allowed, no zone); canonical text."""
    addr_s, sep, bits_s = text.partition("/")
    if not sep:
        raise ValueError("no '/'")
    if not bits_s.isdigit() or not bits_s.isascii() or (len(bits_s) > 1 and bits_s[0] == "0"):
        raise ValueError("bad bits after slash")
    if "%" in addr_s:
        raise ValueError("IPv6 zones cannot be present in a prefix")
    addr = ipaddress.ip_address(addr_s)
    bits = int(bits_s)
    if bits > addr.max_prefixlen:
        raise ValueError("prefix length out of range")
    return f"{addr}/{bits}"


def addrport_text(text: str) -> str:
    """netip.ParseAddrPort: ``1.2.3.4:80`` or ``[v6%zone]:80``; canonical text."""
    host, sep, port_s = text.rpartition(":")
    if not sep:
        raise ValueError("not an ip:port")
    if not port_s.isdigit() or not port_s.isascii() or int(port_s) > 65535:
        raise ValueError("invalid port")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    addr = ipaddress.ip_address(host)
    if bracketed != (addr.version == 6):
        raise ValueError("IPv6 addresses need square brackets, IPv4 ones must not have them")
    port = int(port_s)
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"
