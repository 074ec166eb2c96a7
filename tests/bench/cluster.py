"""pyheadscale as K instances of one tailnet on one PostgreSQL, for tests.bench.control
(`--instances`).

PostgreSQL (Debian's server binaries, tests/pgserver.py) runs on 127.0.0.1; every instance
has its own ports and relay and shares the Noise key file. The client worker processes are
spread over the instances (worker w dials instance w % K), so with 2 workers and 2 instances
each instance holds half the nodes and the node whose endpoint changes is on instance 0:
the fan-out figures include the hop through PostgreSQL's LISTEN/NOTIFY for the other half.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

import yaml

from tests.bench.common import LOOPBACK, VENV_PYTHON, server_process
from tests.bench.control import (
    Target,
    _cli_key,
    _common_config,
    _policy_setup,
    _ports,
    _wait_health,
    run_load,
)
from tests.pgserver import PostgresServer


def bench_pyheadscale_cluster(args: argparse.Namespace, root: Path, k: int) -> dict[str, Any]:
    """The control benchmark against `k` instances on PostgreSQL (k = 1: one instance on
    PostgreSQL, the baseline the others compare with)."""
    work = root / f"pyheadscale-pg{k}"
    work.mkdir()
    with PostgresServer() as pg, contextlib.ExitStack() as stack:
        db = pg.create_database("headscale")
        urls, pids, logs, cfgs = [], [], [], []
        for i in range(k):
            inst = work / f"inst{i}"
            inst.mkdir()
            p = _ports()
            cfg = _common_config(inst, p, args)
            cfg["noise"]["private_key_path"] = str(work / "noise_private.key")
            cfg["database"] = {"type": "postgres", "postgres": {
                "host": db["host"], "port": db["port"], "name": db["name"],
                "user": db["user"], "pass": db["password"]}}
            cfg["derp"]["server"]["listen_addr"] = f"{LOOPBACK}:{p['derp']}"
            cfg["derp"]["server"]["hostname"] = LOOPBACK
            path = inst / "config.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            log = inst / "server.log"
            argv = [str(VENV_PYTHON), "-m", "pyheadscale", "-c", str(path), "serve"]
            proc = stack.enter_context(server_process(argv, log, env={"PYTHONUNBUFFERED": "1"},
                                                      cwd=inst))
            # One at a time: the first creates the shared Noise key file the others read.
            _wait_health(cfg["server_url"], proc, log)
            urls.append(cfg["server_url"])
            pids.append(proc.pid)
            logs.append(log)
            cfgs.append(path)
        cli = [str(VENV_PYTHON), "-m", "pyheadscale", "-c", str(cfgs[0])]
        target = Target(f"pyheadscale-pg{k}", urls, pids, _cli_key(cli))
        _policy_setup(cli, target, args)
        res = run_load(target, args)
    res["instances"] = k
    res["log_lines"] = sum(len(log.read_text(errors="replace").splitlines()) for log in logs)
    return res
