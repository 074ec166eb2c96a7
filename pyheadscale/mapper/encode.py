"""Map-stream framing: JSON (orjson) -> zstd frame(s) -> u32 LITTLE-endian length prefix.

Current official clients always ask for zstd (MapRequest `Compress: "zstd"`), and the length prefix is little-endian (unlike
every Noise field); docs/protocol.md, "Map streaming".
"""

from __future__ import annotations

import struct
import threading
from typing import Any

import orjson
import zstandard

from pyheadscale.tailcfg import dumps

__all__ = ["KEEPALIVE", "FrameError", "compress", "decode_frame", "encode_frame", "plain_frame",
           "to_plain"]

# Fast level: frames are sent once and decoded once; latency beats ratio here.
_LEVEL = 1
_MAX_FRAME = 64 << 20  # a sanity bound for decode_frame (tests, debugging)
_local = threading.local()


class FrameError(ValueError):
    """A map frame is truncated or not zstd."""


def _compressor() -> zstandard.ZstdCompressor:
    # ZstdCompressor objects must not be used from two threads at once: one per thread.
    c = getattr(_local, "cctx", None)
    if c is None:
        c = _local.cctx = zstandard.ZstdCompressor(level=_LEVEL, write_content_size=True)
    return c


def compress(data: bytes) -> bytes:
    return _compressor().compress(data)


class _RecentFrames:
    """The last few frames by their JSON: after one change most viewers are sent the same
    delta, and compressing it once serves them all."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self.frames: dict[bytes, bytes] = {}

    def get(self, payload: bytes) -> bytes:
        frame = self.frames.get(payload)
        if frame is None:
            z = compress(payload)
            frame = struct.pack("<I", len(z)) + z
            if len(self.frames) >= self.size:
                del self.frames[next(iter(self.frames))]  # oldest first (insertion order)
            self.frames[payload] = frame
        return frame


def encode_frame(obj: Any) -> bytes:
    """A complete frame for ``obj`` (a MapResponse dict, or already-encoded JSON bytes)."""
    payload = bytes(obj) if isinstance(obj, bytes | bytearray | memoryview) else dumps(obj)
    recent = getattr(_local, "recent", None)
    if recent is None:
        recent = _local.recent = _RecentFrames()
    return recent.get(payload)


def _inflate(frame: bytes) -> tuple[bytes, bytes]:
    """The JSON of the first frame of ``frame``, and the bytes after that frame."""
    if len(frame) < 4:
        raise FrameError("frame shorter than its length prefix")
    (n,) = struct.unpack_from("<I", frame)
    if n > _MAX_FRAME or len(frame) < 4 + n:
        raise FrameError(f"frame claims {n} bytes, {len(frame) - 4} available")
    try:
        # A map may be several zstd frames back to back (mapper/firstmap.py).
        dec = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)
        raw = dec.decompress(frame[4 : 4 + n])
    except zstandard.ZstdError as e:
        raise FrameError(f"not a zstd frame: {e}") from None
    if not raw or len(raw) > _MAX_FRAME:
        raise FrameError(f"frame decodes to {len(raw)} bytes")
    return raw, frame[4 + n :]


def decode_frame(frame: bytes) -> tuple[Any, bytes]:
    """Decode the first frame of ``frame``; returns (JSON value, remaining bytes)."""
    raw, rest = _inflate(frame)
    return orjson.loads(raw), rest


def plain_frame(frame: bytes) -> bytes:
    """``frame`` (one frame) uncompressed, for a client whose MapRequest does not ask for zstd
    (`Compress: ""`, as tailscale-rs sends): Headscale compresses only when asked. Frames are
    built compressed once for every viewer; such clients are few, so they pay the inflate."""
    raw, _ = _inflate(frame)
    return struct.pack("<I", len(raw)) + raw


def to_plain(resp: Any) -> Any:
    """The response as plain Python JSON values (resolves orjson.Fragment entries)."""
    return orjson.loads(dumps(resp))


KEEPALIVE: bytes = encode_frame({"KeepAlive": True})
