"""A simulated node (the Python test client) that takes a map-session place and holds it, for
test_restart_gate.py. Run as its own process in a namespace:

    python -m tests.integration.map_holder URL AUTHKEY

It registers a node named "holder" and prints `{"registered": NODEKEY}`. When a line comes
on stdin it connects again (to the restarted server), sends two lite updates (`OmitPeers`,
no stream) and then a streaming map request, all three renaming its node to
"holder-renamed", and prints `{"sent": true}`; then `{"status": N}` once the poll's answer
headers arrive and `{"map": true}` with its first map. It exits when stdin closes.

A rename is a database write the server makes before it answers, and one node's writes are
made one after the other (endpoints and host info are written later, in batches). With the
database locked by the test, each rename waits up to SQLite's 10 s busy timeout and then
gives up (the server logs it and goes on), and the next one starts waiting: the lite
updates never wait at the gate, while the poll is admitted at once and keeps its place
until its own rename is through, up to 30 s in all. SSL_CERT_FILE gives it the lab's CA.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from tests.inproc import Machine

RENAMED = "holder-renamed"
LITE_UPDATES = 2


def say(**kw: Any) -> None:
    print(json.dumps(kw), flush=True)


async def main(url: str, authkey: str) -> None:
    loop = asyncio.get_running_loop()
    m = Machine(url, "holder")
    async with m:
        await m.register(auth_key=authkey)
    say(registered=m.nodekey_text)
    await loop.run_in_executor(None, sys.stdin.readline)
    m.hostname = RENAMED
    async with m:  # a new Noise connection to the restarted server
        for _ in range(LITE_UPDATES):  # answered when their write is through or gave up
            await m.conn.open_stream("POST", "/machine/map",
                                     m.map_request(stream=False, OmitPeers=True))
        st = await m.conn.open_stream("POST", "/machine/map", m.map_request())
        say(sent=True)
        status, _ = await st.response()
        say(status=status)
        if status == 200:
            async for _ in st.chunks():
                say(map=True)
                break
        await loop.run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
