"""Outbound DATA frames for a response body, built without h2's per-frame machinery.

In a join storm every open map session gets a frame per batching window, so the server
writes hundreds of thousands of small DATA frames; through ``H2Connection.send_data`` each
one runs two state machines, builds a hyperframe ``DataFrame``, serializes it and copies the
connection's output twice. A DATA frame without padding or END_STREAM changes no h2 state
but the two outbound flow-control windows, so for a stream h2 holds as open for sending we
write the 9-byte header ourselves and take the bytes off both windows exactly as h2 does;
h2 then answers ``local_flow_control_window`` and every later call as if it had sent them.
Anything else (a closed or unknown stream, a connection that sent GOAWAY) is left to h2,
which raises its own error (the caller's fallback).

This leans on h2 internals, not its public API: ``conn.streams``, the connection's and
stream's ``state_machine.state`` and their ``outbound_flow_control_window`` attributes.
pyproject allows any h2 4.x; tests/unit/test_h2data.py compares these frames and windows
with ``H2Connection.send_data`` on an identical twin connection, so an h2 release that
frames or counts differently fails there.
"""

from __future__ import annotations

import struct

import h2.connection
import h2.stream

# Length (24 bits) and type in one u32, then the flags byte and the stream ID (RFC 9113 4.1).
_HEADER = struct.Struct(">IBL")
_DATA = 0x0
_SENDING = (h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_REMOTE)


def data_frames(conn: h2.connection.H2Connection, stream_id: int,
                data: memoryview, *, whole: bool = False) -> tuple[bytes, int] | None:
    """DATA frames (no END_STREAM) carrying as much of ``data`` as both flow-control windows
    allow, split at the peer's maximum frame size, and how many bytes of ``data`` they hold
    (0: a window is exhausted, or with ``whole`` too small for all of it; nothing was
    taken). None: h2 must handle this stream itself (it is not open for sending, or the
    connection is closed)."""
    if conn.state_machine.state is not h2.connection.ConnectionState.SERVER_OPEN:
        return None
    stream = conn.streams.get(stream_id)
    if stream is None or stream.state_machine.state not in _SENDING:
        return None
    room = min(len(data), conn.outbound_flow_control_window,
               stream.outbound_flow_control_window)
    if room <= 0 or (whole and room < len(data)):
        return b"", 0
    step = conn.max_outbound_frame_size
    out = bytearray()
    for start in range(0, room, step):
        piece = data[start:min(start + step, room)]
        out += _HEADER.pack(len(piece) << 8 | _DATA, 0, stream_id)
        out += piece
    conn.outbound_flow_control_window -= room
    stream.outbound_flow_control_window -= room
    return bytes(out), room
