"""A man in the middle for DERP mesh links: it answers like a relay (HTTP 101, ServerKey with
its own key), opens whatever ClientInfo it is sent and records the mesh key in it.

    python -m tests.derp_mitm --listen 0.0.0.0:8443 --cert c.pem --key k.pem --out seen.jsonl

In process: `mitm = await MeshMitm.start(host, port, ssl_ctx)`; `mitm.seen` lists
(mesh key, client public key) of every ClientInfo it could open; `mitm.connections` counts
TCP connections (so a test can tell "refused before ClientInfo" from "never dialled").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
from pathlib import Path

from derp import protocol as p
from derp.keys import generate_private_key


class MeshMitm:
    def __init__(self, out: Path | None = None) -> None:
        self.private_key = generate_private_key()
        self.public_key = p.public_key_of(self.private_key)
        self.seen: list[tuple[str, bytes]] = []
        self.connections = 0
        self.out = out
        self.server: asyncio.base_events.Server | None = None

    @classmethod
    async def start(cls, host: str, port: int, ctx: ssl.SSLContext | None,
                    out: Path | None = None) -> MeshMitm:
        m = cls(out)
        m.server = await asyncio.start_server(m._handle, host, port, ssl=ctx)
        return m

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def _log(self, **kw: object) -> None:
        if self.out is not None:
            with self.out.open("a") as f:
                f.write(json.dumps(kw) + "\n")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._log(connection=True)  # (after TLS: the client accepted our certificate)
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n"
                         b"Connection: Upgrade\r\n\r\n" + p.server_key_frame(self.public_key))
            await writer.drain()
            head = await asyncio.wait_for(reader.readexactly(p.FRAME_HEADER_LEN), 10)
            ftype, length = head[0], int.from_bytes(head[1:5], "big")
            payload = await asyncio.wait_for(reader.readexactly(min(length, 1 << 16)), 10)
            if ftype == p.FrameType.CLIENT_INFO:
                client, info = p.open_client_info(self.private_key, payload)
                self.seen.append((info.mesh_key, client))
                self._log(mesh_key=info.mesh_key, client=client.hex())
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError,
                p.DerpProtocolError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def _main(args: argparse.Namespace) -> None:
    host, _, port = args.listen.rpartition(":")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    m = await MeshMitm.start(host or "0.0.0.0", int(port), ctx, Path(args.out))
    Path(args.out).with_suffix(".key").write_text("nodekey:" + m.public_key.hex())
    await asyncio.Event().wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--out", required=True)
    asyncio.run(_main(ap.parse_args()))
