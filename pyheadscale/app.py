"""Builds the server: listeners, the aiohttp app, background tasks. Nothing else lives here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
from asyncio import sslproto
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web
from sqlalchemy import Engine

from pyheadscale import __version__
from pyheadscale.api import add_api_routes, version_info
from pyheadscale.api.v2 import Settings, V2Deps, add_v2_routes
from pyheadscale.cluster import is_clustered
from pyheadscale.config import Config, ConfigError
from pyheadscale.config.errors import key_error
from pyheadscale.console import AdminConsole
from pyheadscale.control.dispatch import ControlPlane
from pyheadscale.control.h2limits import H2Limits
from pyheadscale.control.upgrade import add_routes
from pyheadscale.db.engine import engine_from_config
from pyheadscale.db.migrator import migrate_apart
from pyheadscale.debug import DebugDeps, metrics_app
from pyheadscale.debugview import owner_name
from pyheadscale.embedded_derp import EmbeddedDerp
from pyheadscale.fsperms import private_dir
from pyheadscale.gcsettings import settle_after_start
from pyheadscale.listener import (
    MainListener,
    add_takeover_route,
    door_limits,
    http_metrics,
    socket_access_log,
)
from pyheadscale.logs import configure as configure_logging
from pyheadscale.logs import fields
from pyheadscale.memory import trim_periodically, tune_malloc
from pyheadscale.metrics import ServerView, server_registry, state_written
from pyheadscale.noise.keys import load_or_create_private_key, public_key
from pyheadscale.pages import add_page_routes, security_headers
from pyheadscale.realip import RealIP
from pyheadscale.servertls import ServerTLS
from pyheadscale.startup import database_step, failing_key
from pyheadscale.state.changelog import ChangeLog
from pyheadscale.state.changes import ChangeKind
from pyheadscale.state.oauth import OAuthStore
from pyheadscale.state.tailnet import Tailnet

if TYPE_CHECKING:
    # Imported where used: a server without a cluster or ACME never loads psycopg, or acme
    # with requests and josepy (about 10 MiB resident between them).
    from pyheadscale.cluster.member import ClusterMember, InstanceInfo
    from pyheadscale.letsencrypt import AcmeManager

log = logging.getLogger("pyheadscale")
MESH_KEY = "derp_mesh_key"  # cluster_state key of the relays' shared mesh key
NOISE_KEY = "noise_public_key"  # cluster_state key: the control key every instance serves


def split_hostport(addr: str, default_port: int) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep:
        return addr, default_port
    return host.strip("[]") or "0.0.0.0", int(port)


class Server:
    """One running pyheadscale: state, control plane, embedded DERP and the HTTP listeners."""

    # Set by start(), in this order; stop() skips the ones a failed start never reached.
    engine: Engine
    tailnet: Tailnet
    control: ControlPlane
    main: MainListener

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.runners: list[web.BaseRunner] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.derp: EmbeddedDerp | None = None
        self.cluster: ClusterMember | None = None
        self._relay_tasks: set[asyncio.Task[None]] = set()
        self.acme: AcmeManager | None = None
        self.console: AdminConsole | None = None
        self.metrics_listener: MainListener | None = None
        self.stopped = asyncio.Event()

    async def start(self, before_listening: Callable[[], None] | None = None) -> None:
        """Start everything; a failure is a ConfigError naming the key behind it (the caller
        then stops what did start). `before_listening` runs once the state is loaded, before
        the main listener takes connections (the serving process settles its GC there)."""
        cfg = self.cfg
        db = cfg.database.type
        with failing_key("data_dir", "cannot create the data directory"):
            private_dir(cfg.data_dir)
        open_files = raise_fd_limit()
        shrink_tls_read_buffers()
        tune_malloc()  # before the first thread starts
        with database_step(db, "cannot open the database"):
            self.engine = engine_from_config(cfg.database)
            await asyncio.to_thread(migrate_apart, self.engine, cfg.database)
            # On PostgreSQL other instances may share the database: log every write for them.
            changelog = None
            if is_clustered(self.engine):
                from pyheadscale.cluster.member import new_instance_id

                changelog = ChangeLog(new_instance_id())
            self.tailnet = await Tailnet.load(self.engine, cfg, changelog=changelog)
            self.tailnet.write_observer = state_written
        mesh_key, node_name = None, ""
        if changelog is not None and cfg.derp.server.enabled:
            # One region of every instance's relay, meshed with a key they share.
            node_name = changelog.instance_id
            if not cfg.derp.server.mesh_key_path:
                from pyheadscale.cluster.member import shared_secret

                with database_step(db, "cannot read the shared relay mesh key"):
                    mesh_key = await asyncio.to_thread(shared_secret, self.engine, MESH_KEY)
        noise_path = cfg.noise.private_key_path or Path(cfg.data_dir) / "noise_private.key"
        with failing_key("noise.private_key_path", "cannot read or create the Noise key"):
            noise_key = load_or_create_private_key(noise_path)
        if changelog is not None:
            # Clients keep the server key they fetched first: every instance needs the same.
            mine = public_key(noise_key).hex()
            from pyheadscale.cluster.member import first_value

            with database_step(db, "cannot read the shared Noise public key"):
                first = await asyncio.to_thread(first_value, self.engine, NOISE_KEY, mine)
            if first != mine:
                raise key_error("noise.private_key_path",
                                f"{noise_path} holds another key than the other instances "
                                f"on this database use (public key {first}); copy their "
                                "key file here")

        limits = door_limits(cfg.limits)
        if cfg.derp.server.enabled:
            self.derp = EmbeddedDerp(cfg, self.tailnet, limits, mesh_key=mesh_key,
                                     node_name=node_name)
            await self.derp.start()
        self.control = ControlPlane(cfg, self.tailnet, self.engine, self.derp)
        await self.control.start()
        self.oauth = await OAuthStore.load(self.engine, self.tailnet)
        for table in ("oauth_clients", "oauth_access_tokens"):
            self.tailnet.on_table(table, lambda _keys: self.oauth.reload_soon())
        self.v2 = V2Deps(tailnet=self.tailnet, oauth=self.oauth,
                         policy=self.control.policy, settings=Settings.from_config(cfg),
                         revoked_key_retention=cfg.preauth_keys.revoked_retention)
        self.tasks.append(asyncio.create_task(self._reap_hourly()))
        if changelog is not None:
            from pyheadscale.cluster.member import ClusterMember

            self.cluster = ClusterMember(self.tailnet, info=self._cluster_info)
            self.cluster.on_instances.append(self._instances_changed)
            await self.cluster.start()
        self.tasks.append(asyncio.create_task(trim_periodically()))

        app = web.Application(client_max_size=1 << 20, middlewares=[security_headers])
        tailnet = self.tailnet
        add_routes(app, noise_key, self.control.dispatch, limits=H2Limits.from_config(cfg.limits),
                   body_budget=cfg.limits.http2_max_buffered_body_total,
                   is_registered=lambda mk: bool(tailnet.nodes_by_machine_key(mk)))
        if self.derp is not None:
            add_takeover_route(app, self.derp.router(lambda: self.control.mapctx.derp_map))
        app.router.add_get("/health", self.health)
        app.router.add_get("/version", self.version)
        add_page_routes(app, cfg.server_url)
        app.router.add_post("/verify", self.verify)
        self.control.add_web_routes(app)
        add_api_routes(app, self.control.admin, trusted=False,
                       cors_origins=cfg.cors_allowed_origins)
        add_v2_routes(app, self.v2, trusted=False)
        if cfg.admin_console.enabled:
            self.console = AdminConsole(self.control.console_deps())
            self.console.mount(app)

        host, port = split_hostport(cfg.listen_addr, 8080)
        tls: ServerTLS | None = None
        if cfg.tls_letsencrypt_hostname:
            from pyheadscale.letsencrypt import AcmeManager, AcmeSettings

            tls = ServerTLS(peek_alpn=cfg.tls_letsencrypt_challenge_type == "TLS-ALPN-01")
            self.acme = AcmeManager(AcmeSettings(
                hostname=cfg.tls_letsencrypt_hostname,
                challenge=cfg.tls_letsencrypt_challenge_type,
                directory_url=cfg.acme_url, email=cfg.acme_email,
                cache_dir=cfg.tls_letsencrypt_cache_dir or Path(cfg.data_dir) / "cache",
                http_listen=cfg.tls_letsencrypt_listen, server_url=cfg.server_url), tls)
        elif cfg.tls_cert_path is not None and cfg.tls_key_path is not None:  # a checked pair
            tls = ServerTLS()
            with failing_key("tls_cert_path", f"cannot load {cfg.tls_cert_path} with "
                             f"{cfg.tls_key_path}"):
                tls.use(Path(cfg.tls_cert_path), Path(cfg.tls_key_path))
        if before_listening is not None:
            before_listening()
        self.main = MainListener(app, RealIP.from_config(cfg.trusted_proxies), limits)
        with failing_key("listen_addr", f"cannot listen on {cfg.listen_addr}"):
            await self.main.start(host, port, tls)
        if self.acme is not None:
            await self.acme.start()
        if cfg.metrics_listen_addr:
            mhost, mport = split_hostport(cfg.metrics_listen_addr, 9090)
            with failing_key("metrics_listen_addr", f"cannot listen on {cfg.metrics_listen_addr}"):
                # Behind a front door too: the same head and keep-alive timeouts as the others.
                self.metrics_listener = MainListener(metrics_app(self.debug_deps()),
                                                     limits=limits, observed=False)
                await self.metrics_listener.start(mhost, mport, None)
        if cfg.unix_socket:
            with failing_key("unix_socket", f"cannot serve the CLI socket {cfg.unix_socket}"):
                await self._unix_site(cfg.unix_socket, cfg.unix_socket_permission)

        url = urlsplit(cfg.server_url)
        log.info("pyheadscale %s: serving %s on %s", __version__, cfg.server_url, cfg.listen_addr,
                 extra=fields(version=__version__, server_url=cfg.server_url,
                              listen_addr=cfg.listen_addr))
        log.info("data directory: %s", Path(cfg.data_dir).resolve())
        # Logged once started: a start-up failure stays the only line on stderr.
        log.info("open files limit: %s", open_files)
        if self.derp is not None:
            log.info("embedded DERP: %s", self.derp.describe())
        log.info("create a user and a key: headscale users create <name>; headscale "
                 "preauthkeys create --user <user id> --reusable; then: tailscale up "
                 "--login-server %s://%s --authkey <key>", url.scheme, url.netloc)

    async def _unix_site(self, path: str, mode: int) -> None:
        """The CLI's socket: the API with local trust (access to the socket is the boundary)."""
        sock_app = web.Application(client_max_size=1 << 20,
                                   middlewares=[socket_access_log, http_metrics])
        add_api_routes(sock_app, self.control.admin, trusted=True,
                       cors_origins=self.cfg.cors_allowed_origins)
        add_v2_routes(sock_app, self.v2, trusted=True)
        if self.console is not None:
            self.console.add_socket_routes(sock_app)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket from a previous run
        runner = web.AppRunner(sock_app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.UnixSite(runner, path).start()
        os.chmod(path, mode)
        self.runners.append(runner)

    def _cluster_info(self) -> dict[str, Any]:
        """What this instance offers the others: its relay's DERP node and mesh address."""
        return {"derp": self.derp.cluster_info()} if self.derp is not None else {}

    def _instances_changed(self, instances: Mapping[str, InstanceInfo]) -> None:
        if self.derp is None or self.cluster is None:
            return
        me = self.cluster.id
        peers = {i: inst.info["derp"] for i, inst in instances.items()
                 if i != me and isinstance(inst.info.get("derp"), dict)}
        task = asyncio.get_running_loop().create_task(self._set_relay_peers(peers))
        self._relay_tasks.add(task)
        task.add_done_callback(self._relay_tasks.discard)

    async def _set_relay_peers(self, peers: dict[str, dict[str, Any]]) -> None:
        assert self.derp is not None
        if await self.derp.set_peers(peers):
            log.info("relay region now %d nodes", len(peers) + 1)
            self.control.refresh_context(ChangeKind.DERP)

    async def _reap_hourly(self) -> None:
        """Expired OAuth tokens and long-revoked auth keys go; the checks that reject them
        do not depend on this, it only keeps the tables small. The leader's job."""
        while True:
            await asyncio.sleep(3600)
            if not self.tailnet.membership.is_leader:
                continue
            try:
                await self.oauth.reap()
                cutoff = datetime.now(UTC) - self.v2.revoked_key_retention
                await self.tailnet.reap_revoked_preauth_keys(cutoff)
            except Exception:  # a failed sweep is retried an hour later
                log.exception("reaping expired credentials failed")

    async def stop(self) -> None:
        """Stop what is running; also after a start that failed half-way."""
        if self.cluster is not None:
            await self.cluster.stop()
        for rt in list(self._relay_tasks):
            rt.cancel()
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        started = vars(self)
        if "control" in started:
            await self.control.stop()
        if self.acme is not None:
            await self.acme.stop()
        if "main" in started:
            await self.main.stop()
        if self.metrics_listener is not None:
            await self.metrics_listener.stop()
        for runner in reversed(self.runners):
            await runner.cleanup()
        if self.derp is not None:
            await self.derp.stop()
        if "tailnet" in started:
            await self.tailnet.close()
        if "engine" in started:
            self.engine.dispose()

    # --- plain HTTP handlers -------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        """Pass or fail only, as Headscale answers; the reason goes to the log, never to an
        anonymous caller (database errors name hosts, users and paths)."""
        try:
            await self.tailnet.ping_db()
        except Exception as e:  # the DB is the only dependency health reports on
            log.error("health check failed: database: %s", e)
            return _health(500, "fail")
        return _health(200, "pass")

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response(version_info())

    async def verify(self, request: web.Request) -> web.Response:
        """DERP admission for external derpers (`--verify-client-url`)."""
        raw = await request.content.read(4097)
        if len(raw) > 4096:
            return web.Response(status=413, text="request too large")
        allowed = await self.control.verify_derp_request(raw)
        if allowed is None:
            return web.Response(status=400, text="bad DERPAdmitClientRequest")
        return web.json_response({"Allow": allowed})

    def debug_deps(self) -> DebugDeps:
        """What /metrics and /debug/* read (the metrics listener)."""
        tn, cp = self.tailnet, self.control

        def node_counts() -> dict[str, tuple[int, int]]:
            out: dict[str, tuple[int, int]] = {}
            for n in tn.nodes.values():
                user = "" if n.is_tagged else owner_name(n, tn.users)
                count, up = out.get(user, (0, 0))
                out[user] = (count + 1, up + n.online)
            return out

        derp = self.derp
        view = ServerView(node_counts=node_counts, total_nodes=lambda: len(tn.nodes),
                          map_sessions=lambda: sum(1 for i in tn.nodes if tn.bus.subscribed(i)),
                          sessions_opened=lambda: tn.bus.opened,
                          ha_probes_answered=lambda: cp.routes.probes_answered,
                          derp_stats=lambda: derp.server.stats if derp is not None else None)
        return DebugDeps(cfg=self.cfg, tailnet=tn, policy=cp.policy, mapctx=lambda: cp.mapctx,
                         routes=cp.routes, pending=cp.pending, registry=server_registry(view))


def _health(status: int, text: str) -> web.Response:
    return web.Response(status=status, body=b'{"status":"%s"}\n' % text.encode(),
                        content_type="application/health+json", charset="utf-8")


TLS_READ_BUFFER = 32 * 1024


def shrink_tls_read_buffers() -> None:
    """asyncio gives every TLS connection a zero-filled 256 KiB read buffer (SSLProtocol.
    max_size), resident for the connection's life: 256 MiB for 1,000 clients holding their
    map poll, and what an attacker's open connections cost. Two TLS records' worth (reads
    loop until the socket is drained) keeps throughput and takes an eighth of it."""
    sslproto.SSLProtocol.max_size = TLS_READ_BUFFER


def raise_fd_limit() -> str:
    """Raise the open-files soft limit to the hard limit (systemd's soft default is 1,024;
    every client holds a connection or two); returns the limit now in force, for the log."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ValueError, OSError) as e:
        log.warning("could not raise the open files limit: %s", e)
        return "unchanged"
    return "unlimited" if soft == resource.RLIM_INFINITY else str(soft)


async def serve(cfg: Config) -> None:
    server = Server(cfg)
    try:
        # The cyclic GC: start-up's objects out of every later walk. Frozen before the main
        # listener opens, so no client connection's objects are frozen with them (the embedded
        # DERP relay, started earlier, may hold a few of its clients' by then).
        await server.start(before_listening=settle_after_start)
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.stop(), timeout=10)
        raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(server.control.reload()))
    await stop.wait()
    log.info("pyheadscale: shutting down")
    with contextlib.suppress(Exception):
        await asyncio.wait_for(server.stop(), timeout=10)


def run(cfg: Config) -> None:
    """`headscale serve`: log as configured, serve until SIGINT/SIGTERM. A start-up failure
    prints one line naming its config key (the traceback only at debug level), exit 1."""
    configure_logging(cfg.log.level, cfg.log.format)
    for w in cfg.warnings:
        logging.getLogger("pyheadscale.config").warning("%s", w)
    try:
        # asyncio's own loop, not uvloop (which would make a connect storm cheaper): two
        # bounds against anonymous peers rely on asyncio's transports: the TLS read buffer
        # cap (sslproto.SSLProtocol.max_size, see shrink_tls_read_buffers) and the unread-output
        # cap, whose writes uvloop's transport buffers out of our sight. Under uvloop
        # tests/integration/test_attacks.py exceeds both; see docs/limits.md.
        asyncio.run(serve(cfg))
    except ConfigError as e:
        log.debug("start-up failed", exc_info=e)
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(1)
