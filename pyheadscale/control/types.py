"""The contract between the HTTP/2-over-Noise server and the control handlers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

MAX_REQUEST_BODY = 1 << 20  # 1 MiB, like the reference server
MIN_CAPVER = 113  # Tailscale v1.80, the oldest of the last ten minor releases


@dataclass
class ControlRequest:
    """One HTTP/2 request received over an authenticated Noise connection."""

    method: str
    path: str  # without the query string; route on this only (clients send odd :authority)
    query: str  # raw query string without "?", "" if none
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    machine_key: bytes  # 32 raw bytes: the Noise peer's static key (the only identity)
    capver: int  # capability version from the Noise initiation header
    conn_id: int
    stream_id: int = 0
    header_list: list[tuple[str, str]] = field(default_factory=list)  # in order, repeats kept
    remote: str = ""  # the peer's address as the listener resolved it ("" when unknown)


class StreamGone(Exception):
    """The stream was reset by the peer or the connection closed; stop writing."""


@runtime_checkable
class ResponseStream(Protocol):
    """Response side of one HTTP/2 stream; only the request's handler task writes to it."""

    async def start(self, status: int, headers: list[tuple[str, str]] | None = None) -> None:
        """Send the response headers (names are lower-cased)."""
        ...

    async def write(self, data: bytes) -> None:
        """Send body bytes, waiting for HTTP/2 flow-control window; raises StreamGone."""
        ...

    def write_now(self, data: bytes) -> bool:
        """Send body bytes whole at once if nothing has to wait (no window, no socket); False:
        nothing was sent, ``write`` them instead."""
        ...

    async def end(self, data: bytes = b"") -> None:
        """Send the last body bytes and END_STREAM (calls start(200) if not started)."""
        ...

    @property
    def closed(self) -> bool:
        """True once the stream ended, was reset, or its connection closed."""
        ...


Dispatch = Callable[[ControlRequest, ResponseStream], Awaitable[None]]


class ByteSink(Protocol):
    """Where a connection's ciphertext goes (a socket, a WebSocket, a test buffer)."""

    async def write(self, data: bytes) -> None: ...

    def ready(self) -> bool:
        """True when ``write_nowait`` would not have to wait (nothing is holding output)."""
        ...

    def write_nowait(self, data: bytes) -> None:
        """Take ``data`` now (only after ``ready()`` said so)."""
        ...

    async def close(self) -> None: ...

    def abort(self) -> None:
        """Drop the connection at once, unsent output and all (a peer that does not read)."""
        ...
