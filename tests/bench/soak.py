"""Soak: N simulated nodes against pyheadscale for a long time, with churn.

    python -m tests.bench.soak                      # 1,000 nodes, 30 minutes
    python -m tests.bench.soak --nodes 200 --minutes 3

The nodes (Python test client, several processes) register with a reusable key and hold
map polls. Then, until the time is up, every few seconds: a node changes its endpoints (a
lite map update with a unique port), some nodes drop their connection and come back
(re-register, new poll), a new node registers and an old extra one is deleted through the
API, a node is renamed and a pre-auth key created through the API. Every endpoint change
must reach every node whose poll stayed up from the change until the check (checked after
--grace seconds): "delivered". The server's RSS and open fds are sampled every 10 s.

Reported: delivered / expected per change (all must be delivered within --grace; a miss is
then "late" if it arrived on the same poll by the end of the run, "lost" if that poll is still
up without it, else the node reconnected meanwhile), RSS and fds after the
warm-up (--warmup minutes) and at the end, growth in percent, the server's CPU, one JSON
line. Everything listens on and dials 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import re
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import yaml

from tests.bench.common import (
    VENV_PYTHON,
    BenchError,
    Table,
    cpu_seconds,
    emit_json,
    install_uvloop,
    pipe_commands,
    rss_mib,
    server_process,
    tail,
)
from tests.bench.control import (
    CAPVER,
    Target,
    _cli_api_key,
    _cli_key,
    _common_config,
    _fetch_server_key,
    _ports,
    _rest,
    _wait_health,
)

EXTRA_BASE = 1_000_000  # indices of nodes registered during the run
# The soak's endpoints are 192.0.2.x:port; each change gives its node a port no other
# change used, so the port is the change's marker in a peer's map.
ENDPOINT_PORT = re.compile(rb'192\.0\.2\.\d+:(\d+)"')


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# == simulated nodes (in worker processes) ==================================================


class Node:
    def __init__(self, idx: int) -> None:
        from pyheadscale.noise import generate_private_key
        from pyheadscale.noise.keys import public_key

        self.idx = idx
        self.machine = generate_private_key()
        self.node_pub = public_key(generate_private_key())
        self.disco_pub = public_key(generate_private_key())
        self.conn: Any = None
        self.poll: asyncio.Task[None] | None = None
        self.up_since: float | None = None  # poll open (first map received) since
        self.seen: dict[str, float] = {}  # marker -> when
        self.errors = 0
        self.port = 41641

    def body(self, *, stream: bool, endpoint: str | None = None) -> bytes:
        from pyheadscale.noise.keys import discokey, nodekey

        d: dict[str, Any] = {
            "Version": CAPVER, "NodeKey": nodekey(self.node_pub),
            "DiscoKey": discokey(self.disco_pub), "Compress": "zstd", "KeepAlive": True,
            "Endpoints": [endpoint or f"192.0.2.{1 + self.idx % 250}:{self.port}"],
            "EndpointTypes": [1],
            "Hostinfo": {"Hostname": f"soak-{self.idx}", "OS": "linux",
                         "IPNVersion": "1.102.5", "NetInfo": {"PreferredDERP": 999}},
        }
        if stream:
            d["Stream"] = True
        else:
            d["OmitPeers"] = True
        return json.dumps(d).encode()


class Worker:
    def __init__(self, pipe: Connection, spec: dict[str, Any]) -> None:
        import zstandard

        self.pipe = pipe
        self.url: str = spec["url"]
        self.key: bytes = bytes.fromhex(spec["server_key"])
        self.authkey: str = spec["authkey"]
        self.nodes: dict[int, Node] = {i: Node(i) for i in spec["indices"]}
        self._zstd = zstandard.ZstdDecompressor()
        self.markers: set[str] = set()  # the endpoint ports of the changes under watch
        # marker -> the nodes that had not seen it when its grace period ended: the final
        # pass tells late deliveries from lost ones.
        # Kept with the poll's start: a marker seen only after a reconnect came with a full
        # map, so the delta itself was lost.
        self.missed: dict[str, list[tuple[Node, float | None]]] = {}

    async def run(self) -> None:
        cmds = pipe_commands(self.pipe)
        self.pipe.send(("ready",))
        while True:
            msg = await cmds.get()
            op, args = msg[0], msg[1:]
            if op == "start":
                sem = asyncio.Semaphore(64)
                await asyncio.gather(*(self.join(n, sem) for n in self.nodes.values()))
                self.pipe.send(("started", sum(1 for n in self.nodes.values() if n.up_since)))
            elif op == "watch":
                self.markers.add(args[0])
                self.pipe.send(("ok",))
            elif op == "change":
                n = self.nodes[args[0]]
                status = await self.change(n, args[1])
                self.pipe.send(("changed", status))
            elif op == "reconnect":
                for i in args[0]:
                    if i in self.nodes:
                        asyncio.create_task(self.reconnect(self.nodes[i]))
                self.pipe.send(("ok",))
            elif op == "add":
                n = Node(args[0])
                self.nodes[n.idx] = n
                await self.join(n, asyncio.Semaphore(1))
                self.pipe.send(("added", n.up_since is not None))
            elif op == "drop":  # the node was deleted through the API: stop simulating it
                n2 = self.nodes.pop(args[0], None)
                if n2 is not None:
                    await self.close(n2)
                self.pipe.send(("ok",))
            elif op == "check":
                marker, t_change, changer = args
                expected = [n for n in self.nodes.values() if n.idx != changer
                            and n.up_since is not None and n.up_since <= t_change]
                got = sum(1 for n in expected if marker in n.seen)
                self.missed[marker] = [(n, n.up_since) for n in expected
                                       if marker not in n.seen]
                self.pipe.send(("checked", len(expected), got,
                                sum(n.errors for n in self.nodes.values())))
            elif op == "late":  # the misses: arrived late on the same poll, never, or unknown
                late, lost, moved = [], 0, 0  # moved: the node reconnected meanwhile
                for m, ns in self.missed.items():
                    for n, since in ns:
                        if n.up_since != since:
                            moved += 1
                        elif m in n.seen:
                            late.append(n.seen[m] - args[0][m])
                        else:
                            lost += 1
                self.pipe.send(("late", len(late), lost, moved, max(late, default=0.0)))
            elif op == "stop":
                await asyncio.gather(*(self.close(n) for n in self.nodes.values()))
                self.pipe.send(("stopped",))
                return

    async def join(self, n: Node, sem: asyncio.Semaphore) -> None:
        from pyheadscale.noise.keys import nodekey
        from pyheadscale.testclient import connect

        async with sem:
            try:
                n.conn = await connect(self.url, n.machine, CAPVER, server_public_key=self.key,
                                       dial_timeout=60)
                reg = {"Version": CAPVER, "NodeKey": nodekey(n.node_pub),
                       "Auth": {"AuthKey": self.authkey},
                       "Hostinfo": {"Hostname": f"soak-{n.idx}", "OS": "linux"}}
                status, _, body = await n.conn.request("POST", "/machine/register",
                                                       json.dumps(reg).encode())
                if status != 200 or not json.loads(body).get("MachineAuthorized"):
                    raise BenchError(f"register: {status} {body[:200]!r}")
                first = asyncio.get_running_loop().create_future()
                n.poll = asyncio.create_task(self.poll(n, first))
                await asyncio.wait_for(first, 120)
            except Exception:  # noqa: BLE001 (counted; the soak reports errors)
                n.errors += 1

    async def poll(self, n: Node, first: asyncio.Future[None]) -> None:
        st = await n.conn.open_stream("POST", "/machine/map", n.body(stream=True))
        status, _ = await st.response()
        if status != 200:
            n.errors += 1
            return
        buf = bytearray()
        try:
            async for chunk in st.chunks():
                buf += chunk
                while len(buf) >= 4:
                    size = int.from_bytes(buf[:4], "little")
                    if len(buf) < 4 + size:
                        break
                    frame = bytes(buf[4:4 + size])
                    del buf[:4 + size]
                    if not first.done():
                        n.up_since = time.monotonic()
                        first.set_result(None)
                    if size > 40:  # not a bare keep-alive
                        raw = self._zstd.decompressobj().decompress(frame)
                        for port in ENDPOINT_PORT.findall(raw):
                            m = port.decode()
                            if m in self.markers and m not in n.seen:
                                n.seen[m] = time.monotonic()
        except Exception:  # noqa: BLE001 (the poll ended: reconnect() or an error)
            pass
        n.up_since = None

    async def change(self, n: Node, port: int) -> int:
        """Send the endpoint change once `n` is connected (it may be in a reconnect the soak
        itself started); 0 if it could not be sent within a minute."""
        from pyheadscale.testclient.client import ConnectionClosed

        n.port = port
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if n.conn is not None and not n.conn.closed and n.up_since is not None:
                try:
                    status, _, _ = await n.conn.request("POST", "/machine/map",
                                                        n.body(stream=False))
                    return int(status)
                except ConnectionClosed:  # closed under us by a reconnect: wait for the new one
                    pass
            await asyncio.sleep(0.2)
        return 0

    async def close(self, n: Node) -> None:
        n.up_since = None
        if n.poll is not None:
            n.poll.cancel()
            with contextlib.suppress(BaseException):
                await n.poll
        if n.conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(n.conn.close(), 5)

    async def reconnect(self, n: Node) -> None:
        await self.close(n)
        await self.join(n, asyncio.Semaphore(1))


def worker_entry(pipe: Connection, spec: dict[str, Any]) -> None:
    install_uvloop()
    asyncio.run(Worker(pipe, spec).run())


# == the coordinator ========================================================================


class Workers:
    def __init__(self, target: Target, server_key: str, n: int, workers: int) -> None:
        ctx = mp.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        self.owner: dict[int, int] = {}
        for w in range(workers):
            indices = list(range(w, n, workers))
            for i in indices:
                self.owner[i] = w
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=worker_entry, daemon=True, args=(theirs, {
                "url": target.url, "server_key": server_key, "authkey": target.authkey,
                "indices": indices}))
            p.start()
            self.pipes.append(mine)
            self.procs.append(p)
        for pipe in self.pipes:
            self.recv(pipe, 120)

    @staticmethod
    def recv(pipe: Connection, timeout: float = 120) -> Any:
        if not pipe.poll(timeout):
            raise BenchError(f"worker did not answer within {timeout}s")
        return pipe.recv()

    def all(self, *msg: Any, timeout: float = 600) -> list[Any]:
        for p in self.pipes:
            p.send(msg)
        return [self.recv(p, timeout) for p in self.pipes]

    def one(self, idx: int, *msg: Any) -> Any:
        pipe = self.pipes[self.owner[idx]]
        pipe.send(msg)
        return self.recv(pipe)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.all("stop", timeout=60)
        for p in self.procs:
            p.join(10)


def run_soak(target: Target, server_key: str, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    w = Workers(target, server_key, args.nodes, args.workers)
    try:
        t0 = time.monotonic()
        started = sum(r[1] for r in w.all("start"))
        if started < args.nodes:
            raise BenchError(f"only {started} of {args.nodes} nodes got their first map")
        print(f"{started} nodes polling after {time.monotonic() - t0:.0f}s", flush=True)
        samples: list[tuple[float, float, int]] = []
        changes: list[tuple[str, float, int]] = []
        checked: list[tuple[str, float, int]] = []
        delivered, expected, extra, errors = 0, 0, [], 0
        t_start = time.monotonic()
        end = t_start + args.minutes * 60
        next_sample = next_api = next_reg = time.monotonic()
        step = 0
        while time.monotonic() < end:
            step += 1
            now = time.monotonic()
            if now >= next_sample:
                samples.append((now - t_start, rss_mib(target.pids[0]), _fds(target.pids[0])))
                next_sample = now + 10
            # An endpoint change, watched for by everyone.
            who = rng.randrange(args.nodes)
            port = 20000 + step % 40000
            marker = str(port)
            w.all("watch", marker)
            t_change = time.monotonic()
            if w.one(who, "change", who, port)[1] != 200:
                errors += 1
            changes.append((marker, t_change, who))
            # Reconnects.
            w.all("reconnect", rng.sample(range(args.nodes), args.reconnects))
            # Registrations, deletions and other API writes.
            if now >= next_reg:
                idx = EXTRA_BASE + step
                w.owner[idx] = step % len(w.pipes)
                if w.one(idx, "add", idx)[1]:
                    extra.append(idx)
                if len(extra) > 3:
                    gone = extra.pop(0)
                    _delete_node(target, f"soak-{gone}")
                    w.one(gone, "drop", gone)
                next_reg = now + 20
            if now >= next_api:
                _api_writes(target, rng, args.nodes)
                next_api = now + 10
            # Check the changes whose grace period is over.
            while changes and time.monotonic() - changes[0][1] > args.grace:
                m, t, by = changes.pop(0)
                checked.append((m, t, by))
                for _, exp, got, errs in w.all("check", m, t, by):
                    expected += exp
                    delivered += got
                    errors = max(errors, errs)
            time.sleep(max(0.0, args.interval - (time.monotonic() - now)))
        time.sleep(args.grace)
        for m, t, by in changes:
            checked.append((m, t, by))
            for _, exp, got, _errs in w.all("check", m, t, by):
                expected += exp
                delivered += got
        samples.append((time.monotonic() - t_start, rss_mib(target.pids[0]), _fds(target.pids[0])))
        time.sleep(args.grace)  # a last chance for late deliveries, then count them
        t_of = {m: t for m, t, _ in checked}
        late, lost, moved, late_max = 0, 0, 0, 0.0
        for _, n_late, n_lost, n_moved, worst in w.all("late", t_of):
            late, lost, moved = late + n_late, lost + n_lost, moved + n_moved
            late_max = max(late_max, worst)
    finally:
        w.stop()
    warm = [s for s in samples if s[0] >= args.warmup * 60] or samples
    return {"nodes": args.nodes, "minutes": args.minutes, "changes": step,
            "delivered": delivered, "expected": expected, "errors": errors,
            "late": late, "lost": lost, "missed_then_reconnected": moved,
            "late_max_s": round(late_max, 1),
            "rss_warm_mib": round(warm[0][1], 1), "rss_end_mib": round(samples[-1][1], 1),
            "rss_max_mib": round(max(s[1] for s in warm), 1),
            "rss_growth_pct": round(100 * (samples[-1][1] - warm[0][1]) / warm[0][1], 1),
            "fds_warm": warm[0][2], "fds_end": samples[-1][2],
            "fds_max": max(s[2] for s in warm), "samples": samples}


def _delete_node(target: Target, name: str) -> None:
    status, body = _rest(target, "GET", "/api/v1/node")
    for n in (body.get("nodes") or []) if isinstance(body, dict) else []:
        if n.get("givenName") == name or n.get("name") == name:
            _rest(target, "DELETE", f"/api/v1/node/{n['id']}")


def _api_writes(target: Target, rng: random.Random, n: int) -> None:
    status, body = _rest(target, "GET", "/api/v1/node")
    nodes = (body.get("nodes") or []) if isinstance(body, dict) else []
    if nodes:
        pick = rng.choice(nodes)
        _rest(target, "POST", f"/api/v1/node/{pick['id']}/rename/renamed-{rng.randrange(10**6)}")
    _rest(target, "POST", "/api/v1/preauthkey", {"user": "1", "expiration":
                                                  "2099-01-01T00:00:00Z"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--warmup", type=float, default=5, help="minutes before the baseline")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--interval", type=float, default=2.0, help="seconds between churn steps")
    ap.add_argument("--reconnects", type=int, default=3, help="nodes reconnecting per step")
    ap.add_argument("--grace", type=float, default=30, help="seconds for a change to arrive")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--log-level", default="warn")
    args = ap.parse_args()
    args.batch_delay_ms = None  # the control benchmark's knob: the server default here
    with tempfile.TemporaryDirectory(prefix="pyhs-soak-") as d:
        work = Path(d)
        p = _ports()
        cfg = _common_config(work, p, args)
        cfg["data_dir"] = str(work / "data")
        cfg_path = work / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        log = work / "server.log"
        argv = [str(VENV_PYTHON), "-m", "pyheadscale", "-c", str(cfg_path), "serve"]
        with server_process(argv, log, env={"PYTHONUNBUFFERED": "1"}, cwd=work) as proc:
            _wait_health(cfg["server_url"], proc, log)
            cli = [str(VENV_PYTHON), "-m", "pyheadscale", "-c", str(cfg_path)]
            target = Target("pyheadscale", [cfg["server_url"]], [proc.pid], _cli_key(cli))
            target.api_key = _cli_api_key(cli)
            try:
                res = run_soak(target, _fetch_server_key(target.url), args)
            except BenchError as e:
                raise BenchError(f"{e}\nserver log:\n{tail(log)}") from None
            res["server_cpu_s"] = round(cpu_seconds(proc.pid), 1)
    t = Table(["figure", "value"], [])
    for k in ("nodes", "minutes", "changes", "delivered", "expected", "late", "lost",
              "missed_then_reconnected", "late_max_s", "errors", "rss_warm_mib",
              "rss_end_mib", "rss_max_mib", "rss_growth_pct", "fds_warm", "fds_end",
              "fds_max", "server_cpu_s"):
        t.rows.append([k, res[k]])
    print(t.render())
    samples = res.pop("samples")
    res["rss_series_mib"] = [round(s[1]) for s in samples[:: max(1, len(samples) // 30)]]
    emit_json(res)


if __name__ == "__main__":
    main()
