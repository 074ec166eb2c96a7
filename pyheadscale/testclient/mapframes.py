"""Map response framing: 4-byte little-endian length + zstd-compressed JSON
(docs/protocol.md, "Map streaming")."""

from __future__ import annotations

import json
from typing import Any

import zstandard

MAX_FRAME = 64 << 20


class MapFrameError(ValueError):
    """A map frame is oversized or does not decode."""


def encode_map_frame(msg: dict[str, Any] | bytes) -> bytes:
    """Frame one message (a dict is JSON-encoded first)."""
    raw = msg if isinstance(msg, bytes) else json.dumps(msg, separators=(",", ":")).encode()
    comp = zstandard.ZstdCompressor().compress(raw)
    return len(comp).to_bytes(4, "little") + comp


class MapFrameDecoder:
    """Incremental decoder: ``feed(bytes)`` returns the complete frames decoded so far."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out: list[dict[str, Any]] = []
        while len(self._buf) >= 4:
            n = int.from_bytes(self._buf[:4], "little")
            if n > MAX_FRAME:
                raise MapFrameError(f"map frame of {n} bytes is too large")
            if len(self._buf) < 4 + n:
                break
            comp = bytes(self._buf[4 : 4 + n])
            del self._buf[: 4 + n]
            try:
                # A message may be several zstd frames back to back (as DecodeAll reads it).
                dec = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)
                raw = dec.decompress(comp)
                msg = json.loads(raw)
            except (zstandard.ZstdError, ValueError) as e:
                raise MapFrameError(f"undecodable map frame: {e}") from None
            if not isinstance(msg, dict):
                raise MapFrameError("map frame is not a JSON object")
            out.append(msg)
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)
