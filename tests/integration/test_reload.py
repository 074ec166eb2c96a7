"""SIGHUP reloads the DNS section of the config file: clients resolve
the edited `dns.extra_records` without a restart."""

from __future__ import annotations

import signal

import pytest
import yaml

from tests.integration.versions import PINNED
from tests.integration.world import BASE_DOMAIN, World, dns, wait_for

pytestmark = pytest.mark.integration


def records(value: str) -> dict[str, object]:
    return {"dns": {"extra_records": [{"name": f"app.{BASE_DOMAIN}", "type": "A",
                                       "value": value}]}}


def test_sighup_reloads_extra_records(world: World) -> None:
    srv = world.start_server(records("100.64.77.1"))
    a = world.join("alpha", PINNED[-1])
    wait_for("the configured record", lambda: dns(a.host, f"app.{BASE_DOMAIN}") == ["100.64.77.1"],
             timeout=10)
    pid = srv.proc.pid if srv.proc else 0

    srv.config["dns"]["extra_records"][0]["value"] = "100.64.77.2"
    srv.config_path.write_text(yaml.safe_dump(srv.config, sort_keys=False))
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGHUP)

    wait_for("the edited record after SIGHUP",
             lambda: dns(a.host, f"app.{BASE_DOMAIN}") == ["100.64.77.2"], timeout=10)
    assert srv.running and srv.proc.pid == pid  # no restart happened
