"""A small seeded mutator for byte strings and JSON-like data.

Why our own rather than atheris or hypothesis: every input must first get through layers a
random byte string never passes (Noise's AEAD, HTTP/2 framing, DERP's sealed ClientInfo),
so inputs are built valid by the real encoders and mutated *inside* those layers; a seed
reproduces a run exactly (`--seed`, input index); and it drives the asyncio server paths at
tens of thousands of inputs a second with no native build. atheris's coverage guidance would
need a libFuzzer toolchain and a synchronous target; hypothesis is made for shrinking
property tests at a few hundred examples, not 10^6 inputs.
"""

from __future__ import annotations

import json
import random
from typing import Any

import orjson

# Length fields' edges: powers of two and one either side, DERP's largest SendPacket frame
# (a 32-byte key and 64 KiB) and one more, the Go client's 1 MiB frame limit.
INTERESTING_LENGTHS = (0, 1, 31, 32, 33, 255, 256, 4095, 4096, 16383, 16384, 65535, 65536,
                       65568, 65569, 1 << 20, (1 << 24) - 1, 0x7FFFFFFF, 0xFFFFFFFF)
TOKENS = [b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b"\\u", b"\\ud800", b"//", b"/*",
          b"*/", b"\n", b"\x00", b"null", b"true", b"1e999", b"-0", b"\xff", b"\xc3", b"\xed"]


def mutate(rng: random.Random, data: bytes, rounds: int = 0) -> bytes:
    """1-4 random edits: byte flips, cuts, inserts, length-field overwrites, token splices."""
    b = bytearray(data)
    for _ in range(rounds or rng.randrange(1, 5)):
        op = rng.randrange(8)
        if op == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 2 and b:
            del b[rng.randrange(len(b)):]
        elif op == 3:
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randrange(1, 16))
        elif op == 4 and len(b) >= 5:
            i = rng.randrange(len(b) - 3)
            width = rng.choice((2, 3, 4))
            n = rng.choice(INTERESTING_LENGTHS) & ((1 << (8 * width)) - 1)
            b[i:i + width] = n.to_bytes(width, "big")
        elif op == 5 and b:
            i, j = sorted((rng.randrange(len(b) + 1), rng.randrange(len(b) + 1)))
            b[i:i] = b[i:j] * rng.randrange(1, 4)  # repeat a slice
        elif op == 6:
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.choice(TOKENS)
        elif b:
            i = rng.randrange(len(b))
            del b[i:i + rng.randrange(1, 8)]
    return bytes(b)


def chunks(rng: random.Random, data: bytes) -> list[bytes]:
    """Split as a network would: single bytes, odd sizes, or all at once."""
    out = []
    i = 0
    while i < len(data):
        n = rng.choice((1, 2, 3, 7, 64, 1000, 4096, len(data)))
        out.append(data[i:i + n])
        i += n
    return out


HOSTILE_VALUES: list[Any] = [None, True, False, 0, -1, 2**63, 2**64, -(2**63) - 1, 1.5, 1e308,
                             "", " ", "a" * 300, "\u0000", "../../etc/passwd", "tag:", "*",
                             "user@", "@", "1.2.3.4/33", "::/129", "%00", "\ud7ff", "é" * 50,
                             [], [None], [[[]]], {}, {"": None}, {"a": {"b": {"c": [1]}}}]


def mutate_json(rng: random.Random, value: Any, depth: int = 0) -> Any:
    """Replace, drop or add parts of a decoded JSON value."""
    r = rng.random()
    if r < 0.15 or depth > 6:
        return rng.choice(HOSTILE_VALUES)
    if isinstance(value, dict):
        out = dict(value)
        for k in list(out):
            if rng.random() < 0.3:
                out[k] = mutate_json(rng, out[k], depth + 1)
            elif rng.random() < 0.05:
                del out[k]
        if rng.random() < 0.1:
            out[rng.choice(["x", "", "Key", "__proto__", "a" * 100])] = rng.choice(HOSTILE_VALUES)
        return out
    if isinstance(value, list):
        out_l = [mutate_json(rng, v, depth + 1) if rng.random() < 0.3 else v for v in value]
        if rng.random() < 0.1:
            out_l.append(rng.choice(HOSTILE_VALUES))
        if out_l and rng.random() < 0.05:
            out_l = out_l * rng.randrange(2, 50)
        return out_l
    if isinstance(value, str) and rng.random() < 0.5:
        return mutate(rng, value.encode()).decode("utf-8", "replace")
    return rng.choice(HOSTILE_VALUES) if rng.random() < 0.5 else value


def to_json(value: Any) -> bytes:
    """orjson, or the stdlib for what orjson refuses (integers beyond 64 bits)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
