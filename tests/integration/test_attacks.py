"""Anonymous and hostile peers against the server process, each with its bound asserted.

One server for the module (tests/integration/attacklab.py). For every attack: the server's RSS
during it stays within ATTACK_RSS_MIB of its baseline, `GET /key` answers, official clients
of the oldest and newest pinned versions register, see the anchor peer and ping it, and
afterwards the database agrees with what the server reports, every acknowledged
registration included.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.integration.attacklab import AttackLab
from tests.integration.conftest import _WORKDIR
from tests.integration.versions import NEWEST, OLDEST
from tests.integration.world import peers_by_name, wait_for

pytestmark = pytest.mark.integration

ATTACK_RSS_MIB = 64.0
SOURCES = 24  # attacker addresses for the registration flood
OVERRIDES = {
    # A smaller table than the default 1,024, so the flood fills it from SOURCES addresses.
    "tuning": {"register_cache_max_entries": 200},
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, netns_ready: None,
        clients_built: dict[str, Path]) -> Iterator[AttackLab]:
    lab = AttackLab(tmp_path_factory.mktemp("attacks"), OVERRIDES)
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(autouse=True)
def _logs_kept_on_failure(request: pytest.FixtureRequest, lab: AttackLab) -> None:
    request.node.stash[_WORKDIR] = lab.workdir


def still_serving(lab: AttackLab) -> None:
    lab.key_answers()
    lab.official_joins(OLDEST)
    lab.official_joins(NEWEST)


def test_open_files_limit_is_raised(lab: AttackLab) -> None:
    # Started with a soft limit of 256 (the wrapper), raised to the hard limit.
    assert lab.open_files_limit() == lab.hard_nofile
    assert f"open files limit: {lab.hard_nofile}" in lab.server.log_text()


def test_registration_flood_does_not_push_out_a_waiting_user(lab: AttackLab) -> None:
    """Row 1: anonymous registrations with large or poisoned Hostinfo from many addresses and
    machine keys, some holding their Followup; a user's web registration completes."""
    segment = lab.topo.internet
    sources = [segment.allocate() for _ in range(SOURCES)]
    for ip in sources:
        lab.attacker._ip("addr", "add", f"{ip}/{segment.prefixlen}", "dev", "eth0")
    with lab.measure() as rss, lab.attack(
            "register-flood", "--count", "1200", "--sources", ",".join(sources),
            "--followup-share", "0.3", "--hostinfo-kib", "60") as flood:
        ready = flood.wait_ready(timeout=300)
        statuses = ready["statuses"]
        assert statuses.get("400", 0) >= 300, statuses  # the poisoned third
        assert statuses.get("429", 0) > 0 and statuses.get("200", 0) > 0, statuses
        lab.web_registers(OLDEST)
        still_serving(lab)
        flood.finish()
    assert rss.growth <= ATTACK_RSS_MIB, f"RSS +{rss.growth:.0f} MiB"
    lab.db_agrees()


def test_idle_and_dribbling_connections_are_closed(lab: AttackLab) -> None:
    """Row 3: 350 TLS connections to the main listener that send nothing or dribble a request
    head a byte a second, with the server started under a soft limit of 256 open files. The
    default 30 s head timeout closes every one of them."""
    with lab.measure() as rss, lab.attack("idle", "--count", "350", "--dribble", "50") as idle:
        ready = idle.wait_ready(timeout=120)
        assert ready["open"] == 350, ready  # more than the soft limit the server started with
        lab.key_answers()
        still_serving(lab)
        time.sleep(max(0.0, 40 - (time.monotonic() - idle.started)))
        done = idle.finish()
    assert done["closed"] == 350, done
    assert done["closed_after_max"] <= 35, done
    assert rss.growth <= ATTACK_RSS_MIB, f"RSS +{rss.growth:.0f} MiB"
    lab.db_agrees()


def test_bodies_that_never_end_are_bounded(lab: AttackLab) -> None:
    """Row 2: 2 connections x 100 streams x 1 MB bodies that never end."""
    with lab.measure() as rss, lab.attack("bodies", "--conns", "2", "--streams", "100",
                                          "--body-mib", "1") as bodies:
        ready = bodies.wait_ready(timeout=120)
        # Each connection got no more window than its 1 MiB cap plus the initial windows.
        assert all(sent <= (1 << 20) + 2 * 65535 for sent in ready["sent"]), ready
        still_serving(lab)
        bodies.finish()
    assert rss.growth <= ATTACK_RSS_MIB, f"RSS +{rss.growth:.0f} MiB"
    lab.db_agrees()


def test_unread_pings_close_the_connection(lab: AttackLab) -> None:
    """Row 5: 30 MiB of PING and SETTINGS frames from a peer that never reads."""
    with lab.measure() as rss, lab.attack("control-flood", "--mib", "30") as flood:
        ready = flood.wait_ready(timeout=180)
        assert ready["closed_at"] is not None, ready  # the server hung up on it
        still_serving(lab)
        flood.finish()
    assert rss.growth <= ATTACK_RSS_MIB, f"RSS +{rss.growth:.0f} MiB"
    lab.db_agrees()


def test_poisoned_hostinfo_never_reaches_peers(lab: AttackLab) -> None:
    """Row 4: a registered node sends Hostinfo with wrong types, unknown keys and 500 KB of
    padding. Official peers of the oldest and newest versions keep decoding their maps (they
    see the node's later rename and ping each other) and show its real name and addresses,
    also after a server restart (what was stored is clean)."""
    old = lab.official_joins(OLDEST)
    peers = {"anchor": lab.anchor, lab.joined[-1]: old}
    with lab.measure() as rss, lab.attack("hostile-node",
                                          "--authkey", lab.world.keys["reusable"]) as atk:
        ready = atk.wait_ready(timeout=60)
        # Wrong types: refused (400); unknown keys and padding: dropped, the rest kept.
        assert ready["statuses"] == [400, 400, 400, 400, 400, 200], ready
        hostile = next(n for n in lab.server.cli_json("nodes", "list")
                       if n["givenName"] == "hostile")
        for name, ts in peers.items():
            wait_for(f"{name} to show the hostile node's name and addresses", lambda ts=ts: (
                (p := peers_by_name(ts.status_json()).get("hostile")) is not None
                and sorted(p["TailscaleIPs"]) == sorted(hostile["ipAddresses"])), timeout=20)
        stored = lab.stored_hostinfo(int(hostile["id"]))
        assert stored == {"Hostname": "hostile", "OS": "linux"}, stored
        # The peers' maps keep flowing: a rename of the hostile node reaches both.
        r = lab.server.cli("nodes", "rename", "-i", str(hostile["id"]), "renamed-hostile")
        assert r.returncode == 0, r.stderr
        for name, ts in peers.items():
            wait_for(f"{name} to see the rename", lambda ts=ts: any(
                p["DNSName"].startswith("renamed-hostile.")
                for p in (ts.status_json().get("Peer") or {}).values()), timeout=20)
        r = old.ping(lab.anchor_ip, count=10, until_direct=False)
        assert r.returncode == 0 and "pong from" in r.stdout, r.stdout + r.stderr
        still_serving(lab)
        atk.finish()
    assert rss.growth <= ATTACK_RSS_MIB, f"RSS +{rss.growth:.0f} MiB"
    lab.server.restart()
    for name, ts in peers.items():
        ts.wait_state("Running", timeout=60)
        wait_for(f"{name} to list the renamed node after the restart", lambda ts=ts: any(
            p["DNSName"].startswith("renamed-hostile.")
            for p in (ts.status_json().get("Peer") or {}).values()), timeout=30)
    r = old.ping(lab.anchor_ip, count=10, until_direct=False)
    assert r.returncode == 0 and "pong from" in r.stdout, r.stdout + r.stderr
    lab.joined.append("renamed-hostile")
    lab.db_agrees()


def test_health_database_version_and_file_modes(lab: AttackLab) -> None:
    """Row 7: /health says pass/fail only; a database from a newer Headscale is refused with
    a clear message and left as it is; the data directory is 0700 and the database 0600."""
    status, body = lab.server.http_get("/health")
    assert (status, json.loads(body)) == (200, {"status": "pass"})
    data_dir = Path(lab.server.config["data_dir"])
    db_path = Path(lab.server.config["database"]["sqlite"]["path"])
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    for f in db_path.parent.glob(db_path.name + "*"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f

    newer = lab.workdir / "newer"
    newer.mkdir()
    shutil.copy(db_path, newer / "db.sqlite")
    with contextlib.closing(sqlite3.connect(newer / "db.sqlite")) as db:
        db.execute("UPDATE database_versions SET version = 'v0.30.1' WHERE id = 1")
        db.commit()
    cfg = {**lab.server.config, "database": {"type": "sqlite", "sqlite": {
        "path": str(newer / "db.sqlite")}}, "listen_addr": "127.0.0.1:18080",
        "metrics_listen_addr": "", "unix_socket": str(newer / "hs.sock"),
        "data_dir": str(newer)}
    (newer / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = lab.server.host.run([str(lab.server.python), "-m", "pyheadscale", "-c",
                             str(newer / "config.yaml"), "serve"], timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    # One start-up failure line naming the database key, then why and what to do.
    assert re.search(r"config: database\.sqlite\.path: .*database was last used by Headscale "
                     r"v0\.30\.1, newer than", r.stderr), r.stderr
    assert "Traceback" not in r.stderr
    with contextlib.closing(sqlite3.connect(newer / "db.sqlite")) as db:
        assert db.execute("SELECT version FROM database_versions").fetchone()[0] == "v0.30.1"
    still_serving(lab)
    lab.db_agrees()
