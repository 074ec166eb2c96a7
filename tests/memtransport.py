"""An asyncio transport without a socket, for driving the relay's ClientConn in memory (fuzz
tests, the hot-path benchmark): it counts what is written and closes like a real one."""

from __future__ import annotations

import asyncio
from typing import Any


class MemTransport:
    """Just enough of an asyncio transport for ClientConn. `abort`/`close` tell `conn` the
    connection is lost on the next loop turn, as a socket transport does."""

    def __init__(self, conn: asyncio.BaseProtocol | None = None) -> None:
        self.conn = conn
        self.out = 0  # bytes written
        self.writes = 0
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += len(data)
        self.writes += 1

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        if not self.closing:
            self.closing = True
            if self.conn is not None:
                asyncio.get_running_loop().call_soon(self.conn.connection_lost, None)
