"""Map frames for clients that do not ask for zstd: inflated a piece at a time, at any size
a length prefix can say (a first map of a large tailnet is far beyond 64 MiB)."""

from __future__ import annotations

import hashlib
import struct
import threading
from typing import Any

import pytest

from pyheadscale.control.poll import write_frame
from pyheadscale.mapper import encode
from pyheadscale.mapper.encode import (
    SHARED_MIN,
    FrameError,
    compress,
    compress_json,
    encode_json,
    plain_pieces,
    plain_size,
)
from pyheadscale.tailcfg import dumps

PEERS = 60_000  # ~1.2 KiB of JSON each: about 70 MiB in all


def huge_map() -> tuple[bytes, bytes]:
    """A frame built as the mapper builds one (its own pieces and a shared PacketFilter
    source list as zstd frames back to back), and the JSON it stands for."""
    src = [f"100.64.{i // 250}.{i % 250 + 1}" for i in range(SHARED_MIN * 2)]
    peer = {"ID": 1, "Name": "peer.example.ts.net.", "Hostinfo": {"Hostname": "h" * 1100}}
    obj: dict[str, Any] = {
        "Peers": [peer] * PEERS,
        "PacketFilter": [{"SrcIPs": src, "DstPorts": [{"IP": "*", "Ports": {"First": 0,
                                                                           "Last": 65535}}]}]}
    payload = encode_json(obj)
    assert b"\x00" in payload  # the source list is a shared frame of its own
    z = compress_json(payload)
    return struct.pack("<I", len(z)) + z, dumps(obj)


class Sink:
    """A response stream that keeps only a digest of what it was sent."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0
        self.largest = 0
        self.closed = False

    async def start(self, status: int, headers: list[tuple[str, str]] | None = None) -> None:
        pass

    async def write(self, data: bytes) -> None:
        self.digest.update(data)
        self.size += len(data)
        self.largest = max(self.largest, len(data))

    async def end(self, data: bytes = b"") -> None:
        await self.write(data)
        self.closed = True


async def test_a_map_beyond_64_mib_reaches_a_client_without_zstd() -> None:
    frame, raw = huge_map()
    assert len(raw) > 64 << 20 and len(frame) < 1 << 20
    sink = Sink()
    await write_frame(sink, frame, "full", 1, zstd=False)
    want = hashlib.sha256(struct.pack("<I", len(raw)))
    want.update(raw)  # not hashed as one concatenation: that would copy the whole map
    assert sink.size == 4 + len(raw) and sink.digest.hexdigest() == want.hexdigest()
    assert sink.largest <= (1 << 20) + 4  # never more than a piece (and the prefix) at once
    sink = Sink()
    await write_frame(sink, frame, "full", 1, zstd=True)
    assert sink.size == len(frame)  # a client that asked for zstd gets the frame as built


def test_the_length_prefix_bounds_what_can_be_framed(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = b'{"Peers":[' + b",".join([b'{"ID":1}'] * 1000) + b"]}"
    z = compress(raw)
    frame = struct.pack("<I", len(z)) + z
    size = plain_size(frame)
    assert list(plain_pieces(frame, size)) == [struct.pack("<I", len(raw)) + raw]  # one write
    monkeypatch.setattr(encode, "_MAX_PLAIN", len(raw) - 1)
    with pytest.raises(FrameError, match="decodes to"):
        plain_size(frame)  # refused before anything is sent


@pytest.mark.parametrize("frame", [
    b"\x05\x00",  # shorter than its prefix
    struct.pack("<I", 10) + b"short",  # claims more than it has
    struct.pack("<I", 8) + b"not zstd",
    struct.pack("<I", 4) + b"{}{}",
])
async def test_a_bad_frame_is_refused_before_anything_is_sent(frame: bytes) -> None:
    with pytest.raises(FrameError):
        plain_size(frame)
    sink = Sink()
    with pytest.raises(FrameError):
        await write_frame(sink, frame, "full", 1, zstd=False)
    assert sink.size == 0


async def test_the_length_is_counted_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting inflates the whole frame (tens of ms for a large first map, per poll of
    such a client): a thread does it, so the loop serves every other stream meanwhile."""
    counted_in: list[int] = []

    def counting(frame: bytes) -> int:
        counted_in.append(threading.get_ident())
        return plain_size(frame)

    monkeypatch.setattr("pyheadscale.control.poll.plain_size", counting)
    raw = b'{"Peers":[]}'
    z = compress(raw)
    sink = Sink()
    await write_frame(sink, struct.pack("<I", len(z)) + z, "full", 1, zstd=False)
    assert sink.size == 4 + len(raw)
    assert counted_in and threading.get_ident() not in counted_in
