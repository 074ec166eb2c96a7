"""Seeded generators of hostile client data shaped by the Go schemas in pyheadscale.gojson.

Mostly well-typed values (so the decoder's deeper paths run), with a share of wrong JSON types,
nulls, out-of-range numbers, bad netip text, case-mangled and unknown keys.
"""

from __future__ import annotations

import random
from typing import Any

from pyheadscale import gojson as g

_WEIRD_STRINGS = ["", "a", "tag:web", "ſſh", "\u0000", "\n", "é" * 3, "\U0001f600", "x" * 40,
                  "1.2.3.4", "true", "null", "\\", '"']
_PREFIXES = ["10.0.0.0/8", "192.168.1.0/24", "0.0.0.0/0", "::/0", "fd7a::/48",
             "2001:db8::1/128", "1.2.3.4/24", "::ffff:1.2.3.4/120", "100.64.0.1/32"]
_BAD_PREFIXES = ["1.2.3.4", "1.2.3.4/33", "fe80::1%eth0/64", "01.2.3.4/8", "1.2.3.4/024",
                 "1.2.3.4/-1", "/8", "x/8", "1.2.3.4/8/8", "::/129", "1.2.3.4/²"]
_ADDRPORTS = ["1.2.3.4:41641", "[2001:db8::1]:41641", "[fe80::1%eth0]:1", "0.0.0.0:0",
              "192.0.2.1:65535", "[::ffff:1.2.3.4]:80"]
_BAD_ADDRPORTS = ["1.2.3.4", "2001:db8::1:41641", "[1.2.3.4]:80", "1.2.3.4:65536", "1.2.3.4:",
                  ":80", "[::1]", "1.2.3.4:+80", "1.2.3.4:٣"]
_NUMBERS = [0, 1, -1, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**63 - 1, 2**63, -(2**63),
            2**64 - 1, 1.5, 1.0, -0.0, 1e300, 3.25]


def mangle_key(rng: random.Random, key: str) -> str:
    r = rng.random()
    if r < 0.5:
        return key
    if r < 0.7:
        return key.lower()
    if r < 0.8:
        return key.upper()
    if r < 0.9:  # Go also folds these non-ASCII runes onto ASCII letters
        return key.replace("s", "\u017f").replace("K", "\u212a").replace("I", "\u0131")
    return key + rng.choice(["_", "x", " "])


def wrong_type(rng: random.Random) -> Any:
    return rng.choice([rng.choice(_NUMBERS), "str", True, False, [], [1, "a"], {}, {"a": 1},
                       [[]], [[[]]]])


def value(rng: random.Random, t: g.GoType, wrong: float = 0.08, depth: int = 0) -> Any:
    """A JSON value for Go type `t`; with probability `wrong` one of the wrong kind."""
    if rng.random() < 0.05:
        return None
    if rng.random() < wrong:
        return wrong_type(rng)
    if isinstance(t, g.Str):
        if rng.random() < 0.02:
            return "y" * (t.max_len + rng.choice((0, 1)))
        return rng.choice(_WEIRD_STRINGS)
    if t is g.Bool or t is g.OptBool:
        return rng.random() < 0.5
    if isinstance(t, g.Int):
        return rng.choice(_NUMBERS[:14]) if rng.random() < 0.9 else rng.choice(_NUMBERS)
    if t is g.Float:
        return rng.choice(_NUMBERS)
    if isinstance(t, g.Text):
        good, bad = ((_PREFIXES, _BAD_PREFIXES) if "Prefix" in t.name
                     else (_ADDRPORTS, _BAD_ADDRPORTS))
        return rng.choice(bad if rng.random() < 0.1 else good)
    if isinstance(t, g.Bytes):
        return rng.choice(["", "AAAA", "not base64!", "YWJj", "YQ==", "YQ"])
    if isinstance(t, g.List):
        n = rng.choice((0, 1, 2, 3, 5)) if rng.random() < 0.97 else t.max_items + 1
        return [value(rng, t.elem, wrong / 2, depth + 1) for _ in range(n)]
    if isinstance(t, g.Map):
        return {rng.choice(["1-v4", "1-v6", "999-v4", "", "k" * 70]):
                value(rng, t.elem, wrong / 2, depth + 1) for _ in range(rng.randrange(4))}
    if isinstance(t, g.Ptr):
        return struct(rng, t.target, wrong / 2, depth + 1)
    if isinstance(t, g.Struct):
        return struct(rng, t, wrong / 2, depth + 1)
    return wrong_type(rng)  # custom types (keys, times) get arbitrary JSON


def struct(rng: random.Random, s: g.Struct, wrong: float = 0.08, depth: int = 0,
           exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    names = [n for n in s.fields if n not in exclude]
    for name in rng.sample(names, rng.randrange(len(names) + 1)):
        out[mangle_key(rng, name)] = value(rng, s.fields[name], wrong, depth)
    for _ in range(rng.choice((0, 0, 1, 3))):
        out[rng.choice(["Unknown", "extra", "Padding", "__proto__", ""])] = wrong_type(rng)
    return out
