"""Fixtures for tests with official Tailscale clients in network namespaces.

Missing prerequisites (root, `ip netns`, iptables, the client binaries) make tests fail, never
skip. When a test fails, its work directory (server and tailscaled logs, configs) is copied to
/tmp/pyheadscale-test-logs/<test id>/ and the path is added to the failure report; a module's
shared tailnet (`shared_world_fixture`) is copied along into its `shared/` subdirectory.

Tests run in parallel under pytest-xdist (tests/integration/README.md): everything a test
makes is its own (namespaces named by a per-topology id, its tmp_path, its processes).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.integration import build_clients
from tests.integration.netns import Host, Topology
from tests.integration.procs import NamespacedProcess
from tests.integration.server import CertAuthority, PyHeadscale, make_test_ca
from tests.integration.tailscale import Tailscaled
from tests.integration.world import World, world_fixture

LOG_ROOT = Path(os.environ.get("PYHEADSCALE_TEST_LOGS", "/tmp/pyheadscale-test-logs"))
_WORKDIR = pytest.StashKey[Path]()
_KEPT = pytest.StashKey[Path]()
# Work directories of module-shared tailnets, by test file, kept with a failing test's logs.
_SHARED_DIRS: dict[str, Path] = {}
_FAILED = pytest.StashKey[bool]()


def test_failed(item: pytest.Item) -> bool:
    """Whether the test's setup or body failed so far (fixtures keep artefacts then)."""
    return item.stash.get(_FAILED, False)


test_failed.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


# Files far longer than the rest (Headscale's 12-minute online-status run): the suite hands
# out files in collection order, one per worker, so these go first or they set its end.
LONG_FILES = ("test_general_online.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)
    items.sort(key=lambda item: Path(str(item.fspath)).name not in LONG_FILES)  # stable


# -- prerequisites -------------------------------------------------------------------------


def _prerequisite_problems() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("integration tests need root (network namespaces, iptables, TUN)")
    if shutil.which("ip") is None:
        problems.append("`ip` (iproute2) is not installed")
    else:
        res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            problems.append(f"`ip netns` does not work: {res.stderr.strip()}")
    if shutil.which("iptables") is None:
        problems.append("iptables is not installed")
    if not Path("/dev/net/tun").exists():
        problems.append("/dev/net/tun is missing (kernel TUN for tailscaled)")
    return problems


@pytest.fixture(scope="session")
def netns_ready() -> None:
    problems = _prerequisite_problems()
    if problems:
        pytest.fail("integration prerequisites missing: " + "; ".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def clients_built() -> dict[str, Path]:
    """Every pinned client version built (builds missing ones; fails if that is impossible)."""
    try:
        return build_clients.ensure_all()
    except build_clients.BuildError as exc:
        pytest.fail(f"official Tailscale clients unavailable: {exc}", pytrace=False)


# -- per-test resources --------------------------------------------------------------------


@pytest.fixture
def workdir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """The test's directory for configs and logs (kept under LOG_ROOT if the test fails)."""
    request.node.stash[_WORKDIR] = tmp_path
    return tmp_path


def _topology() -> Iterator[Topology]:
    topo = Topology()
    try:
        yield topo
    finally:
        topo.close()
        left = topo.leftovers()
        assert not left, f"namespaces left behind: {left}"


@pytest.fixture
def topology(netns_ready: None) -> Iterator[Topology]:
    """A fresh topology with only the internet segment; always torn down."""
    yield from _topology()


@pytest.fixture
def test_ca(workdir: Path) -> CertAuthority:
    return make_test_ca(workdir / "tls")


P = TypeVar("P", bound=NamespacedProcess)


def _started(build: Callable[..., P]) -> Iterator[Callable[..., P]]:
    """Yield `make(...)`: build(index, ...) then start it; close them all, newest first."""
    made: list[P] = []

    def make(*args: Any, **kwargs: Any) -> P:
        proc = build(len(made), *args, **kwargs)
        made.append(proc)
        proc.start()
        return proc

    yield make
    for proc in reversed(made):
        proc.close()


def _tailscaleds(workdir: Path) -> Iterator[Callable[..., Tailscaled]]:
    def build(n: int, host: Host, version: str, **kwargs: Any) -> Tailscaled:
        d = workdir / f"tailscaled-{host.name}-{version}-{n}"
        return Tailscaled(host, version, d, start=False, **kwargs)

    yield from _started(build)


@pytest.fixture
def tailscaled_factory(
    topology: Topology, workdir: Path, clients_built: dict[str, Path]
) -> Iterator[Callable[..., Tailscaled]]:
    """`make(host, version, **kw)` -> a started Tailscaled; all are stopped at teardown."""
    yield from _tailscaleds(workdir)


# -- one tailnet shared by the tests of a module -------------------------------------------


@pytest.fixture(scope="module")
def module_workdir(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory of a module-shared tailnet (kept with any failing test's logs)."""
    d = tmp_path_factory.mktemp(Path(str(request.node.fspath)).stem)
    _SHARED_DIRS[str(request.node.fspath)] = d
    return d


@pytest.fixture(scope="module")
def module_topology(netns_ready: None) -> Iterator[Topology]:
    yield from _topology()


@pytest.fixture(scope="module")
def module_tailscaled_factory(
    module_topology: Topology, module_workdir: Path, clients_built: dict[str, Path]
) -> Iterator[Callable[..., Tailscaled]]:
    yield from _tailscaleds(module_workdir)


@pytest.fixture
def pyheadscale_factory(topology: Topology, workdir: Path) -> Iterator[Callable[..., PyHeadscale]]:
    """`make(host, overrides=None, **kw)` -> a started PyHeadscale; stopped at teardown."""
    def build(n: int, host: Host, overrides: dict[str, Any] | None = None,
              **kwargs: Any) -> PyHeadscale:
        return PyHeadscale(host, workdir / f"server-{host.name}-{n}", overrides, start=False,
                           **kwargs)

    yield from _started(build)


# -- keeping logs of failed tests ----------------------------------------------------------


def _keep_workdir(item: pytest.Item) -> Path | None:
    own = item.stash.get(_WORKDIR, None)
    shared = _SHARED_DIRS.get(str(item.fspath))
    sources = [(src, sub) for src, sub in ((own, ""), (shared, "shared"))
               if src is not None and src.exists()]
    if not sources:
        return None
    dest = item.stash.get(_KEPT, None)
    if dest is None:
        safe = re.sub(r"[^A-Za-z0-9_.\-\[\]]+", "_", item.nodeid).strip("_")[:200]
        dest = LOG_ROOT / safe
        shutil.rmtree(dest, ignore_errors=True)
        item.stash[_KEPT] = dest
    for src, sub in sources:
        # Sockets and other special files cannot be copied; skip them.
        shutil.copytree(
            src, dest / sub, dirs_exist_ok=True, ignore_dangling_symlinks=True,
            ignore=lambda d, names: [n for n in names if _is_special(Path(d) / n)],
        )  # fmt: skip
    return dest


def _is_special(p: Path) -> bool:
    try:
        return not (p.is_file() or p.is_dir()) or p.is_socket()
    except OSError:
        return True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    rep: pytest.TestReport = outcome.get_result()
    if rep.failed:
        item.stash[_FAILED] = True
    # Copy while daemons still run (setup/call), and again after teardown for the final lines.
    if rep.failed or (rep.when == "teardown" and _KEPT in item.stash):
        try:
            dest = _keep_workdir(item)
        except OSError as exc:
            rep.sections.append(("pyheadscale logs", f"could not keep logs: {exc}"))
            return
        if dest is not None and rep.when != "teardown":
            logs = sorted(str(p) for p in dest.rglob("*.log"))
            text = f"work directory kept in {dest}\n" + "\n".join(f"  {p}" for p in logs)
            rep.sections.append(("pyheadscale logs", text))


def pytest_sessionfinish(session: pytest.Session) -> None:
    # Last line of defence against leaked namespaces from this process's topologies.
    from tests.integration import netns

    for topo in list(netns._LIVE):
        topo.close()


# A server host with a seeded pyheadscale (`world.start_server()`) and joining clients.
world = world_fixture(World)
