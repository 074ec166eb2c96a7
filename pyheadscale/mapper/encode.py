"""Map-stream framing: JSON (orjson) -> zstd frame(s) -> u32 LITTLE-endian length prefix.

Current official clients always ask for zstd (MapRequest `Compress: "zstd"`), and the length prefix is little-endian (unlike
every Noise field); docs/protocol.md, "Map streaming".

Long PacketFilter source lists are shared: a policy's rules reach many nodes with the same
SrcIPs (at 1,000 nodes ``autogroup:member`` alone is 2,000 addresses), so each such list is
encoded and compressed once, as its own zstd frame, and every message carrying it gets that
frame between its own ones (zstd frames concatenate, see mapper/firstmap.py). Inside the JSON
a shared list is a marker (NUL, number, NUL; orjson never writes a raw NUL) that
``compress_json`` swaps for the list's frame.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from typing import Any

import orjson
import zstandard

from pyheadscale.tailcfg import dumps

__all__ = ["KEEPALIVE", "FrameError", "compress", "compress_json", "decode_frame", "encode_frame",
           "encode_json", "plain_pieces", "plain_size", "to_plain"]

# Fast level: frames are sent once and decoded once; latency beats ratio here.
_LEVEL = 1
_MAX_FRAME = 64 << 20  # a sanity bound for decode_frame (tests, debugging)
_MAX_PLAIN = 0xFFFFFFFF  # the most an uncompressed frame's u32 length prefix can say
_PLAIN_PIECE = 1 << 20  # an uncompressed frame is inflated and sent this much at a time
# SrcIPs lists with at least this many entries are shared (shorter ones cost less inline
# than a zstd frame of their own).
SHARED_MIN = 64
# Pieces between shared lists up to this size are stored, not compressed (compress_json).
RAW_MAX = 512
# Bytes of shared lists kept per thread before the table starts over.
_SHARED_BUDGET = 32 << 20
_MARK = b"\x00"
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
            z = compress_json(payload)
            frame = struct.pack("<I", len(z)) + z
            if len(self.frames) >= self.size:
                del self.frames[next(iter(self.frames))]  # oldest first (insertion order)
            self.frames[payload] = frame
        return frame


class _Shared:
    """One shared list: its JSON, its marker, and (once asked) its zstd frame."""

    __slots__ = ("data", "fragment", "_frame")

    def __init__(self, data: bytes, marker: bytes) -> None:
        self.data = data
        self.fragment = orjson.Fragment(_MARK + marker + _MARK)
        self._frame: bytes | None = None

    def frame(self) -> bytes:
        if self._frame is None:
            self._frame = compress(self.data)
        return self._frame


class _SharedLists:
    """The shared lists of one thread: by list object (the policy hands every node the same
    list), by content (a recompiled policy's equal list gets the same marker, so equal
    filters still encode equally) and by marker."""

    def __init__(self) -> None:
        self.by_id: dict[int, tuple[list[Any], _Shared]] = {}
        self.by_data: dict[bytes, _Shared] = {}
        self.by_marker: dict[bytes, _Shared] = {}
        self.size = 0
        self.serial = 0  # markers are never reused, even after a reset

    def reset_if_full(self) -> None:
        # Only between two messages: a message's markers must resolve until it is compressed.
        if self.size > _SHARED_BUDGET:
            self.by_id.clear()
            self.by_data.clear()
            self.by_marker.clear()
            self.size = 0

    def fragment(self, items: list[Any]) -> orjson.Fragment:
        hit = self.by_id.get(id(items))
        if hit is not None and hit[0] is items:
            return hit[1].fragment
        data = dumps(items)
        shared = self.by_data.get(data)
        if shared is None:
            self.serial += 1
            marker = str(self.serial).encode()
            shared = self.by_data[data] = self.by_marker[marker] = _Shared(data, marker)
            self.size += len(data)
        self.by_id[id(items)] = (items, shared)  # holding the list keeps its id unique
        self.size += 8 * len(items)
        return shared.fragment


def _shared_lists() -> _SharedLists:
    table = getattr(_local, "shared", None)
    if table is None:
        table = _local.shared = _SharedLists()
    return table


def encode_json(obj: Any) -> bytes:
    """``dumps(obj)``, with a MapResponse's long PacketFilter source lists as markers: the
    bytes go to ``compress_json`` (in this thread), never to the wire as they are."""
    if not isinstance(obj, dict):
        return dumps(obj)
    rules = obj.get("PacketFilter")
    if not rules or not any(len(r.get("SrcIPs") or ()) >= SHARED_MIN for r in rules):
        return dumps(obj)
    table = _shared_lists()
    table.reset_if_full()
    out = []
    for r in rules:
        src = r.get("SrcIPs")
        if src is not None and len(src) >= SHARED_MIN:
            r = {**r, "SrcIPs": table.fragment(src)}  # same key order as the rule
        out.append(r)
    return dumps({**obj, "PacketFilter": out})


def raw_frame(data: bytes) -> bytes:
    """A zstd frame holding ``data`` (1 to RAW_MAX bytes) as one raw (stored) block, as zstd
    itself stores what does not compress (RFC 8878 3.1.1): magic, a single-segment header
    with the content size (1 byte up to 255, else 2 bytes holding size - 256), the block
    header (last block, type raw, size) and the bytes."""
    n = len(data)
    if not 0 < n <= RAW_MAX:
        raise ValueError(f"raw_frame takes 1 to {RAW_MAX} bytes, not {n}")
    head = (b"\x28\xb5\x2f\xfd\x20" + bytes((n,)) if n < 256
            else b"\x28\xb5\x2f\xfd\x60" + struct.pack("<H", n - 256))
    return b"".join((head, struct.pack("<I", 1 | n << 3)[:3], data))


def compress_json(payload: bytes) -> bytes:
    """zstd of ``encode_json`` output: its own pieces compressed, each shared list's frame in
    between (one or more concatenated frames). A piece of at most RAW_MAX bytes goes stored
    (``raw_frame``): a policy frame's pieces between shared lists are a few hundred bytes
    each, ~14 per viewer at 1,000 nodes, and a zstd call costs ~5 us whatever the size, to
    save ~300 bytes on such a piece."""
    if _MARK not in payload:
        return compress(payload)
    by_marker = _shared_lists().by_marker
    out = []
    for i, part in enumerate(payload.split(_MARK)):
        if i % 2:
            out.append(by_marker[part].frame())
        elif part:
            out.append(raw_frame(part) if len(part) <= RAW_MAX else compress(part))
    return b"".join(out)


def encode_frame(obj: Any) -> bytes:
    """A complete frame for ``obj`` (a MapResponse dict, or already-encoded JSON bytes)."""
    payload = bytes(obj) if isinstance(obj, bytes | bytearray | memoryview) else encode_json(obj)
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


def _pieces(body: memoryview) -> Iterator[bytes]:
    """The JSON of ``body`` (zstd frames back to back), inflated a piece at a time."""
    try:
        with zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True) as r:
            while piece := r.read(_PLAIN_PIECE):
                yield piece
    except zstandard.ZstdError as e:
        raise FrameError(f"not a zstd frame: {e}") from None


def _body(frame: bytes) -> memoryview:
    if len(frame) < 4:
        raise FrameError("frame shorter than its length prefix")
    (n,) = struct.unpack_from("<I", frame)
    if len(frame) != 4 + n:
        raise FrameError(f"frame claims {n} bytes, {len(frame) - 4} available")
    return memoryview(frame)[4:]  # no copy of a large frame


def plain_size(frame: bytes) -> int:
    """The length of ``frame``'s JSON (one frame), for a client whose MapRequest does not ask
    for zstd (`Compress: ""`, as tailscale-rs sends; Headscale compresses only when asked).
    Frames are built compressed once for every viewer, and such clients are few, so they pay
    the inflate twice: here, to learn the length the prefix needs (nothing is kept), then in
    `plain_pieces`. A first map of a large tailnet inflates to hundreds of MiB, tens of ms of
    CPU: call this off the event loop. Raises FrameError for what no prefix can frame."""
    size = sum(len(piece) for piece in _pieces(_body(frame)))
    if not size or size > _MAX_PLAIN:
        raise FrameError(f"frame decodes to {size} bytes")
    return size


def plain_pieces(frame: bytes, size: int) -> Iterator[bytes]:
    """``frame`` uncompressed, `size` (from `plain_size`) in its length prefix: the prefix
    and the JSON in pieces of at most 1 MiB, no more than a piece ever held here, however
    the client reads."""
    pieces = _pieces(_body(frame))
    # The prefix rides with the first piece: a frame of up to a piece is one write.
    yield struct.pack("<I", size) + next(pieces, b"")
    yield from pieces


def to_plain(resp: Any) -> Any:
    """The response as plain Python JSON values (resolves orjson.Fragment entries)."""
    return orjson.loads(dumps(resp))


KEEPALIVE: bytes = encode_frame({"KeepAlive": True})
