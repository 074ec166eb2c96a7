"""DERP relay benchmark at saturation: our relay (`python -m derp`) and Tailscale's derper.

    python -m tests.bench.derp            # 15 s points (about 6 minutes); make bench-derp
    python -m tests.bench.derp --quick    # 3 s points (about 3 minutes)

Load: derpload (tests/bench/derpload, Go, Tailscale's own DERP client package) opens 10 client
pairs over TLS on 127.0.0.1; each A sends 1,300-byte packets to its B on an open-loop
schedule (one TLS write per wake-up unless --no-coalesce), each packet carrying its send time;
B records the one-way latency. A packet sent in the measured window that has not arrived 1 s
after it is lost. A sender whose socket is full (the relay is not reading) skips its backlog
beyond 16 packets, as tailscaled drops DERP writes when its queue is full: those are counted
as `skipped`, not lost.

Sweep: each relay is pinned to CPU 1 (derper with GOMAXPROCS=1), the generator to CPU 0
(GOMAXPROCS=1). First a short ramp finds derper's saturation S (the most it delivers); then
both relays run the same ladder of offered loads, 0.25 S ... 2 S, with 3 s warm-up + 15 s
measured per point. Reported per point: delivered packets/s, loss, p50/p99 latency, relay CPU
seconds per million delivered packets (from /proc over the measured window), and both
processes' core use (a point where the generator was busy > 90 % is marked generator-bound).
Summary: each relay's saturation throughput (its most delivered over the ladder), p99 at
0.5 S, loss/p99/delivered at 2 S (collapse = delivering under 80 % of its own peak), its core
use and packets/s per core used at its peak (STARVED when it had under 85 % of its core: other
work on the machine set that peak), and the ratios ours/derper. --rates or --derper-peak fix the ladder for a run comparable with an
earlier one. The last line is one JSON object. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.bench import build_go
from tests.bench.common import (
    LOOPBACK,
    VENV_PYTHON,
    BenchError,
    Table,
    child_setup,
    cpu_seconds,
    emit_json,
    machine_info,
    peak_rss_mib,
    ratio,
    rnd,
    server_process,
    stop_process,
    wait_tcp,
)
from tests.netutil import free_port

PAYLOAD = 1300
PAIRS = 10
LADDER = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]  # offered load as a fraction of derper's S
RAMP_START = 20000.0
RAMP_STEP = 1.4
RAMP_MAX = 3_000_000.0
LOSS_LIMIT = 0.01
P99_LIMIT_MS = 20.0
COLLAPSE = 0.8  # delivering under this fraction of its own peak at 2 S is a collapse
STARVED = 0.85  # a relay using less of its core than this at its peak was held back
SERVER_CPU, GEN_CPU = 1, 0


# == the generator process ==================================================================


class Generator:
    """derpload connected to one relay; runs points on command (JSON lines both ways)."""

    def __init__(self, binary: Path, url: str, pairs: int, pin: bool, coalesce: bool,
                 nice: int, log: Path) -> None:
        argv = [str(binary), "-url", url, "-pairs", str(pairs), "-size", str(PAYLOAD),
                f"-coalesce={'true' if coalesce else 'false'}"]
        env = dict(os.environ, GOMAXPROCS="1" if pin else os.environ.get("GOMAXPROCS", ""))
        if not env["GOMAXPROCS"]:
            del env["GOMAXPROCS"]
        self._stderr = open(log, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env,
            preexec_fn=child_setup(GEN_CPU if pin else None, nice))
        self._buf = b""
        self.log = log
        ev = self._event(90)
        if ev.get("event") != "ready":
            self.stop()
            raise BenchError(f"derpload did not start: {ev.get('error', ev)}")

    def _event(self, timeout: float) -> dict[str, Any]:
        """The next JSON line from derpload, waiting at most ``timeout`` seconds."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise BenchError(f"derpload silent for {timeout:g} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise BenchError(f"derpload exited ({self.proc.wait()}): "
                                 f"{self.log.read_text(errors='replace')[-2000:]}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return dict(json.loads(line))

    def point(self, rate: float, warm: float, measure: float, server_pid: int
              ) -> dict[str, Any]:
        assert self.proc.stdin is not None
        cmd = {"rate": rate, "warm": warm, "measure": measure}
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        self.proc.stdin.flush()
        c0 = c1 = 0.0
        while True:
            ev = self._event(warm + measure + 60)
            kind = ev.get("event")
            if kind == "measure_start":
                c0 = cpu_seconds(server_pid)
            elif kind == "measure_end":
                c1 = cpu_seconds(server_pid)
            elif kind == "result":
                break
            else:
                raise BenchError(f"derpload: {ev.get('error', ev)}")
        if ev.get("error"):
            raise BenchError(f"derpload lost a connection: {ev['error'][:500]}")
        recv = ev["received_in_window"]
        cpu = c1 - c0
        return {
            "offered_pps": rate,
            "sent_pps": round(ev["sent_pps"], 1),
            "delivered_pps": round(ev["delivered_pps"], 1),
            "loss": rnd(ev["loss"], 5),
            "skipped_frac": rnd(ev["skipped"] / (rate * (warm + measure)), 4),
            "p50_ms": _ms(ev["p50_ms"]),
            "p99_ms": _ms(ev["p99_ms"]),
            "p999_ms": _ms(ev["p999_ms"]),
            "server_cpu_s": round(cpu, 3),
            "server_cpu_s_per_mpkt": round(cpu / recv * 1e6, 2) if recv else None,
            "server_cores_busy": round(cpu / measure, 3),
            "gen_cores_busy": round(ev["gen_cpu_s"] / measure, 3),
        }

    def stop(self) -> None:
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)  # type: ignore[arg-type]
        self._stderr.close()


def _ms(x: float) -> float | None:
    return None if x < 0 else round(x, 3)


# == relays and sweeps ======================================================================


def _server_argv(which: str, work: Path, port: int, certdir: Path) -> tuple[list[str], dict[str, str]]:
    common = ["-a", f"{LOOPBACK}:{port}", "-hostname", LOOPBACK, "-certmode", "manual",
              "-certdir", str(certdir), "-http-port", "-1", "-stun=false",
              "-c", str(work / f"{which}.key.json")]
    if which == "ours":
        return [str(VENV_PYTHON), "-m", "derp", *common], {"PYTHONUNBUFFERED": "1"}
    return [str(build_go.ensure(build_go.DERPER)), *common], {}


class Relay:
    """One relay process with a connected generator, for a sequence of points."""

    def __init__(self, which: str, args: argparse.Namespace, work: Path, certdir: Path,
                 gen_binary: Path) -> None:
        self.which = which
        port = free_port()
        argv, env = _server_argv(which, work, port, certdir)
        if which == "derper" and args.pin:
            env["GOMAXPROCS"] = "1"
        self.log = work / f"{which}.log"
        self._stack = contextlib.ExitStack()
        self.proc = self._stack.enter_context(
            server_process(argv, self.log, env=env, cpu=SERVER_CPU if args.pin else None,
                           nice=args.nice))
        try:
            wait_tcp(port, self.proc, self.log, timeout=30)
            self.idle_rss = peak_rss_mib(self.proc.pid)
            self.gen = Generator(gen_binary, f"https://{LOOPBACK}:{port}/derp", args.pairs,
                                 args.pin, args.coalesce, args.nice,
                                 work / f"derpload-{which}.log")
        except BaseException:
            self._stack.close()
            raise
        self.args = args

    def point(self, rate: float, warm: float, measure: float) -> dict[str, Any]:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.which} exited with {self.proc.returncode}")
        pt = self.gen.point(rate, warm, measure, self.proc.pid)
        pt["saturated"] = bool((pt["loss"] or 0) > LOSS_LIMIT
                               or (pt["p99_ms"] or 0) > P99_LIMIT_MS
                               or pt["delivered_pps"] < 0.95 * rate)
        pt["generator_bound"] = bool(pt["gen_cores_busy"] > 0.9)
        print(f"  [{self.which:6}] offered {rate:>9,.0f} sent {pt['sent_pps']:>9,.0f} "
              f"delivered {pt['delivered_pps']:>9,.0f} loss {pt['loss']} "
              f"p50 {pt['p50_ms']} p99 {pt['p99_ms']} ms cpu/Mpkt "
              f"{pt['server_cpu_s_per_mpkt']} s relay {pt['server_cores_busy']} "
              f"gen {pt['gen_cores_busy']} cores"
              + (" SATURATED" if pt["saturated"] else "")
              + (" GENERATOR-BOUND" if pt["generator_bound"] else ""), flush=True)
        return pt

    def close(self) -> dict[str, Any]:
        self.gen.stop()
        peak = peak_rss_mib(self.proc.pid) if self.proc.poll() is None else None
        self._stack.close()
        return {"idle_rss_mib": rnd(self.idle_rss, 1), "peak_rss_mib": rnd(peak, 1)}


def find_saturation(args: argparse.Namespace, work: Path, certdir: Path, gen: Path) -> float:
    """derper's saturation: ramp the offered load (x1.4 per step, short points) until it falls
    behind the offered load and delivers no more than at the step before; S is the most it
    delivered."""
    print("-- ramp: derper's saturation (1+3 s points)", flush=True)
    relay = Relay("derper", args, work, certdir, gen)
    best = 0.0
    try:
        rate = RAMP_START
        while rate <= RAMP_MAX:
            pt = relay.point(rate, 1.0, 3.0)
            if pt["generator_bound"]:
                raise BenchError("the generator saturated before derper did")
            grew = pt["delivered_pps"] > 1.05 * best
            best = max(best, pt["delivered_pps"])
            if pt["delivered_pps"] < 0.9 * rate and not grew:
                break  # falling behind the offered load and no longer delivering more
            rate = round(rate * RAMP_STEP, -3)
    finally:
        relay.close()
    print(f"   derper saturates at {best:,.0f} packets/s delivered", flush=True)
    return best


def sweep(which: str, rates: list[float], args: argparse.Namespace, work: Path,
          certdir: Path, gen: Path) -> dict[str, Any]:
    print(f"-- {which} ({args.warm:g}+{args.measure:g} s points)", flush=True)
    relay = Relay(which, args, work, certdir, gen)
    points = []
    try:
        for rate in rates:
            points.append(relay.point(rate, args.warm, args.measure))
            time.sleep(0.5)
    finally:
        mem = relay.close()
    peak = max((p["delivered_pps"] for p in points), default=None)
    return {"points": points, "peak_delivered_pps": peak, **mem}


# == summary ================================================================================


def _at(points: list[dict[str, Any]], rate: float | None) -> dict[str, Any]:
    return next((p for p in points if p["offered_pps"] == rate), {})


def summarize(results: dict[str, dict[str, Any]], sat: float | None,
              rates: list[float]) -> dict[str, Any]:
    """Side-by-side table over the ladder, then the target figures and ratios ours/derper."""
    names = [n for n in ("ours", "derper") if n in results]
    rows: list[Sequence[Any]] = []
    for rate in rates:
        row: list[Any] = [int(rate), round(rate / sat, 2) if sat else None]
        for n in names:
            p = _at(results[n]["points"], rate)
            deliv = p.get("delivered_pps")
            row += [None if deliv is None else int(deliv), p.get("loss"), p.get("p50_ms"),
                    p.get("p99_ms"), p.get("server_cpu_s_per_mpkt")]
        rows.append(row)
    head = ["offered", "x S"]
    for n in names:
        head += [f"{n} deliv", "loss", "p50 ms", "p99 ms", "cpu s/Mpkt"]
    print(Table(head, rows).render())

    half = min(rates, key=lambda r: abs(r - 0.5 * sat)) if sat else None
    double = max(rates)
    out: dict[str, Any] = {"derper_saturation_pps": sat, "half_load_pps": half,
                           "overload_pps": double}
    for n in names:
        pts = results[n]["points"]
        peak = results[n]["peak_delivered_pps"]
        at_peak: dict[str, Any] = max(pts, key=lambda p: p["delivered_pps"], default={})
        per_mpkt = at_peak.get("server_cpu_s_per_mpkt")
        h, d = _at(pts, half), _at(pts, double)
        below_sat = [p["server_cpu_s_per_mpkt"] for p in pts
                     if p["offered_pps"] <= (sat or 0) and p["server_cpu_s_per_mpkt"]]
        out[n] = {
            "peak_delivered_pps": peak,
            "p99_ms_at_half": h.get("p99_ms"),
            "p50_ms_at_half": h.get("p50_ms"),
            "overload_delivered_pps": d.get("delivered_pps"),
            "overload_loss": d.get("loss"),
            "overload_skipped_frac": d.get("skipped_frac"),
            "overload_p99_ms": d.get("p99_ms"),
            "collapse": bool(peak and (d.get("delivered_pps") or 0) < COLLAPSE * peak),
            "cpu_s_per_mpkt_min": min(below_sat) if below_sat else None,
            # Whether the relay had its core at its peak; if not, other work on the machine
            # set the peak, and packets/s per core of CPU it used is the steadier figure.
            "core_use_at_peak": at_peak.get("server_cores_busy"),
            "starved_at_peak": bool((at_peak.get("server_cores_busy") or 0) < STARVED),
            "pps_per_core_at_peak": round(1e6 / per_mpkt) if per_mpkt else None,
        }
    if {"ours", "derper"} <= set(names):
        o, t = out["ours"], out["derper"]
        out["ratios"] = {
            "peak_delivered": ratio(o["peak_delivered_pps"], t["peak_delivered_pps"]),
            "p99_at_half": ratio(o["p99_ms_at_half"], t["p99_ms_at_half"]),
            "overload_delivered": ratio(o["overload_delivered_pps"],
                                        t["overload_delivered_pps"]),
            "cpu_per_mpkt": ratio(o["cpu_s_per_mpkt_min"], t["cpu_s_per_mpkt_min"]),
            "pps_per_core_at_peak": ratio(o["pps_per_core_at_peak"], t["pps_per_core_at_peak"]),
        }
        r = out["ratios"]
        out["targets"] = {
            "peak_ge_1x": bool(r["peak_delivered"] and r["peak_delivered"] >= 1.0),
            "p99_at_half_le_1_5x": bool(r["p99_at_half"] is not None
                                        and r["p99_at_half"] <= 1.5),
            "no_collapse_at_2x": not o["collapse"],
        }
    for n in names:
        x = out[n]
        print(f"{n:6}: peak {x['peak_delivered_pps']} pkt/s; at 0.5 S p50 {x['p50_ms_at_half']}"
              f" p99 {x['p99_ms_at_half']} ms; at 2 S delivered {x['overload_delivered_pps']}"
              f" loss {x['overload_loss']} skipped {x['overload_skipped_frac']} p99 "
              f"{x['overload_p99_ms']} ms{' COLLAPSE' if x['collapse'] else ''}; "
              f"cpu {x['cpu_s_per_mpkt_min']} s/Mpkt; at its peak {x['core_use_at_peak']} "
              f"of a core{' (STARVED: the machine was busy)' if x['starved_at_peak'] else ''}, "
              f"{x['pps_per_core_at_peak']} pkt/s per core used")
    if "ratios" in out:
        print(f"ours/derper: {out['ratios']}; targets {out['targets']}")
    return out


# == main ===================================================================================


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1+3 s points instead of 3+15 s")
    ap.add_argument("--pairs", type=int, default=PAIRS)
    ap.add_argument("--rates", default="",
                    help="offered loads (aggregate packets/s, comma-separated); skips the ramp")
    ap.add_argument("--derper-peak", type=float, default=0.0,
                    help="use this as derper's saturation S instead of ramping")
    ap.add_argument("--servers", default="ours,derper")
    ap.add_argument("--no-coalesce", dest="coalesce", action="store_false",
                    help="one TLS write per packet (as tailscaled does) instead of one per "
                         "sender per pacing tick")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="let relay and generator float over all cores")
    ap.add_argument("--nice", type=int, default=0,
                    help="niceness for relays and generator alike (root may give a negative "
                         "one: steadier figures on a machine other work keeps busy)")
    args = ap.parse_args(argv)
    args.warm, args.measure = (1.0, 3.0) if args.quick else (3.0, 15.0)
    if args.pin and (os.cpu_count() or 1) < 2:
        args.pin = False
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    info = machine_info()
    try:
        gen = build_go.ensure_derpload()
    except build_go.BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        emit_json({"benchmark": "derp", "error": str(e)[:2000]})
        return 1
    print(f"derp benchmark: {args.pairs} pairs, {PAYLOAD}-byte packets, TLS on 127.0.0.1, "
          f"{'coalesced' if args.coalesce else 'per-packet'} writes, "
          f"{'relay on CPU 1 / generator on CPU 0' if args.pin else 'unpinned'}, "
          f"nice {args.nice}; "
          f"{info['cpu']} x{info['nproc']}, Python {info['python']}, uvloop "
          f"{info['uvloop'] or 'not installed'}, derper {build_go.DERPER_VERSION}, "
          f"load average {info['loadavg_at_start']:.2f}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    sat: float | None = None
    rates: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-derp-") as tmp:
        work = Path(tmp)
        certdir = work / "certs"
        from derp.tls import ensure_self_signed

        ensure_self_signed(certdir, LOOPBACK)  # one certificate for both relays
        try:
            if args.rates:
                rates = sorted(float(r) for r in args.rates.split(",") if r.strip())
                sat = args.derper_peak or None
            else:
                sat = args.derper_peak or find_saturation(args, work, certdir, gen)
                rates = [float(round(f * sat, -3)) for f in LADDER]
            for s in servers:
                results[s] = sweep(s, rates, args, work, certdir, gen)
        except (BenchError, build_go.BuildError) as e:
            print(f"error: {e}", file=sys.stderr)
            emit_json({"benchmark": "derp", "error": str(e)[:2000], "results": results})
            return 1
    summary = summarize(results, sat, rates)
    emit_json({"benchmark": "derp", "pairs": args.pairs, "payload": PAYLOAD,
               "coalesce": args.coalesce, "pinned": args.pin, "nice": args.nice,
               "warm_s": args.warm,
               "measure_s": args.measure, "machine": info,
               "loadavg_at_end": os.getloadavg()[0],
               "derper_version": build_go.DERPER_VERSION, "results": results,
               "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
