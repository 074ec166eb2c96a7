"""Fixtures of the unit tests: a tailnet, a control plane and the whole server, each fresh
per test and built from the real parts on SQLite under the test's tmp_path."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pyheadscale.app import Server
from pyheadscale.control.dispatch import ControlPlane
from pyheadscale.state.tailnet import Tailnet
from tests.inproc import running_server, server_config
from tests.unit._statefix import new_engine, open_control, open_tailnet


@pytest.fixture
async def tailnet(tmp_path: Path) -> AsyncIterator[Tailnet]:
    """The default test configuration (no node expiry, changes delivered at once)."""
    tn = await open_tailnet(new_engine(tmp_path))
    try:
        yield tn
    finally:
        await tn.close()


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    """A control plane in database policy mode, no policy yet (allow-all)."""
    cp = await open_control(tmp_path)
    try:
        yield cp
    finally:
        await cp.tailnet.close()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    """The whole server in this process on loopback (embedded DERP and STUN included)."""
    async with running_server(server_config(tmp_path / "server")) as srv:
        yield srv
