"""The front door's bridge to a fallback HTTP/1.1 protocol (pyheadscale's aiohttp app).

Each request the door does not route itself is re-serialised from h11's events and fed to the
fallback protocol, one exchange at a time, through a virtual transport whose writes go to the
real one.  A client-role h11 connection reads those writes to see where each response ends;
only then does the door parse the next request, which may be an upgrade it takes over.  The
fallback only ever sees complete, validated requests without ``Upgrade`` and without proxy
headers from untrusted peers.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import h11

log = logging.getLogger("derp.frontdoor")


class Door(Protocol):
    """What the bridge uses of ``frontdoor.FrontDoor``."""

    @property
    def transport(self) -> asyncio.Transport | None: ...

    @property
    def dropped_headers(self) -> frozenset[bytes]: ...

    @property
    def app_paused(self) -> bool: ...

    def set_app_paused(self, paused: bool) -> None: ...

    def exchange_done(self, status: int, size: int) -> None: ...

    def close(self) -> None: ...


class Passthrough:
    """The fallback protocol of one connection and the exchange it is serving."""

    def __init__(self, door: Door, proto: asyncio.Protocol) -> None:
        self.door = door
        self.proto = proto
        self.vt = _VirtualTransport(self)
        self.busy = False  # an exchange is in progress
        self._request_open = False
        self._chunked = False
        self._out: h11.Connection | None = None  # reads the fallback's response
        self.status = 0
        self.size = 0  # body bytes of the current response
        self._detached = False
        proto.connection_made(self.vt)

    def request(self, req: h11.Request) -> None:
        """Start an exchange: hand ``req``'s head to the fallback (its body follows)."""
        self.busy = True
        self.status = 0
        self.size = 0
        self._request_open = True
        out = h11.Connection(h11.CLIENT)
        # The tracker only needs the method (HEAD has no body) to find the response's end.
        out.send(h11.Request(method=req.method, target=req.target, headers=[("Host", "x")]))
        out.send(h11.EndOfMessage())
        self._out = out
        lines = [b"%s %s HTTP/%s" % (req.method, req.target, req.http_version)]
        # h11 accepts no Transfer-Encoding but chunked, and the door refused it beside
        # Content-Length: the framing is unambiguous.
        self._chunked = any(k == b"transfer-encoding" for k, _ in req.headers)
        dropped = self.door.dropped_headers
        for name, value in req.headers.raw_items():
            low = name.lower()
            if low == b"upgrade" or low in dropped:  # the door owns upgrades
                continue
            if low == b"connection":
                value = b", ".join(t for t in (x.strip() for x in value.split(b","))
                                   if t and t.lower() != b"upgrade")
                if not value:
                    continue
            lines.append(name + b": " + value)
        self.proto.data_received(b"\r\n".join(lines) + b"\r\n\r\n")

    def body(self, data: bytes) -> None:
        if self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self.proto.data_received(data)

    def body_end(self, ev: h11.EndOfMessage) -> None:
        if self._chunked:
            trailers = b"".join(k + b": " + v + b"\r\n" for k, v in ev.headers.raw_items())
            self.proto.data_received(b"0\r\n" + trailers + b"\r\n")
        self._request_open = False
        if self._out is None:  # the response was already complete
            self._exchange_done()

    def output(self, data: bytes) -> None:
        t = self.door.transport
        if self._detached or t is None:
            return
        t.write(data)
        out = self._out
        if out is None:
            return
        out.receive_data(data)
        while True:
            try:
                ev = out.next_event()
            except h11.RemoteProtocolError as e:
                log.error("fallback wrote an unparsable response: %s", e)
                t.abort()
                return
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return
            if isinstance(ev, h11.Response):
                self.status = ev.status_code
            elif isinstance(ev, h11.Data):
                self.size += len(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                self._out = None
                if not self._request_open:
                    self._exchange_done()
                return

    def _exchange_done(self) -> None:
        self.busy = False
        self.door.exchange_done(self.status, self.size)

    def closed_by_app(self) -> None:
        if self._detached:
            return
        if self._out is not None:  # a response delimited by the end of the connection
            self.output(b"")
        self.door.close()

    def lost(self, exc: Exception | None) -> None:
        """The connection is gone, or taken over: the fallback must forget it."""
        if self._detached:
            return
        self._detached = True
        self.proto.connection_lost(exc)


class _VirtualTransport(asyncio.Transport):
    """What the fallback protocol sees as its transport: the real one, one exchange at a time."""

    def __init__(self, fb: Passthrough) -> None:
        super().__init__()
        self._fb = fb
        self._closing = False

    def _real(self) -> asyncio.Transport | None:
        return None if self._fb._detached else self._fb.door.transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing:
            self._fb.output(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        t = self._real()
        return self._closing or t is None or t.is_closing()

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._fb.closed_by_app()

    def abort(self) -> None:
        self._closing = True
        t = self._real()
        if t is not None:
            t.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        t = self._fb.door.transport
        return default if t is None else t.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._fb.door.set_app_paused(True)

    def resume_reading(self) -> None:
        self._fb.door.set_app_paused(False)

    def is_reading(self) -> bool:
        return not self._fb.door.app_paused

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        t = self._real()
        if t is not None:
            t.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        t = self._real()
        return 0 if t is None else t.get_write_buffer_size()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        raise NotImplementedError("the front door owns protocol switches")

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._fb.proto
