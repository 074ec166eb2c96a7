"""Control-plane benchmark: N simulated nodes against pyheadscale, then Headscale, same run.

    python -m tests.bench.control                 # 1,000 nodes
    python -m tests.bench.control --size 5k       # or 10k, or --nodes N

Each simulated node has its own machine key (its own Noise connection), node key and disco key.
It registers with a reusable pre-auth key and holds a streaming map poll, counting frames.
Then one node sends lite map updates with new Endpoints, and every other poll times the frame
that carries the new endpoint. Per server the report gives: the time until all N polls had
their first map (and until all registered), the endpoint change's fan-out latency (p50/p99
over the N-1 receivers, all rounds pooled), the server's CPU seconds and peak RSS from /proc,
and pyheadscale/Headscale ratios. The last line is one JSON object.

Then the policy phase (--policy-rules R, default 200; 0 skips it; both servers run with
`policy.mode: database` and no policy, i.e. allow-all, until then): the R-rule policy from
tests.bench.policy.make_policy() (the same text for both servers; the users it names are
created first) is set with PUT /api/v1/policy, timing (1) the call (validate + compile +
store) and (2) until every poll received a frame with a PacketFilter (p50/p99 over all polls,
a poll that got none counting as never); then (3) one node is tagged (POST
/api/v1/node/ID/tags, a policy-relevant change: the node leaves its user and
autogroup:member) and each poll's next non-keepalive frame is timed (p50/p99 over the viewers
that got one; how many also saw the tag is reported). Each step is bounded by
--policy-timeout. The totals above (server CPU, peak RSS) stop before this phase.

Then, with --restart, the restart phase: the server is stopped with SIGTERM (a clean
shutdown) and started again on the same configuration and database while every node holds
its poll; each node re-opens its poll with the same machine and node key and no new
registration (as tailscaled does), retrying with backoff and jitter (1 s doubling to 8 s,
x0.5-1.5) while the server is down. Timed: SIGTERM to the new process's /health, and from
then until every poll has a map from the new process (p50 and all), the new process's CPU
over that storm and how many nodes failed (a server that forgot a node answers 404).

The nodes run in several client processes (multiprocessing; uvloop when installed). They only
do what the measurement needs: frames are split by their length prefix, and decompressed and
searched only while an endpoint change is awaited (no JSON parsing). Client CPU is reported
next to the wall time of each phase, so a client-bound phase can be told apart.
Everything listens on and dials 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import yaml

from pyheadscale.config.default import embedded_default
from tests.bench import build_go
from tests.bench.common import (
    LOOPBACK,
    REPO,
    VENV_PYTHON,
    BenchError,
    Table,
    cpu_seconds,
    emit_json,
    install_uvloop,
    machine_info,
    main_thread_cpu_seconds,
    peak_rss_mib,
    percentile,
    pipe_commands,
    ratio,
    rnd,
    server_process,
    tail,
)
from tests.bench.policy import make_policy, user_names
from tests.integration.server import deep_merge
from tests.netutil import free_port

SIZES = {"1k": 1000, "5k": 5000, "10k": 10000}
CAPVER = 142  # Tailscale v1.102
ZERO_NODEKEY = "nodekey:" + "00" * 32
USER = "bench"
MAX_RESTARTS = 5
# A poll that cannot be re-opened (server down, e.g. the --restart phase) is retried with
# backoff for this long, as tailscaled keeps retrying; then the node counts as failed.
REPOLL_GIVE_UP_S = 300.0


# == simulated nodes (run inside worker processes) =========================================


@dataclass
class SimNode:
    idx: int
    machine_priv: bytes
    node_pub: bytes
    disco_pub: bytes
    conn: Any = None
    t_registered: float | None = None
    t_first_map: float | None = None
    t_poll_map: float | None = None  # the first frame of the newest poll
    fresh: bool = True  # the newest poll has not had a frame yet
    frames: int = 0
    seen: dict[int, float] = field(default_factory=dict)  # change round -> receive time
    hit: dict[int, float] = field(default_factory=dict)  # round -> marker time (any-frame mode)
    error: str | None = None
    restarts: int = 0
    refused: int = 0  # re-polls the server answered with an HTTP error (e.g. 503 busy)

    def hostinfo(self) -> dict[str, Any]:
        return {"Hostname": f"bench-{self.idx}", "OS": "linux", "IPNVersion": "1.102.5",
                "GoVersion": "go1.26", "NetInfo": {"PreferredDERP": 999}}

    def map_request(self, *, stream: bool, endpoints: list[str]) -> bytes:
        from pyheadscale.noise.keys import discokey, nodekey

        body: dict[str, Any] = {
            "Version": CAPVER, "NodeKey": nodekey(self.node_pub),
            "DiscoKey": discokey(self.disco_pub), "Compress": "zstd", "KeepAlive": True,
            "Endpoints": endpoints, "EndpointTypes": [1] * len(endpoints),
            "Hostinfo": self.hostinfo(),
        }
        if stream:
            body["Stream"] = True
        else:
            body["OmitPeers"] = True
        return json.dumps(body).encode()


class PollRefused(BenchError):
    """The server answered a map poll with a status other than 200."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"map poll: HTTP {status} {body[:200]!r}")
        self.status = status


def _endpoint(idx: int, rnd_: int = 0) -> str:
    # Documentation addresses: map data only, never dialled.
    return f"192.0.2.{1 + idx % 250}:{41641 + rnd_}"


class Worker:
    """The nodes of one client process and the commands the coordinator sends it."""

    def __init__(self, pipe: Connection, spec: dict[str, Any]) -> None:
        self.pipe = pipe
        self.spec = spec
        self.url: str = spec["url"]
        self.server_key: bytes = bytes.fromhex(spec["server_key"])
        self.nodes: list[SimNode] = []
        # (round, marker, any_frame): with any_frame the first frame that is not a keepalive
        # counts (and the marker is timed on its own); otherwise the first one with the marker.
        self.armed: tuple[int, bytes, bool] | None = None
        self.last_frame = 0.0
        self.tasks: list[asyncio.Task[None]] = []
        import zstandard

        self._zstd = zstandard.ZstdDecompressor()

    def make_nodes(self) -> None:
        from nacl.public import PrivateKey

        from pyheadscale.noise import generate_private_key

        for idx in self.spec["indices"]:
            self.nodes.append(SimNode(
                idx, generate_private_key(), bytes(PrivateKey.generate().public_key),
                bytes(PrivateKey.generate().public_key)))

    async def run(self) -> None:
        cmds = pipe_commands(self.pipe)
        self.make_nodes()
        self.pipe.send(("ready", len(self.nodes)))
        while True:
            msg = await cmds.get()
            op = msg[0]
            if op == "go":
                sem = asyncio.Semaphore(self.spec["concurrency"])
                self.tasks = [asyncio.create_task(self.node_main(n, sem)) for n in self.nodes]
            elif op == "status":
                self.pipe.send(self.status())
            elif op == "remaps":
                since = msg[1]
                self.pipe.send(("remaps", [n.t_poll_map for n in self.nodes
                                           if n.t_poll_map is not None and n.t_poll_map > since],
                                sum(1 for n in self.nodes if n.error), self.cpu()))
            elif op == "arm":
                self.armed = (msg[1], msg[2], msg[3] if len(msg) > 3 else False)
                self.pipe.send(("armed",))
            elif op == "change":
                self.pipe.send(await self.change(msg[1], msg[2]))
            elif op == "collect":
                rnd_ = msg[1]
                # Node 0 sends the endpoint changes; in the policy rounds every poll receives.
                polls = [n for n in self.nodes if n.idx != 0 or (len(msg) > 2 and msg[2])]
                recv = [n.seen[rnd_] for n in polls if rnd_ in n.seen]
                missing = sum(1 for n in polls if rnd_ not in n.seen)
                hits = [n.hit[rnd_] for n in polls if rnd_ in n.hit]
                self.pipe.send(("collected", recv, missing, hits))
            elif op == "stop":
                await self.stop()
                self.pipe.send(("stopped", self.cpu()))
                return

    def cpu(self) -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    def status(self) -> tuple[Any, ...]:
        return ("status", {
            "registered": [n.t_registered for n in self.nodes if n.t_registered is not None],
            "first_maps": [n.t_first_map for n in self.nodes if n.t_first_map is not None],
            "errors": [f"node {n.idx}: {n.error}" for n in self.nodes if n.error][:5],
            "n_errors": sum(1 for n in self.nodes if n.error),
            "frames": sum(n.frames for n in self.nodes),
            "restarts": sum(n.restarts for n in self.nodes),
            "refused": sum(n.refused for n in self.nodes),
            "failed_before_first": sum(1 for n in self.nodes
                                       if n.error and n.t_first_map is None),
            "last_frame": self.last_frame,
            "cpu": self.cpu(),
        })

    async def node_main(self, n: SimNode, sem: asyncio.Semaphore) -> None:
        from pyheadscale.noise.keys import nodekey
        from pyheadscale.testclient import connect

        try:
            async with sem:
                n.conn = await connect(self.url, n.machine_priv, CAPVER,
                                       server_public_key=self.server_key, dial_timeout=60)
                reg = {"Version": CAPVER, "NodeKey": nodekey(n.node_pub),
                       "OldNodeKey": ZERO_NODEKEY, "Auth": {"AuthKey": self.spec["authkey"]},
                       "Expiry": "0001-01-01T00:00:00Z", "Followup": "",
                       "Hostinfo": n.hostinfo()}
                status, _, body = await n.conn.request("POST", "/machine/register",
                                                       json.dumps(reg).encode())
                resp = json.loads(body) if status == 200 else {}
                if status != 200 or resp.get("Error") or not resp.get("MachineAuthorized"):
                    raise BenchError(f"register: HTTP {status} {body[:200]!r}")
                n.t_registered = time.monotonic()
                chunks = await self.open_poll(n)
                buf = bytearray()
                # Hold the slot until the first map arrived: bounds the registrations in flight.
                while n.t_first_map is None:
                    buf += await chunks.__anext__()
                    self.frames_in(n, buf)
        except asyncio.CancelledError:
            raise
        except StopAsyncIteration:
            n.error = "map stream ended before the first map"
            return
        except Exception as e:  # a failed node is reported, the others go on
            n.error = f"{type(e).__name__}: {e}"[:300]
            return
        # Like tailscaled, poll again when the server ends the stream (e.g. Headscale drops
        # sessions it thinks are stale); every restart is counted and reported.
        while True:
            try:
                async for chunk in chunks:
                    buf += chunk
                    self.frames_in(n, buf)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                n.error = f"{type(e).__name__}: {e}"[:300]
            if n.restarts >= MAX_RESTARTS:
                n.error = f"map stream ended {n.restarts + 1} times; {n.error or ''}"
                return
            n.restarts += 1
            got = await self.repoll(n)
            if got is None:
                return
            chunks, buf = got, bytearray()

    async def repoll(self, n: SimNode) -> Any:
        """Open a new poll on the same node key (no registration: a server that forgot the
        node answers 404 and the node fails). Retried for up to REPOLL_GIVE_UP_S the way
        tailscaled's map loop does: after the k-th failure in a row it waits k squared x 10
        ms (at most 30 s) x a random 0.5-1.5, and a refused poll (an HTTP status) is asked
        again on the same Noise connection; only a broken connection is dialled anew."""
        from pyheadscale.testclient import connect

        give_up = time.monotonic() + REPOLL_GIVE_UP_S
        failures = 1  # the stream that just ended
        while True:
            delay = min(failures * failures * 0.01, 30.0)
            await asyncio.sleep(delay * (0.5 + random.random()))
            try:
                if n.conn is None or n.conn.closed:
                    n.conn = await connect(self.url, n.machine_priv, CAPVER,
                                           server_public_key=self.server_key, dial_timeout=60)
                n.fresh = True
                chunks = await self.open_poll(n)
                n.error = None
                return chunks
            except asyncio.CancelledError:
                raise
            except Exception as e:
                n.error = f"re-poll: {type(e).__name__}: {e}"[:300]
                if isinstance(e, PollRefused):
                    if e.status == 404:
                        return None  # the server forgot the node: no re-auth here
                    n.refused += 1
                elif n.conn is not None:
                    if not n.conn.closed:
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(n.conn.close(), 5)
                    n.conn = None
                if time.monotonic() >= give_up:
                    return None
                failures += 1

    async def open_poll(self, n: SimNode) -> Any:
        st = await n.conn.open_stream(
            "POST", "/machine/map", n.map_request(stream=True, endpoints=[_endpoint(n.idx)]))
        status, _ = await st.response()
        if status != 200:
            raise PollRefused(status, await st.read())
        return st.chunks().__aiter__()

    def frames_in(self, n: SimNode, buf: bytearray) -> None:
        while len(buf) >= 4:
            size = int.from_bytes(buf[:4], "little")
            if len(buf) < 4 + size:
                return
            now = time.monotonic()
            n.frames += 1
            # Keepalives do not count as activity: at 10k polls some arrive every few ms,
            # so "no frame for --quiet-s" would never hold once their timers drift apart.
            if size >= KEEPALIVE_MAX or not self.keepalive(bytes(buf[4 : 4 + size])):
                self.last_frame = now
            if n.fresh:
                n.fresh = False
                n.t_poll_map = now
            if n.t_first_map is None:
                n.t_first_map = now
            elif self.armed is not None:
                self.watch(n, bytes(buf[4 : 4 + size]), now)
            del buf[: 4 + size]

    def watch(self, n: SimNode, frame: bytes, now: float) -> None:
        assert self.armed is not None
        rnd_, marker, any_frame = self.armed
        if rnd_ in n.seen and (not any_frame or rnd_ in n.hit):
            return
        # A message may be several zstd frames back to back (shared filter parts).
        raw = self._zstd.decompressobj(read_across_frames=True).decompress(frame)
        if any_frame:
            # Keepalives are not a reaction to the change.
            if rnd_ not in n.seen and not _is_keepalive(raw):
                n.seen[rnd_] = now
            if marker in raw and rnd_ not in n.hit:
                n.hit[rnd_] = now
        elif marker in raw:
            n.seen[rnd_] = now

    def keepalive(self, frame: bytes) -> bool:
        return _is_keepalive(self._zstd.decompressobj().decompress(frame))

    async def change(self, rnd_: int, endpoint: str) -> tuple[Any, ...]:
        n = next(x for x in self.nodes if x.idx == 0)
        body = n.map_request(stream=False, endpoints=[endpoint])
        t_send = time.monotonic()
        status, _, _ = await n.conn.request("POST", "/machine/map", body)
        return ("changed", t_send, time.monotonic(), status)

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(BaseException):
                await t

        async def close(n: SimNode) -> None:
            if n.conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(n.conn.close(), 5)

        await asyncio.gather(*(close(n) for n in self.nodes))


def worker_entry(pipe: Connection, spec: dict[str, Any]) -> None:
    install_uvloop()
    asyncio.run(Worker(pipe, spec).run())


# == the coordinator ========================================================================


@dataclass
class Target:
    """A running control server under test: one process, or several instances of one
    tailnet (client worker w dials urls[w % K]; CPU and RSS are summed over them)."""

    name: str
    urls: list[str]
    pids: list[int]
    authkey: str
    api_key: str = ""  # for the REST calls of the policy phase
    # --restart: stop the server (SIGTERM, a clean shutdown), start it again on the same
    # configuration and database, return once it answers /health (updates pids).
    restart: Callable[[], None] | None = None
    metrics_url: str = ""  # the server's /metrics (what the restart phase counts)

    @property
    def url(self) -> str:
        return self.urls[0]

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids)

    def main_thread_cpu(self) -> float:
        """The servers' event loop threads (a Python server's other thread is the DB's)."""
        return sum(main_thread_cpu_seconds(p) for p in self.pids)

    def peak_rss(self) -> float:
        return sum(peak_rss_mib(p) for p in self.pids)


def _fetch_server_key(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{url}/key?v={CAPVER}", timeout=10) as r:
        pub = json.loads(r.read())["publicKey"]
    from pyheadscale.noise.keys import MACHINE_PREFIX, parse_key

    return parse_key(MACHINE_PREFIX, pub).hex()


class Clients:
    """W worker processes sharing the N nodes."""

    def __init__(self, target: Target, n: int, workers: int, concurrency: int) -> None:
        ctx = mp.get_context("spawn")
        spec_base = {"server_key": _fetch_server_key(target.url),
                     "authkey": target.authkey, "concurrency": concurrency}
        self.procs: list[Any] = []
        self.pipes: list[Connection] = []
        self.owner_of_0 = 0
        for w in range(workers):
            indices = list(range(w, n, workers))
            mine, theirs = ctx.Pipe()
            spec = {**spec_base, "indices": indices, "url": target.urls[w % len(target.urls)]}
            p = ctx.Process(target=worker_entry, args=(theirs, spec), daemon=True)
            p.start()
            self.procs.append(p)
            self.pipes.append(mine)
        for pipe in self.pipes:
            self._recv(pipe, 120)

    def _recv(self, pipe: Connection, timeout: float) -> Any:
        if not pipe.poll(timeout):
            raise BenchError(f"client worker did not answer within {timeout}s")
        return pipe.recv()

    def ask(self, msg: tuple[Any, ...], timeout: float = 60) -> list[Any]:
        for pipe in self.pipes:
            pipe.send(msg)
        return [self._recv(pipe, timeout) for pipe in self.pipes]

    def go(self) -> float:
        t0 = time.monotonic()
        for pipe in self.pipes:
            pipe.send(("go",))
        return t0

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"registered": [], "first_maps": [], "errors": [], "n_errors": 0,
                               "frames": 0, "last_frame": 0.0, "cpu": 0.0, "restarts": 0,
                               "refused": 0, "failed_before_first": 0}
        for _, st in self.ask(("status",)):
            out["registered"] += st["registered"]
            out["first_maps"] += st["first_maps"]
            out["errors"] += st["errors"]
            out["n_errors"] += st["n_errors"]
            out["frames"] += st["frames"]
            out["restarts"] += st["restarts"]
            out["refused"] += st["refused"]
            out["failed_before_first"] += st["failed_before_first"]
            out["last_frame"] = max(out["last_frame"], st["last_frame"])
            out["cpu"] += st["cpu"]
        return out

    def change(self, rnd_: int, endpoint: str) -> tuple[float, float, int]:
        pipe = self.pipes[self.owner_of_0]
        pipe.send(("change", rnd_, endpoint))
        _, t_send, t_done, status = self._recv(pipe, 60)
        return t_send, t_done, status

    def stop(self) -> float:
        cpu = 0.0
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop",))
        for pipe in self.pipes:
            with contextlib.suppress(Exception):
                cpu += self._recv(pipe, 60)[1]
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
        return cpu


def run_load(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """Drive one server; returns its figures."""
    n = args.nodes
    clients = Clients(target, n, args.workers, args.concurrency)
    try:
        cpu0 = target.cpu()
        main0 = target.main_thread_cpu()
        t0 = clients.go()
        deadline = t0 + args.timeout
        st = clients.status()
        while time.monotonic() < deadline:
            time.sleep(0.5)
            st = clients.status()
            done = len(st["first_maps"]) + st["failed_before_first"]
            if args.verbose:
                print(f"  [{target.name}] {time.monotonic() - t0:6.1f}s registered "
                      f"{len(st['registered'])} first maps {len(st['first_maps'])} "
                      f"errors {st['n_errors']}", flush=True)
            if done >= n:
                break
        t_first = time.monotonic()
        if not st["first_maps"]:
            raise BenchError(f"{target.name}: no poll got a first map within {args.timeout}s; "
                             f"errors: {st['errors']}")
        complete = len(st["first_maps"]) == n
        if not complete:
            print(f"  [{target.name}] only {len(st['first_maps'])}/{n} polls got a first map "
                  f"within {args.timeout}s; errors: {st['errors']}", flush=True)
        all_registered = max(st["registered"]) - t0 if len(st["registered"]) == n else None
        all_first = max(st["first_maps"]) - t0 if complete else None
        first_p50 = percentile([t - t0 for t in st["first_maps"]], 50)
        client_cpu_join = st["cpu"]
        st_join = st
        cpu_join = target.cpu() - cpu0
        main_join = target.main_thread_cpu() - main0
        wall_join = t_first - t0

        # Let the peer-update storm of the joins die down before timing a single change.
        quiet = args.quiet_s
        settle_deadline = time.monotonic() + args.timeout
        while time.monotonic() < settle_deadline:
            st = clients.status()
            if time.monotonic() - st["last_frame"] >= quiet:
                break
            time.sleep(0.25)
        settled = st["last_frame"] - t0
        frames_join = st["frames"]
        counts_join = _server_counts(target)
        cpu_settle = target.cpu() - cpu0

        lat: list[float] = []
        rounds = []
        cpu_c0 = target.cpu()
        client_c0 = clients.status()["cpu"]
        for r in range(1, args.changes + 1):
            endpoint = _endpoint(0, 1000 + r)
            clients.ask(("arm", r, f'"{endpoint}"'.encode()))
            t_send, t_done, status = clients.change(r, endpoint)
            if status != 200:
                raise BenchError(f"{target.name}: lite update answered HTTP {status}")
            recv: list[float] = []
            missing = n - 1
            wait_until = time.monotonic() + args.change_timeout
            while time.monotonic() < wait_until:
                time.sleep(0.1)
                recv = []
                missing = 0
                for _, times, miss, _ in clients.ask(("collect", r)):
                    recv += times
                    missing += miss
                if missing == 0:
                    break
            d = [t - t_send for t in recv]
            lat += d
            rounds.append({"round": r, "received": len(d), "missing": missing,
                           "p50_s": rnd(percentile(d, 50)), "max_s": rnd(max(d, default=None)),
                           "reply_s": rnd(t_done - t_send)})
            time.sleep(args.quiet_s)
        cpu_changes = target.cpu() - cpu_c0
        client_cpu_changes = clients.status()["cpu"] - client_c0
        # Totals before the policy phase, so they stay comparable with runs without it.
        cpu_total = target.cpu() - cpu0
        rss = target.peak_rss()
        pol = run_policy(target, clients, args) if args.policy_rules else {}
        if args.restart:
            pol |= run_restart(target, clients, args)
        final = clients.status()
    finally:
        client_cpu_total = clients.stop()
    return {
        "nodes": n,
        "all_registered_s": rnd(all_registered, 3),
        "all_first_maps_s": rnd(all_first, 3),
        "first_map_p50_s": rnd(first_p50, 3),
        "first_maps_received": len(st_join["first_maps"]),
        "join_server_cpu_s": rnd(cpu_join, 2),
        "join_server_main_thread_cpu_s": rnd(main_join, 2),
        "join_client_cpu_s": rnd(client_cpu_join, 2),
        "join_wall_s": rnd(wall_join, 2),
        "settled_s": rnd(settled, 3),
        "frames_until_settled": frames_join,
        "join_counts": counts_join,
        "settle_server_cpu_s": rnd(cpu_settle, 2),
        "endpoint_change_p50_s": rnd(percentile(lat, 50)),
        "endpoint_change_p99_s": rnd(percentile(lat, 99)),
        "endpoint_change_max_s": rnd(max(lat, default=None)),
        "endpoint_change_receivers": len(lat),
        "endpoint_change_missing": sum(r["missing"] for r in rounds),
        "change_rounds": rounds,
        "changes_server_cpu_s": rnd(cpu_changes, 2),
        "changes_client_cpu_s": rnd(client_cpu_changes, 2),
        "server_cpu_s": rnd(cpu_total, 2),
        "server_peak_rss_mib": rnd(rss, 1),
        "frames_total": final["frames"],
        "client_cpu_s": rnd(client_cpu_total, 2),
        "node_errors": final["n_errors"],
        "node_error_samples": final["errors"][:5],
        "poll_restarts": final["restarts"],
        "polls_refused": final["refused"],
    } | pol


# == the policy phase =======================================================================

POLICY_ROUND = 1001
TAG_ROUND = 1002
TAG = "tag:t0"  # owned by group:g0 in make_policy(); referenced by rules of every policy size


def policy_users() -> list[str]:
    """The users the generated policy names: the benchmark's own user (which owns every
    simulated node, so rules naming it or its groups select real nodes) and user2..user50."""
    return [USER, *user_names()[1:]]


def _rest(target: Target, method: str, path: str, body: Any = None,
          timeout: float = 60) -> tuple[int, Any]:
    """One Headscale-shaped REST call with the server's API key; (status, JSON or text)."""
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{target.url}{path}", data=data, method=method, headers={
        "Authorization": f"Bearer {target.api_key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")[:500]


def _collect(clients: Clients, rnd_: int) -> tuple[list[float], int, list[float]]:
    recv: list[float] = []
    hits: list[float] = []
    missing = 0
    for _, times, miss, hit in clients.ask(("collect", rnd_, True)):
        recv += times
        hits += hit
        missing += miss
    return recv, missing, hits


def _quiet(clients: Clients, target: Target, quiet: float, deadline: float,
           until: Any = None) -> bool:
    """Wait until no poll got a frame and the server used under a tenth of a core for `quiet`
    seconds (and `until()`, if given, holds); False at the deadline. The CPU test matters
    for a server that works through the polls one by one, more than `quiet` apart."""
    samples: list[tuple[float, float]] = []
    while True:
        now = time.monotonic()
        samples.append((now, target.cpu()))
        while len(samples) > 1 and samples[1][0] <= now - quiet:
            samples.pop(0)
        idle = (samples[0][0] <= now - quiet
                and samples[-1][1] - samples[0][1] < 0.1 * (now - samples[0][0]))
        if (idle and now - clients.status()["last_frame"] >= quiet
                and (until is None or until())):
            return True
        if now >= deadline:
            return False
        time.sleep(0.25)


KEEPALIVE_MAX = 200  # bytes: a keepalive frame, compressed or not, is smaller


def _is_keepalive(raw: bytes) -> bool:
    """A keepalive carries nothing else (pyheadscale: {"KeepAlive":true}; Headscale the same
    plus empty fields)."""
    return len(raw) < KEEPALIVE_MAX and b'"KeepAlive":true' in raw


def _pct_all(d: list[float], missing: int, q: float) -> float | None:
    """Percentile over every poll, a missing one counting as never: None if it falls there."""
    v = percentile(d + [float("inf")] * missing, q)
    return None if v is None or v == float("inf") else rnd(v)


def run_policy(target: Target, clients: Clients, args: argparse.Namespace) -> dict[str, Any]:
    """Set the generated policy over REST, time its fan-out, then tag one node and time that.

    Both calls go to the REST API, not the CLI: the CLI's own start-up (a Python interpreter
    for pyheadscale, a Go binary for Headscale) would dominate and differ between the two.
    Each step is bounded by --policy-timeout; the tag step is skipped when the policy had
    not reached every poll by then (the server would still be busy with it)."""
    timeout = args.policy_timeout
    cpu0 = target.cpu()
    frames0 = clients.status()["frames"]

    # (1) + (2): the call (validate + compile + store), then every poll's new PacketFilter.
    clients.ask(("arm", POLICY_ROUND, b'"PacketFilter', False))
    t_send = time.monotonic()
    status, body = _rest(target, "PUT", "/api/v1/policy", {"policy": args.policy_text},
                         timeout=timeout)
    t_reply = time.monotonic()
    if status != 200:
        raise BenchError(f"{target.name}: PUT /api/v1/policy answered HTTP {status}: "
                         f"{str(body)[:1000]}")
    deadline = t_send + timeout
    recv, missing, _ = _collect(clients, POLICY_ROUND)
    while missing and time.monotonic() < deadline:
        time.sleep(0.1)
        recv, missing, _ = _collect(clients, POLICY_ROUND)
    d_pol = [t - t_send for t in recv]
    res: dict[str, Any] = {
        "policy_rules": args.policy_rules,
        "policy_bytes": len(args.policy_text),
        "policy_set_s": rnd(t_reply - t_send),
        "policy_all_filters_s": rnd(max(d_pol)) if d_pol and not missing else None,
        "policy_filter_p50_s": _pct_all(d_pol, missing, 50),
        "policy_filter_p99_s": _pct_all(d_pol, missing, 99),
        "policy_filter_receivers": len(d_pol),
        "policy_filter_missing": missing,
    }
    settled = _quiet(clients, target, args.quiet_s, time.monotonic() + timeout)
    res |= {"policy_frames": clients.status()["frames"] - frames0,
            "policy_server_cpu_s": rnd(target.cpu() - cpu0, 2),
            "policy_phase_peak_rss_mib": rnd(target.peak_rss(), 1)}
    if missing or not settled:
        print(f"  [{target.name}] policy not on every poll ({missing} missing) or server "
              f"still busy after {timeout:g}s: tag step skipped", flush=True)
        res["tag_skipped"] = True
        return res

    # (3): one node becomes tagged (it leaves its user and autogroup:member and joins TAG).
    # Which viewers are affected depends on the policy and on how precisely a server works
    # out deltas, so the step ends when polls and server have been quiet for --quiet-s.
    status, body = _rest(target, "GET", "/api/v1/node", timeout=timeout)
    if status != 200 or not isinstance(body, dict) or not body.get("nodes"):
        raise BenchError(f"{target.name}: GET /api/v1/node answered HTTP {status}: "
                         f"{str(body)[:500]}")
    node_id = min(int(nd["id"]) for nd in body["nodes"])
    cpu1 = target.cpu()
    frames1 = clients.status()["frames"]
    clients.ask(("arm", TAG_ROUND, f'"{TAG}"'.encode(), True))
    t_tag = time.monotonic()
    status, body = _rest(target, "POST", f"/api/v1/node/{node_id}/tags", {"tags": [TAG]},
                         timeout=timeout)
    t_tag_reply = time.monotonic()
    if status != 200:
        raise BenchError(f"{target.name}: POST /api/v1/node/{node_id}/tags answered HTTP "
                         f"{status}: {str(body)[:500]}")
    done = _quiet(clients, target, args.quiet_s, t_tag + timeout,
                  until=lambda: bool(_collect(clients, TAG_ROUND)[0]))
    tag_recv, _, tag_hits = _collect(clients, TAG_ROUND)
    d_tag = [t - t_tag for t in tag_recv]
    d_hit = [t - t_tag for t in tag_hits]
    return res | {
        "tag_node_id": node_id,
        "tag_set_s": rnd(t_tag_reply - t_tag),
        "tag_change_p50_s": rnd(percentile(d_tag, 50)),
        "tag_change_p99_s": rnd(percentile(d_tag, 99)),
        "tag_change_max_s": rnd(max(d_tag, default=None)),
        "tag_change_receivers": len(d_tag),
        "tag_seen_by": len(d_hit),
        "tag_seen_p50_s": rnd(percentile(d_hit, 50)),
        "tag_frames": clients.status()["frames"] - frames1,
        "tag_server_cpu_s": rnd(target.cpu() - cpu1, 2),
        "tag_settled": done,
        "policy_phase_peak_rss_mib": rnd(target.peak_rss(), 1),
    }


# == the restart phase ======================================================================


def run_restart(target: Target, clients: Clients, args: argparse.Namespace) -> dict[str, Any]:
    """Restart the server under every mapped poll and time the reconnect storm: each node
    re-opens its poll on the same node key (no registration), retrying with backoff while
    the server is down, until each has a map from the new process."""
    if target.restart is None:
        print(f"  [{target.name}] --restart: not supported for this target", flush=True)
        return {"restart_skipped": True}
    n = args.nodes
    t_stop = time.monotonic()
    target.restart()
    t_up = time.monotonic()
    cpu0 = target.cpu()  # the new process's start-up until /health answered
    deadline = t_up + args.timeout
    got: list[float] = []
    errors = 0
    while time.monotonic() < deadline:
        time.sleep(0.5)
        got, errors = [], 0
        for _, times, errs, _ in clients.ask(("remaps", t_stop)):
            got += times
            errors += errs
        if args.verbose:
            print(f"  [{target.name}] restart +{time.monotonic() - t_up:6.1f}s: "
                  f"{len(got)}/{n} polls have a new map", flush=True)
        if len(got) >= n:
            break
    d = [t - t_up for t in got]
    return {
        "restart_counts": _server_counts(target),
        "restart_down_s": rnd(t_up - t_stop, 3),  # SIGTERM .. the new process's /health
        "restart_all_maps_s": rnd(max(d), 3) if len(d) == n else None,
        "restart_map_p50_s": rnd(percentile(d, 50), 3),
        "restart_maps_received": len(d),
        "restart_server_cpu_s": rnd(target.cpu() - cpu0, 2),
        "restart_peak_rss_mib": rnd(target.peak_rss(), 1),
        "restart_nodes_failing": errors,
    }


# Counters of the (new) server process that say where a storm's work went: map responses by
# type (a "full" beyond one per session is a FULL resend), frames written and failed, map
# sessions ended, map requests by status.
_COUNTED = ("headscale_mapresponse_generated_total", "headscale_mapresponse_sent_total",
            "headscale_mapresponse_ended_total", "http_requests_total")


def _server_counts(target: Target) -> dict[str, float]:
    if not target.metrics_url:
        return {}
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(target.metrics_url, timeout=30) as r:
            text = r.read().decode()
    except OSError as e:
        return {"error": str(e)[:200]}  # type: ignore[dict-item]
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in _COUNTED and s.value:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())
                                  if k in ("response_type", "status", "type", "reason",
                                           "endpoint"))
                out[f"{s.name.removesuffix('_total')}{{{labels}}}"] = s.value
    return out


def _restartable(stack: contextlib.ExitStack, target: Target, argv: list[str], log: Path,
                 url: str, env: dict[str, str] | None, cwd: Path,
                 restart_argv: list[str] | None = None) -> Callable[[], None]:
    def restart() -> None:
        t = time.monotonic()
        for pid in target.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 15)
        for proc in procs:
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                raise BenchError(f"{target.name}: still running 120 s after SIGTERM") from None
        print(f"  [{target.name}] restart: old process stopped in "
              f"{time.monotonic() - t:.1f}s", flush=True)
        proc = stack.enter_context(server_process(restart_argv or argv, log, env=env, cwd=cwd))
        procs[:] = [proc]
        target.pids = [proc.pid]
        _wait_health(url, proc, log, timeout=300)

    proc = stack.enter_context(server_process(argv, log, env=env, cwd=cwd))
    procs = [proc]
    target.pids = [proc.pid]
    _wait_health(url, proc, log)
    return restart


# == servers ================================================================================


def _ports() -> dict[str, int]:
    return {k: free_port() for k in ("http", "metrics", "grpc", "derp")} | {
        "stun": free_port(socket.SOCK_DGRAM)}


def _common_config(work: Path, p: dict[str, int], args: argparse.Namespace) -> dict[str, Any]:
    """pyheadscale's embedded single-host default on this run's loopback ports; Headscale
    reads the same file (it ignores the keys it does not know)."""
    cfg = deep_merge(embedded_default(work), {
        "server_url": f"http://{LOOPBACK}:{p['http']}",
        "listen_addr": f"{LOOPBACK}:{p['http']}",
        "metrics_listen_addr": f"{LOOPBACK}:{p['metrics']}",
        "grpc_listen_addr": f"{LOOPBACK}:{p['grpc']}",
        "grpc_allow_insecure": False,
        "derp": {"server": {"stun_listen_addr": f"{LOOPBACK}:{p['stun']}", "ipv4": LOOPBACK}},
        "disable_check_updates": True,
        "log": {"level": args.log_level},
        # No policy is stored before the policy phase: allow-all, as with an empty file.
        "policy": {"mode": "database"},
        "dns": {"base_domain": "bench.test"},
        "unix_socket": str(work / "hs.sock"),
        "logtail": {"enabled": False},
    })
    # Where the relay listens is each caller's choice (Headscale: on its main port).
    del cfg["derp"]["server"]["listen_addr"]
    if args.batch_delay_ms is not None:
        cfg["tuning"] = {"batch_change_delay": f"{args.batch_delay_ms}ms"}
    return cfg


def _pyheadscale_key(cfg_path: Path) -> str:
    """User + reusable key, through the CLI when it has the commands, else seeded in the DB."""
    base = [str(VENV_PYTHON), "-m", "pyheadscale", "-c", str(cfg_path)]
    help_ = subprocess.run([*base, "--help"], capture_output=True, text=True, timeout=60)
    if "preauthkeys" in help_.stdout:
        return ""  # created through the CLI once the server runs
    spec = {"users": [USER], "keys": {"bench": {"user": USER, "reusable": True,
                                                "expires_in": 6 * 3600}}}
    r = subprocess.run([str(VENV_PYTHON), "-m", "tests.seeddb", str(cfg_path), json.dumps(spec)],
                       capture_output=True, text=True, timeout=120, cwd=str(REPO))
    if r.returncode != 0:
        raise BenchError(f"seeding pyheadscale failed: {r.stderr[-2000:]}")
    return str(json.loads(r.stdout.strip().splitlines()[-1])["keys"]["bench"])


def _cli_key(base: list[str]) -> str:
    """`users create` + `preauthkeys create --reusable` with a headscale-compatible CLI."""
    def run(*a: str) -> Any:
        r = subprocess.run([*base, *a, "-o", "json"], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise BenchError(f"{' '.join(a)} failed: {(r.stderr or r.stdout)[-1000:]}")
        return json.loads(r.stdout)

    user = run("users", "create", USER)
    key = run("preauthkeys", "create", "--user", str(int(user["id"])), "--reusable",
              "--expiration", "6h")
    return str(key["key"])


def _cli_api_key(base: list[str]) -> str:
    """`apikeys create` (plain output: the key on the last line)."""
    r = subprocess.run([*base, "apikeys", "create", "--expiration", "6h"], capture_output=True,
                       text=True, timeout=60)
    if r.returncode != 0 or not r.stdout.strip():
        raise BenchError(f"apikeys create failed: {(r.stderr or r.stdout)[-1000:]}")
    return r.stdout.strip().splitlines()[-1].strip()


def _policy_setup(base: list[str], target: Target, args: argparse.Namespace) -> None:
    """An API key and the users the generated policy names (Headscale rejects unknown users)."""
    if not args.policy_rules:
        return
    target.api_key = _cli_api_key(base)
    for name in policy_users():
        if name == USER:
            continue
        status, body = _rest(target, "POST", "/api/v1/user", {"name": name})
        if status != 200:
            raise BenchError(f"{target.name}: creating user {name}: HTTP {status} "
                             f"{str(body)[:300]}")


def _wait_health(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"server exited with {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(OSError, urllib.error.URLError), \
                urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.2)
    raise BenchError(f"{url}/health not OK after {timeout}s:\n{tail(log)}")


def bench_pyheadscale(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    work = root / "pyheadscale"
    work.mkdir()
    p = _ports()
    cfg = _common_config(work, p, args)
    cfg["derp"]["server"]["listen_addr"] = f"{LOOPBACK}:{p['derp']}"
    cfg["derp"]["server"]["hostname"] = LOOPBACK
    cfg_path = work / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    key = _pyheadscale_key(cfg_path)
    log = work / "server.log"
    argv = [str(VENV_PYTHON), "-m", "pyheadscale", "-c", str(cfg_path), "serve"]
    if args.profile == "pyinstrument":
        argv = [str(VENV_PYTHON), "-m", "pyinstrument", "-r", "text", "-o",
                str(args.profile_dir / "pyheadscale.pyinstrument.txt"), "-m", "pyheadscale",
                "-c", str(cfg_path), "serve"]
    elif args.profile == "cprofile":
        argv = [str(VENV_PYTHON), "-m", "tests.bench.cpuprofile",
                str(args.profile_dir / "pyheadscale.cprofile"), "-c", str(cfg_path), "serve"]
    elif args.profile == "gc":
        argv = [str(VENV_PYTHON), "-m", "tests.bench.gcstats",
                str(args.profile_dir / "pyheadscale.gc.json"), "-c", str(cfg_path), "serve"]
    elif args.profile == "tracemalloc":
        argv = [str(VENV_PYTHON), "-m", "tests.bench.memprofile",
                str(args.profile_dir / "pyheadscale.tracemalloc.txt"), "-c", str(cfg_path),
                "serve"]
    env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    with contextlib.ExitStack() as stack:
        target = Target("pyheadscale", [cfg["server_url"]], [], key,
                        metrics_url=f"http://{LOOPBACK}:{p['metrics']}/metrics")
        # A profiled restart writes the new process's profile beside the first one's.
        re_argv = [a + ".restart" if args.profile and a.startswith(str(args.profile_dir))
                   else a for a in argv]
        target.restart = _restartable(stack, target, argv, log, cfg["server_url"], env, work,
                                      re_argv)
        cli = [str(VENV_PYTHON), "-m", "pyheadscale", "-c", str(cfg_path)]
        if not key:
            target.authkey = _cli_key(cli)
        _policy_setup(cli, target, args)
        res = run_load(target, args)
    res["log_lines"] = len(log.read_text(errors="replace").splitlines())
    return res


def bench_headscale(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    binary = build_go.ensure(build_go.HEADSCALE)
    work = root / "headscale"
    work.mkdir()
    p = _ports()
    cfg = _common_config(work, p, args)
    cfg_path = work / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    log = work / "server.log"
    with contextlib.ExitStack() as stack:
        target = Target("headscale", [cfg["server_url"]], [], "")
        target.restart = _restartable(stack, target, [str(binary), "-c", str(cfg_path), "serve"],
                                      log, cfg["server_url"], None, work)
        cli = [str(binary), "-c", str(cfg_path)]
        target.authkey = _cli_key(cli)
        _policy_setup(cli, target, args)
        res = run_load(target, args)
    res["log_lines"] = len(log.read_text(errors="replace").splitlines())
    res["version"] = build_go.HEADSCALE_VERSION
    return res


# == report =================================================================================

_ROWS = [
    ("all registered (s)", "all_registered_s"),
    ("all first maps (s)", "all_first_maps_s"),
    ("first map p50 (s)", "first_map_p50_s"),
    ("join: server CPU (s)", "join_server_cpu_s"),
    ("join: server CPU, main thread (s)", "join_server_main_thread_cpu_s"),
    ("join: client CPU (s)", "join_client_cpu_s"),
    ("updates settled (s)", "settled_s"),
    ("frames until settled", "frames_until_settled"),
    ("endpoint change p50 (s)", "endpoint_change_p50_s"),
    ("endpoint change p99 (s)", "endpoint_change_p99_s"),
    ("endpoint change max (s)", "endpoint_change_max_s"),
    ("change receivers / missing",
     lambda r: f"{r['endpoint_change_receivers']} / {r['endpoint_change_missing']}"),
    ("changes: server CPU (s)", "changes_server_cpu_s"),
    ("server CPU total (s)", "server_cpu_s"),
    ("server peak RSS (MiB)", "server_peak_rss_mib"),
    ("client CPU total (s)", "client_cpu_s"),
    ("polls re-opened after server closed them", "poll_restarts"),
    ("re-polls the server refused (HTTP error)", "polls_refused"),
    ("nodes failed", "node_errors"),
]
# After the totals above (which stop before it): the policy phase.
_POLICY_ROWS: list[tuple[str, Any]] = [
    ("policy set: REST call (s)", "policy_set_s"),
    ("policy set: all polls' new PacketFilter (s)", "policy_all_filters_s"),
    ("policy set: PacketFilter p50 (s)", "policy_filter_p50_s"),
    ("policy set: PacketFilter p99 (s)", "policy_filter_p99_s"),
    ("policy set: receivers / missing",
     lambda r: f"{r.get('policy_filter_receivers')} / {r.get('policy_filter_missing')}"),
    ("policy set: frames sent", "policy_frames"),
    ("policy set: server CPU (s)", "policy_server_cpu_s"),
    ("tag one node: REST call (s)", "tag_set_s"),
    ("tag one node: viewers' next frame p50 (s)", "tag_change_p50_s"),
    ("tag one node: viewers' next frame p99 (s)", "tag_change_p99_s"),
    ("tag one node: viewers reached / saw the tag",
     lambda r: "skipped" if r.get("tag_skipped") else
     f"{r.get('tag_change_receivers')} / {r.get('tag_seen_by')}"),
    ("tag one node: frames sent", "tag_frames"),
    ("tag one node: server CPU (s)", "tag_server_cpu_s"),
    ("peak RSS incl. policy phase (MiB)", "policy_phase_peak_rss_mib"),
]
_RESTART_ROWS: list[tuple[str, Any]] = [
    ("restart: SIGTERM to new /health (s)", "restart_down_s"),
    ("restart: all polls back with a map (s)", "restart_all_maps_s"),
    ("restart: map p50 (s)", "restart_map_p50_s"),
    ("restart: polls back / nodes failing",
     lambda r: f"{r.get('restart_maps_received')} / {r.get('restart_nodes_failing')}"),
    ("restart: server CPU (s)", "restart_server_cpu_s"),
    ("restart: peak RSS (MiB)", "restart_peak_rss_mib"),
]
RATIO_KEYS = ["all_registered_s", "all_first_maps_s", "endpoint_change_p50_s",
              "endpoint_change_p99_s", "server_cpu_s", "join_server_cpu_s",
              "server_peak_rss_mib", "policy_set_s", "policy_all_filters_s",
              "policy_filter_p50_s", "policy_filter_p99_s", "policy_server_cpu_s", "tag_set_s",
              "tag_change_p50_s", "tag_change_p99_s", "tag_server_cpu_s"]


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    names = list(results)
    rows: list[Sequence[Any]] = []
    spec = (_ROWS + (_POLICY_ROWS if args.policy_rules else [])
            + (_RESTART_ROWS if args.restart else []))
    for label, key in spec:
        row: list[Any] = [label]
        for nm in names:
            r = results[nm]
            row.append(key(r) if callable(key) else r.get(key))
        if len(names) == 2:
            row.append(None if callable(key) else
                       ratio(results[names[0]].get(key), results[names[1]].get(key)))
        rows.append(row)
    label = ("ratio py/hs" if names == ["pyheadscale", "headscale"]
             else f"ratio {names[0]}/{names[1]}" if len(names) == 2 else "")
    header = ["", *names] + ([label] if len(names) == 2 else [])
    print(Table(header, rows).render())
    ratios = {}
    if "pyheadscale" in results and "headscale" in results:
        ratios = {k: ratio(results["pyheadscale"].get(k), results["headscale"].get(k))
                  for k in RATIO_KEYS if k in results["pyheadscale"]}
    for nm, r in results.items():
        # The clients share the 2 cores with the server: if they were busy most of a phase,
        # that phase says as much about the client as about the server.
        busy = (r["join_client_cpu_s"] or 0) / max(r["join_wall_s"] or 1e-9, 1e-9)
        note = (" (client-bound: client processes were busy for most of the join)"
                if busy > 0.8 * args.workers else "")
        print(f"{nm}: join used {busy:.2f} client cores of {args.workers} worker processes "
              f"over {r['join_wall_s']} s{note}; server log lines {r.get('log_lines')}")
    return ratios


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="1k")
    ap.add_argument("--nodes", type=int, default=None, help="overrides --size")
    ap.add_argument("--workers", type=int, default=max(2, os.cpu_count() or 2),
                    help="client processes (default: number of CPUs, at least 2)")
    ap.add_argument("--concurrency", type=int, default=32,
                    help="registrations in flight per client process")
    ap.add_argument("--changes", type=int, default=3, help="endpoint-change rounds")
    ap.add_argument("--servers", default="pyheadscale,headscale")
    ap.add_argument("--instances", default="",
                    help="K[,K...]: also run pyheadscale as K instances on one PostgreSQL "
                    "(tests/bench/cluster.py), e.g. --servers '' --instances 1,2 compares one "
                    "instance with two sharing the nodes (needs --workers >= K)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds allowed for all first maps (default 60 + 0.2 s per node)")
    ap.add_argument("--change-timeout", type=float, default=30.0)
    ap.add_argument("--quiet-s", type=float, default=2.0,
                    help="no frame for this long = the update storm has settled")
    ap.add_argument("--batch-delay-ms", type=int, default=None,
                    help="set tuning.batch_change_delay on both servers (default: each "
                    "server's own default: pyheadscale 50 ms, Headscale 800 ms)")
    ap.add_argument("--policy-rules", type=int, default=200,
                    help="ACL rules of the generated policy set in the policy phase "
                    "(0: no policy phase)")
    ap.add_argument("--policy-timeout", type=float, default=None,
                    help="seconds allowed per policy step (default 60 + 0.06 s per node)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the generated policy")
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--profile", choices=["pyinstrument", "cprofile", "gc", "tracemalloc"],
                    default=None,
                    help="run pyheadscale under a profiler (pyinstrument must be importable; "
                    "gc: the cyclic GC's runs and CPU, as JSON; tracemalloc keeps the heap's "
                    "biggest holders at its peak); the report goes to --profile-dir")
    ap.add_argument("--profile-dir", type=Path, default=Path("."),
                    help="where --profile writes (default: the current directory)")
    ap.add_argument("--restart", action="store_true",
                    help="last phase: restart the server under all mapped polls and time "
                    "until every poll is back with a map (same node keys, no re-auth)")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    args.nodes = args.nodes or SIZES[args.size]
    if args.nodes < 2:
        ap.error("--nodes must be at least 2")
    if args.timeout is None:
        args.timeout = 60 + 0.2 * args.nodes
    if args.policy_timeout is None:
        args.policy_timeout = 60 + 0.06 * args.nodes
    # One policy text for both servers.
    args.policy_text = (make_policy(args.policy_rules, random.Random(args.seed), policy_users())
                        if args.policy_rules else "")
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    instances = [int(k) for k in args.instances.split(",") if k.strip()]
    if any(k < 1 or k > args.workers for k in instances):
        ap.error("--instances: each K must be between 1 and --workers")
    info = machine_info()
    print(f"control benchmark: {args.nodes} nodes, {args.workers} client processes x "
          f"{args.concurrency} registrations in flight, {args.changes} endpoint changes, "
          f"{args.policy_rules or 'no'}-rule policy; "
          f"{info['cpu']} x{info['nproc']}, Python {info['python']}, "
          f"uvloop {info['uvloop'] or 'not installed'}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    root = Path(tempfile.mkdtemp(prefix="bench-control-"))
    try:
        for s in servers:
            print(f"-- {s}", flush=True)
            fn = {"pyheadscale": bench_pyheadscale, "headscale": bench_headscale}[s]
            results[s] = fn(args, root)
            # Each server's figures as soon as they exist, in case a later step fails.
            print(f"   {s}: " + json.dumps({k: v for k, v in results[s].items()
                                             if k != "change_rounds"}), flush=True)
        for k in instances:
            from tests.bench.cluster import bench_pyheadscale_cluster

            name = f"pyheadscale-pg{k}"
            print(f"-- {name}: {k} instance(s) on one PostgreSQL", flush=True)
            results[name] = bench_pyheadscale_cluster(args, root, k)
            print(f"   {name}: " + json.dumps({k: v for k, v in results[name].items()
                                                if k != "change_rounds"}), flush=True)
    except (BenchError, build_go.BuildError) as e:
        print(f"error: {e}", file=sys.stderr)
        emit_json({"benchmark": "control", "error": str(e)[:2000], "results": results})
        return 1
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")
    ratios = report(results, args)
    emit_json({"benchmark": "control", "nodes": args.nodes, "workers": args.workers,
               "machine": info, "results": results, "ratios_pyheadscale_over_headscale": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
