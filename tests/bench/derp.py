"""DERP relay benchmark: our relay (`python -m derp`) and Tailscale's derper, same run.

    python -m tests.bench.derp            # 15 s per point
    python -m tests.bench.derp --quick    # 3 s per point

Method (shared/docs/derp.md section 8): 10 client pairs over TLS on 127.0.0.1; A sends
1,300-byte packets to B, open loop, paced by a per-pair schedule at a rising aggregate offered
load; B timestamps arrivals. Each point has a warm-up, then a measured window; a packet sent in
the window that has not arrived 1 s after the window counts as lost. Reported per point:
delivered packets/s, loss, one-way latency p50/p99 (sender and receiver share
CLOCK_MONOTONIC), server CPU seconds per million delivered packets (from /proc), and the
generator's CPU use (a point where the generator's processes were busy nearly all the time, or
could not send the offered load, is marked generator-bound). A server's sweep stops after its
first saturated point (loss > 1 % or p99 > 20 ms) or generator-bound point. By default the
server is pinned to CPU 1 (derper with GOMAXPROCS=1) and the generator to CPU 0, as in the
method; --no-pin lets both float over both cores. The last line is one JSON object.

The generator is Python (derp.client.DerpClient for the handshake, then a header-only receive
path), in several processes. Everything listens on and dials 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import resource
import struct
import sys
import tempfile
import time
from array import array
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from tests.bench import build_go
from tests.bench.common import (
    LOOPBACK,
    VENV_PYTHON,
    BenchError,
    Table,
    cpu_seconds,
    emit_json,
    free_port,
    install_uvloop,
    machine_info,
    peak_rss_mib,
    percentile,
    pipe_commands,
    ratio,
    rnd,
    server_process,
    wait_tcp,
)

PAYLOAD = 1300
PAIRS = 10
DEFAULT_RATES = [1000, 2500, 5000, 10000, 20000, 40000, 80000, 160000]  # aggregate packets/s
LOSS_LIMIT = 0.01
P99_LIMIT = 0.020
MAX_BURST = 16  # packets per pair per pacing tick
LOSS_WAIT = 1.0  # a packet not seen within this after the window is lost (derpprobe's qd)
_SEQ_TS = struct.Struct(">QQ")


# == generator (worker processes) ===========================================================


class _Recv:
    """Receive-side counters of one pair for the current point."""

    __slots__ = ("lat", "n", "w0", "w1")

    def __init__(self) -> None:
        self.w0 = 0  # measured window [w0, w1) in monotonic ns of the send time
        self.w1 = 0
        self.n = 0
        self.lat = array("q")


def _make_client_class() -> Any:
    from derp import protocol as p
    from derp.client import DerpClient

    class BenchClient(DerpClient):
        """DerpClient whose receive path, after the handshake, only reads seq + timestamp."""

        rx: _Recv | None = None

        def _on_data(self, data: bytes) -> None:
            if not self._handshake.done() or self.rx is None:
                super()._on_data(data)
                return
            now = time.monotonic_ns()
            rx = self.rx
            for ftype, payload in self._decoder.feed(data):
                if ftype == 0x05:  # RecvPacket: src key (32) + packet
                    _, ts = _SEQ_TS.unpack_from(payload, 33)
                    if rx.w0 <= ts < rx.w1:
                        rx.n += 1
                        rx.lat.append(now - ts)
                elif ftype == p.FrameType.PING:
                    self._write(p.pong_frame(payload))

    return BenchClient


class GenWorker:
    def __init__(self, pipe: Connection, spec: dict[str, Any]) -> None:
        self.pipe = pipe
        self.spec = spec
        self.pairs: list[tuple[Any, Any, _Recv]] = []

    async def setup(self) -> None:
        from derp.keys import generate_private_key

        cls = _make_client_class()
        url = self.spec["url"]
        for _ in range(self.spec["pairs"]):
            a = await cls.connect(url, generate_private_key(), timeout=30)
            b = await cls.connect(url, generate_private_key(), timeout=30)
            rx = _Recv()
            b.rx = rx
            self.pairs.append((a, b, rx))
        # Sanity: one packet per pair must arrive before any timing starts.
        for a, b, rx in self.pairs:
            rx.w0, rx.w1 = 0, 1 << 62
            a.send(b.public_key, self._packet(0, time.monotonic_ns()))
        deadline = time.monotonic() + 10
        while any(rx.n == 0 for _, _, rx in self.pairs):
            if time.monotonic() > deadline:
                raise BenchError("a warm-up packet did not arrive within 10 s")
            await asyncio.sleep(0.01)

    _tail = os.urandom(PAYLOAD - 17)

    def _packet(self, seq: int, ts: int) -> bytes:
        # Byte 0 = 0x04 (a WireGuard data message, never disco), then seq and send time.
        return b"\x04" + _SEQ_TS.pack(seq, ts) + self._tail

    async def point(self, rate_pair: float, t_start: float, warm: float, measure: float
                    ) -> dict[str, Any]:
        from derp import protocol as p

        w0 = int((t_start + warm) * 1e9)
        w1 = int((t_start + warm + measure) * 1e9)
        heads = []
        for _a, b, rx in self.pairs:
            rx.w0, rx.w1, rx.n, rx.lat = w0, w1, 0, array("q")
            heads.append(p.pack_header(p.FrameType.SEND_PACKET, 32 + PAYLOAD) + b.public_key)
        sent_in_window = 0
        sent = 0
        skipped = 0
        seq = 0
        end = t_start + warm + measure
        ru0 = _cpu()
        ru_w0: float | None = None
        await asyncio.sleep(max(0.0, t_start - time.monotonic()))
        interval = 1.0 / rate_pair
        # All pairs share one schedule: packet k of every pair is due at t_start + k/rate.
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if ru_w0 is None and now >= t_start + warm:
                ru_w0 = _cpu()
            due = int((now - t_start) / interval) + 1 - seq
            if due > 0:
                if due > MAX_BURST:
                    # The generator fell behind (descheduled): drop the backlog rather than
                    # send a burst deeper than derper's 32-packet queue; counted as skipped.
                    skipped += (due - MAX_BURST) * len(self.pairs)
                    seq += due - MAX_BURST
                    due = MAX_BURST
                ts = time.monotonic_ns()
                for i, (a, _b, _rx) in enumerate(self.pairs):
                    if a.write_buffer_size() > 4 << 20:
                        skipped += due  # the server is not reading: do not grow without bound
                        continue
                    tail = self._tail
                    h = heads[i]
                    a.send_many([h + b"\x04" + _SEQ_TS.pack(seq + k, ts) + tail
                                 for k in range(due)])
                    sent += due
                    if w0 <= ts < w1:
                        sent_in_window += due
                seq += due
            await asyncio.sleep(0.0005)
        ru_w1 = _cpu()
        await asyncio.sleep(LOSS_WAIT)
        received = sum(rx.n for _, _, rx in self.pairs)
        lat = array("q")
        for _, _, rx in self.pairs:
            lat.extend(rx.lat)
        return {"sent": sent, "sent_in_window": sent_in_window, "received": received,
                "skipped": skipped, "lat": lat.tobytes(),
                "cpu_window": (ru_w1 - ru_w0) if ru_w0 is not None else 0.0,
                "cpu_point": ru_w1 - ru0}

    async def run(self) -> None:
        cmds = pipe_commands(self.pipe)
        try:
            await self.setup()
            self.pipe.send(("ready",))
        except Exception as e:
            self.pipe.send(("error", f"{type(e).__name__}: {e}"))
            return
        while True:
            msg = await cmds.get()
            if msg[0] == "point":
                self.pipe.send(("result", await self.point(*msg[1:])))
            elif msg[0] == "stop":
                for a, b, _ in self.pairs:
                    for c in (a, b):
                        with contextlib.suppress(Exception):
                            await c.close()
                self.pipe.send(("stopped",))
                return


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def gen_entry(pipe: Connection, spec: dict[str, Any]) -> None:
    if spec.get("cpu") is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {spec["cpu"]})
    install_uvloop()
    asyncio.run(GenWorker(pipe, spec).run())


class Generator:
    def __init__(self, url: str, pairs: int, procs: int, cpu: int | None) -> None:
        ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.pipes: list[Connection] = []
        self.pairs_per = [len(range(i, pairs, procs)) for i in range(procs)]
        for n in self.pairs_per:
            mine, theirs = ctx.Pipe()
            pr = ctx.Process(target=gen_entry, args=(theirs, {"url": url, "pairs": n, "cpu": cpu}),
                             daemon=True)
            pr.start()
            self.procs.append(pr)
            self.pipes.append(mine)
        for pipe in self.pipes:
            msg = self._recv(pipe, 90)
            if msg[0] != "ready":
                self.stop()
                raise BenchError(f"generator setup failed: {msg[1]}")

    def _recv(self, pipe: Connection, timeout: float) -> Any:
        if not pipe.poll(timeout):
            raise BenchError(f"generator process silent for {timeout}s")
        return pipe.recv()

    def point(self, rate: float, warm: float, measure: float, server_pid: int
              ) -> dict[str, Any]:
        rate_pair = rate / sum(self.pairs_per)
        t_start = time.monotonic() + 0.5
        for pipe in self.pipes:
            pipe.send(("point", rate_pair, t_start, warm, measure))
        # Server CPU over exactly the measured window.
        time.sleep(max(0.0, t_start + warm - time.monotonic()))
        c0 = cpu_seconds(server_pid)
        time.sleep(max(0.0, t_start + warm + measure - time.monotonic()))
        c1 = cpu_seconds(server_pid)
        parts = [self._recv(p, warm + measure + 60)[1] for p in self.pipes]
        lat = array("q")
        for part in parts:
            lat.frombytes(part["lat"])
        lat_s = [x / 1e9 for x in lat]
        sent_w = sum(x["sent_in_window"] for x in parts)
        recv = sum(x["received"] for x in parts)
        gen_cpu = sum(x["cpu_window"] for x in parts)
        delivered = recv / measure
        skipped = sum(x["skipped"] for x in parts)
        gen_busy = gen_cpu / measure
        offered_sent = sent_w / measure
        return {
            "offered_pps": rate,
            "sent_pps": round(offered_sent, 1),
            "delivered_pps": round(delivered, 1),
            "loss": rnd(1 - recv / sent_w, 5) if sent_w else None,
            "p50_ms": rnd(_ms(percentile(lat_s, 50)), 3),
            "p99_ms": rnd(_ms(percentile(lat_s, 99)), 3),
            "server_cpu_s": round(c1 - c0, 3),
            "server_cpu_s_per_mpkt": round((c1 - c0) / recv * 1e6, 2) if recv else None,
            "server_cores_busy": round((c1 - c0) / measure, 3),
            "gen_cores_busy": round(gen_busy, 3),
            "gen_skipped": skipped,
        }

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop",))
        for pipe in self.pipes:
            with contextlib.suppress(Exception):
                self._recv(pipe, 15)
        for pr in self.procs:
            pr.join(10)
            if pr.is_alive():
                pr.kill()
                pr.join(5)


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000


# == servers and the sweep ==================================================================


def _server_argv(which: str, work: Path, port: int, certdir: Path) -> tuple[list[str], dict[str, str]]:
    common = ["-a", f"{LOOPBACK}:{port}", "-hostname", LOOPBACK, "-certmode", "manual",
              "-certdir", str(certdir), "-http-port", "-1", "-stun=false",
              "-c", str(work / f"{which}.key.json")]
    if which == "ours":
        return [str(VENV_PYTHON), "-m", "derp", *common], {"PYTHONUNBUFFERED": "1"}
    binary = build_go.ensure(build_go.DERPER)
    return [str(binary), *common], {}


def sweep(which: str, args: argparse.Namespace, work: Path, certdir: Path) -> dict[str, Any]:
    port = free_port()
    argv, env = _server_argv(which, work, port, certdir)
    pin_server = 1 if args.pin else None
    if which == "derper" and args.pin:
        env["GOMAXPROCS"] = "1"
    log = work / f"{which}.log"
    points: list[dict[str, Any]] = []
    saturation: float | None = None
    with server_process(argv, log, env=env, cpu=pin_server) as proc:
        wait_tcp(port, proc, log, timeout=30)
        idle_rss = peak_rss_mib(proc.pid)
        gen = Generator(f"https://{LOOPBACK}:{port}/derp", args.pairs, args.gen_procs,
                        0 if args.pin else None)
        try:
            for rate in args.rates:
                pt = gen.point(rate, args.warm, args.measure, proc.pid)
                pt["saturated"] = bool((pt["loss"] or 0) > LOSS_LIMIT
                                       or (pt["p99_ms"] or 0) > P99_LIMIT * 1000)
                pt["generator_bound"] = bool(
                    pt["sent_pps"] < 0.9 * rate
                    or pt["gen_cores_busy"] > 0.9 * (1 if args.pin else args.gen_procs))
                points.append(pt)
                print(f"  [{which}] offered {rate:>6} sent {pt['sent_pps']:>9.0f} delivered "
                      f"{pt['delivered_pps']:>9.0f} loss {pt['loss']} p50 {pt['p50_ms']} ms "
                      f"p99 {pt['p99_ms']} ms cpu/Mpkt {pt['server_cpu_s_per_mpkt']} s "
                      f"server {pt['server_cores_busy']} gen {pt['gen_cores_busy']} cores"
                      + (" SATURATED" if pt["saturated"] else "")
                      + (" GENERATOR-BOUND" if pt["generator_bound"] else ""), flush=True)
                if not pt["saturated"] and (pt["loss"] or 0) < LOSS_LIMIT:
                    saturation = max(saturation or 0.0, pt["delivered_pps"])
                if pt["saturated"] or pt["generator_bound"]:
                    break
                time.sleep(0.5)
        finally:
            gen.stop()
        peak = peak_rss_mib(proc.pid)
    return {"points": points, "max_delivered_pps_unsaturated": saturation,
            "idle_rss_mib": rnd(idle_rss, 1), "peak_rss_mib": rnd(peak, 1),
            "limited_by": _limit(points)}


def _limit(points: list[dict[str, Any]]) -> str:
    if not points:
        return "no points"
    last = points[-1]
    if last["saturated"]:
        return "server (loss or p99 over the limit)"
    if last["generator_bound"]:
        return "generator"
    return "not reached (highest offered load delivered)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 s points, 1 s warm-up")
    ap.add_argument("--pairs", type=int, default=PAIRS)
    ap.add_argument("--rates", default=",".join(map(str, DEFAULT_RATES)),
                    help="aggregate offered packets/s, comma-separated, rising")
    ap.add_argument("--gen-procs", type=int, default=2, help="generator processes")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="do not pin server to CPU 1 and generator to CPU 0")
    ap.add_argument("--servers", default="ours,derper")
    args = ap.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    args.warm, args.measure = (1.0, 3.0) if args.quick else (3.0, 15.0)
    if args.pin and (os.cpu_count() or 1) < 2:
        args.pin = False
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    info = machine_info()
    print(f"derp benchmark: {args.pairs} pairs, {PAYLOAD}-byte packets, TLS on 127.0.0.1, "
          f"{args.warm:g}+{args.measure:g} s per point, {args.gen_procs} generator processes, "
          f"{'server on CPU 1 / generator on CPU 0' if args.pin else 'unpinned'}; "
          f"{info['cpu']} x{info['nproc']}, Python {info['python']}, "
          f"uvloop {info['uvloop'] or 'not installed'}, derper {build_go.DERPER_VERSION}",
          flush=True)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-derp-") as tmp:
        work = Path(tmp)
        certdir = work / "certs"
        from derp.tls import ensure_self_signed

        ensure_self_signed(certdir, LOOPBACK)  # one certificate for both servers
        try:
            for s in servers:
                print(f"-- {s}", flush=True)
                results[s] = sweep(s, args, work, certdir)
        except (BenchError, build_go.BuildError) as e:
            print(f"error: {e}", file=sys.stderr)
            emit_json({"benchmark": "derp", "error": str(e)[:2000], "results": results})
            return 1
    summary = summarize(results)
    emit_json({"benchmark": "derp", "pairs": args.pairs, "payload": PAYLOAD,
               "pinned": args.pin, "warm_s": args.warm, "measure_s": args.measure,
               "machine": info, "derper_version": build_go.DERPER_VERSION,
               "results": results, "summary": summary})
    return 0


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Side-by-side table at the offered loads both servers ran; ratios ours/derper."""
    if not {"ours", "derper"} <= set(results):
        return {}
    ours = {p["offered_pps"]: p for p in results["ours"]["points"]}
    theirs = {p["offered_pps"]: p for p in results["derper"]["points"]}
    rows = []
    per_rate = []
    for rate in sorted(set(ours) & set(theirs)):
        a, b = ours[rate], theirs[rate]
        r = {"offered_pps": rate,
             "delivered_ratio": ratio(a["delivered_pps"], b["delivered_pps"]),
             "p50_ratio": ratio(a["p50_ms"], b["p50_ms"]),
             "p99_ratio": ratio(a["p99_ms"], b["p99_ms"]),
             "cpu_per_mpkt_ratio": ratio(a["server_cpu_s_per_mpkt"],
                                         b["server_cpu_s_per_mpkt"])}
        per_rate.append(r)
        rows.append([rate, a["delivered_pps"], b["delivered_pps"], a["loss"], b["loss"],
                     a["p50_ms"], b["p50_ms"], a["p99_ms"], b["p99_ms"],
                     a["server_cpu_s_per_mpkt"], b["server_cpu_s_per_mpkt"],
                     r["cpu_per_mpkt_ratio"]])
    print(Table(["offered", "deliv ours", "deliv derper", "loss ours", "loss derper",
                 "p50 ours ms", "p50 derper", "p99 ours ms", "p99 derper",
                 "cpu s/Mpkt ours", "derper", "cpu ratio"], rows).render())
    sat = ratio(results["ours"]["max_delivered_pps_unsaturated"],
                results["derper"]["max_delivered_pps_unsaturated"])
    print(f"max unsaturated delivered pps: ours {results['ours']['max_delivered_pps_unsaturated']}"
          f" ({results['ours']['limited_by']}), derper "
          f"{results['derper']['max_delivered_pps_unsaturated']} "
          f"({results['derper']['limited_by']}); ratio {sat}")
    cpu_ratios = [r["cpu_per_mpkt_ratio"] for r in per_rate if r["cpu_per_mpkt_ratio"]]
    return {"per_rate": per_rate, "max_delivered_ratio": sat,
            "cpu_per_mpkt_ratio_median": percentile(cpu_ratios, 50),
            "ours_limited_by": results["ours"]["limited_by"],
            "derper_limited_by": results["derper"]["limited_by"]}


if __name__ == "__main__":
    sys.exit(main())
