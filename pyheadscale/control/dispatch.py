"""The control plane behind the Noise tunnel: routing, the map context, reloads.

`ControlPlane.dispatch` is what the HTTP/2-over-Noise server calls for every request; it routes
on `:path` only (clients may send `:authority unused`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web
from sqlalchemy import Engine

from pyheadscale import metrics, tailcfg
from pyheadscale.api.actions import AdminActions
from pyheadscale.api.handlers.base import AdminDeps
from pyheadscale.auth.oidc import OIDCProvider
from pyheadscale.config import Config, ConfigError, load_config
from pyheadscale.config.errors import key_error
from pyheadscale.console.deps import ConsoleDeps
from pyheadscale.control.admission import Admission
from pyheadscale.control.derpurls import DerpURLMaps
from pyheadscale.control.expiry import ExpiryWatcher
from pyheadscale.control.policyctl import PolicyController
from pyheadscale.control.poll import MapPoll, handle_map
from pyheadscale.control.register import Registration, handle_register, reply
from pyheadscale.control.routectl import RouteController
from pyheadscale.control.sharedreg import SharedPending
from pyheadscale.control.sshcheck import ROUTE as SSH_ACTION_ROUTE
from pyheadscale.control.sshcheck import SSHCheckAction, SSHChecks, handle_ssh_action
from pyheadscale.control.sshcheckweb import SSHCheckWeb
from pyheadscale.control.tagowners import tag_authorizer
from pyheadscale.control.types import ControlRequest, ResponseStream
from pyheadscale.control.webauth import WebAuth
from pyheadscale.mapper.context import MapContext
from pyheadscale.mapper.derpmap import (
    DERPMapError,
    load_derp_map_file,
    merge_derp_maps,
)
from pyheadscale.mapper.dns import (
    DNSSettings,
    ExtraRecordsError,
    load_extra_records,
    normalize_extra_records,
)
from pyheadscale.mapper.fanout import SharedDeltas
from pyheadscale.mapper.full import PeerCache
from pyheadscale.startup import failing_key
from pyheadscale.state.changes import Change, ChangeKind, Field
from pyheadscale.state.model import IPNetwork
from pyheadscale.state.tailnet import Tailnet

if TYPE_CHECKING:
    from pyheadscale.embedded_derp import EmbeddedDerp

log = logging.getLogger("pyheadscale.control")

class RecordedStream:
    """A response stream that remembers its status (for the HTTP metrics)."""

    def __init__(self, inner: ResponseStream) -> None:
        self.inner = inner
        self.status = 200

    async def start(self, status: int, headers: list[tuple[str, str]] | None = None) -> None:
        self.status = status
        await self.inner.start(status, headers)

    async def write(self, data: bytes) -> None:
        await self.inner.write(data)

    def write_now(self, data: bytes) -> bool:
        return self.inner.write_now(data)

    async def end(self, data: bytes = b"") -> None:
        await self.inner.end(data)

    @property
    def closed(self) -> bool:
        return self.inner.closed


class ControlPlane:
    """Owns the parts behind the Noise tunnel and the admin API, and hands each handler the
    few of them it uses (MapPoll, Registration, SSHCheckAction, AdminDeps)."""

    def __init__(self, cfg: Config, tailnet: Tailnet, engine: Engine,
                 derp: EmbeddedDerp | None) -> None:
        self.cfg = cfg
        self.tailnet = tailnet
        self.derp = derp
        self.peer_cache = PeerCache()
        # A deleted node's encoded entries would stay forever (node IDs are not reused), so
        # ephemeral churn would grow the cache without bound.
        tailnet.listeners.append(self._forget_removed)
        self._generation = 0
        self.derp_urls = DerpURLMaps(cfg.derp.urls)
        self._extra_records_mtime: float | None = None
        self._file_records: list[dict[str, Any]] = []
        self._tasks: list[asyncio.Task[None]] = []
        limits = cfg.limits
        self.pending = SharedPending(
            cfg.tuning.register_cache_expiration.total_seconds(),
            cfg.tuning.register_cache_max_entries, tailnet,
            per_source=limits.pending_per_source, per_machine=limits.pending_per_machine,
            hostinfo_budget=limits.pending_hostinfo_bytes,
            rate=limits.registration_rate, burst=limits.registration_burst)
        oidc = (OIDCProvider(cfg.oidc, cfg.server_url, self.pending, tailnet)
                if cfg.oidc.enabled else None)
        self.webflow = WebAuth(cfg.server_url, self.pending, tailnet, oidc)
        # SSH check-mode sessions, approved like registrations by `headscale auth approve`.
        self.sshchecks = SSHChecks(self.pending.expiration_s, self.pending.max_entries)
        self.sshcheck_web = SSHCheckWeb(self.sshchecks, tailnet, oidc)  # or OIDC approves them
        self.policy = PolicyController(cfg, tailnet, engine,
                                       on_swap=lambda: self.refresh_context(ChangeKind.POLICY))
        self.mapctx = MapContext()
        # Primary election, auto-approval, HA probes.
        self.routes = RouteController(tailnet, self.policy, ha=cfg.node.routes.ha,
                                      server_url=cfg.server_url,
                                      on_primaries=self.set_primary_routes)
        self.expiry = ExpiryWatcher(tailnet)
        tailnet.tag_authorizer = tag_authorizer(self.policy)  # --advertise-tags vs tagOwners
        tuning = cfg.tuning
        self.map_poll = MapPoll(tailnet, lambda: self.mapctx, self.peer_cache, SharedDeltas(),
                                self.routes.outbox.take,
                                Admission(tuning.node_mapsession_open_limit,
                                          tuning.node_mapsession_open_timeout.total_seconds()))
        self.registration = Registration(tailnet, self.webflow.handle)
        self.ssh_action = SSHCheckAction(tailnet, self.sshchecks, cfg.server_url,
                                         self.policy.ssh_check_period)
        self.admin = AdminDeps(tailnet, self.policy, self.pending, self.sshchecks,
                               register=self.webflow.register,
                               primary_routes=lambda nid: self.mapctx.routes_of(nid))

    def _forget_removed(self, changes: tuple[Change, ...]) -> None:
        for c in changes:
            if c.kind is ChangeKind.NODE_REMOVED and c.node_id is not None:
                self.peer_cache.forget(c.node_id)

    def console_deps(self) -> ConsoleDeps:
        """What the web admin console uses; its writes go through the API's AdminActions."""
        derp = self.derp
        return ConsoleDeps(
            tailnet=self.tailnet, actions=AdminActions(self.admin), policy=self.policy,
            pending=self.pending, context=lambda: self.mapctx, dns=self.cfg.dns,
            oidc=self.webflow.oidc,
            relay_clients=(lambda: derp.server.connection_count()) if derp is not None
            else (lambda: None),
            embedded_region=self.cfg.derp.server.region_id if derp is not None else None,
            write_extra_records=(self.write_extra_records if self.cfg.dns.extra_records_path
                                 else None),
            settings=self.cfg.admin_console, server_url=self.cfg.server_url)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        with failing_key("policy.path" if self.cfg.policy.mode == "file" else "policy.mode",
                         "cannot load the policy"):
            await self.policy.load()
        await self.derp_urls.load()
        self._load_extra_records_file(initial=True)
        with failing_key("derp.paths", "cannot load a DERP map file"):
            self.mapctx = self.build_context()
        if not self.mapctx.derp_map.get("Regions"):
            raise key_error("derp", "no DERP region configured: enable derp.server or set "
                            "derp.urls / derp.paths (clients never reach Running without one)")
        if self.cfg.dns.extra_records_path:
            self._tasks.append(asyncio.create_task(self._watch_extra_records()))
        # After the policy: its change listener must run before the route controller's.
        self.routes.start()
        self.expiry.start()
        if self.cfg.derp.auto_update_enabled:
            self.derp_urls.start_updates(self.cfg.derp.update_frequency, self._derp_updated)

    async def stop(self) -> None:
        await self.derp_urls.stop()
        await self.routes.stop()
        await self.expiry.stop()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self.tailnet.bus.close()

    def add_web_routes(self, app: web.Application) -> None:
        self.webflow.add_routes(app)
        self.sshcheck_web.add_routes(app)  # /auth/{auth_id}: the SSH check banner's link
        self.routes.add_routes(app)  # /machine/ping-response (HA probes)

    # --- the map context -------------------------------------------------------------------

    def derp_map(self) -> dict[str, Any]:
        paths = [load_derp_map_file(p) for p in self.cfg.derp.paths]
        embedded = None
        if self.derp is not None and self.cfg.derp.server.automatically_add_embedded_derp_region:
            embedded = self.derp.region()
        return merge_derp_maps(self.derp_urls.maps, paths, embedded)

    def build_context(self) -> MapContext:
        cfg = self.cfg
        self._generation += 1
        dns = DNSSettings.from_config(cfg.dns, cfg.prefixes, self._file_records)
        return MapContext(
            base_domain=cfg.dns.base_domain,
            domain=urlsplit(cfg.server_url).hostname or "",
            dns=dns,
            derp_map=self.derp_map(),
            policy=self.policy.policy,
            primary_routes=self.mapctx.primary_routes,
            taildrop=cfg.taildrop.enabled,
            logtail=cfg.logtail.enabled,
            auto_update=cfg.auto_update.enabled,
            generation=self._generation,
        )

    def refresh_context(self, kind: ChangeKind) -> None:
        self.mapctx = self.build_context()
        self.tailnet.bus.publish(Change(kind, None, frozenset()))
        if kind is ChangeKind.POLICY:
            self.routes.policy_refreshed()
            # The first session to build its frame would build the index; the window's
            # wait is idle time.
            self.tailnet.bus.prepare_soon(self.policy.prepare)

    def _derp_updated(self) -> None:
        """A scheduled DERP map update (derp.urls fetched again): the map is rebuilt, derp.paths
        read again, and every client gets it when it changed."""
        try:
            if self.derp_map() == self.mapctx.derp_map:
                return
            self.refresh_context(ChangeKind.DERP)
        except DERPMapError as e:  # a derp.paths file broke meanwhile: keep the old context
            log.error("DERP map not updated: %s", e)

    def set_primary_routes(self, routes: Mapping[int, Sequence[IPNetwork]],
                           changed: Iterable[int]) -> None:
        """The route controller elected new primaries: new context generation (the peer
        cache keys on it), then every peer of a node whose primaries moved hears of it."""
        self._generation += 1
        self.mapctx = replace(self.mapctx, primary_routes=dict(routes),
                              generation=self._generation)
        self.tailnet.bus.publish(*(Change(ChangeKind.NODE_CHANGED, nid,
                                          frozenset({Field.PRIMARY_ROUTES})) for nid in changed))

    # --- extra records and reloads ----------------------------------------------------------

    def _load_extra_records_file(self, initial: bool = False) -> bool:
        path = self.cfg.dns.extra_records_path
        if not path:
            return False
        try:
            mtime = os.stat(path).st_mtime
        except OSError as e:
            if initial:
                log.warning("extra_records_path %s: %s", path, e)
            return False
        if mtime == self._extra_records_mtime:
            return False
        try:
            records = load_extra_records(path)
        except ExtraRecordsError as e:
            log.warning("extra records not reloaded, keeping the old ones: %s", e)
            return False
        self._extra_records_mtime = mtime
        changed = records != self._file_records
        self._file_records = records
        return changed

    async def write_extra_records(self, records: Sequence[Mapping[str, str]]) -> None:
        """Replace the records of dns.extra_records_path (the console edits them): checked
        whole, written atomically, and sent to clients now rather than at the next poll.
        Raises ExtraRecordsError for a bad record or an unwritable file."""
        path = self.cfg.dns.extra_records_path
        if path is None:
            raise ExtraRecordsError("dns.extra_records_path is not set: the records are in "
                                    "the config file")
        clean = normalize_extra_records(records)
        text = orjson.dumps([{"name": r["Name"], "type": r.get("Type", ""), "value": r["Value"]}
                             for r in clean], option=orjson.OPT_INDENT_2)

        def write() -> None:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(text + b"\n")
            os.replace(tmp, path)

        try:
            await asyncio.to_thread(write)
        except OSError as e:
            raise ExtraRecordsError(f"writing {path}: {e}") from None
        self._extra_records_mtime = None  # a coarse file clock may not have moved
        if self._load_extra_records_file():
            self.refresh_context(ChangeKind.DNS)

    async def _watch_extra_records(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self._load_extra_records_file():
                self.refresh_context(ChangeKind.DNS)

    async def reload(self) -> None:
        """SIGHUP: re-read the DNS section and the extra records, and (file mode) the policy.

        Headscale reloads only the policy; web UIs such as Headplane edit `dns.*` and send
        SIGHUP, so the DNS section is taken from the file too. Other sections need a restart.
        """
        path = self.cfg.config_file
        if path is not None:
            try:
                new = load_config(path)
            except ConfigError as e:
                log.error("reload refused, keeping the running config: %s", e)
                return
            self.cfg = self.cfg.model_copy(update={"dns": new.dns})
        self._extra_records_mtime = None
        self._load_extra_records_file()
        self.refresh_context(ChangeKind.DNS)
        if self.policy.mode == "file":
            await self.policy.reload()
        log.info("configuration reloaded")

    # --- requests --------------------------------------------------------------------------

    async def dispatch(self, req: ControlRequest, resp: ResponseStream) -> None:
        """Route one request inside Noise; counted like Headscale's Noise router does."""
        recorded = RecordedStream(resp)
        start = time.monotonic()
        endpoint = "<no-match>"
        try:
            if req.path == "/machine/map" and req.method == "POST":
                endpoint = "POST /machine/map"
                await handle_map(self.map_poll, req, recorded)
            elif req.path == "/machine/register" and req.method == "POST":
                endpoint = "POST /machine/register"
                await handle_register(self.registration, req, recorded)
            elif req.method == "GET" and (m := SSH_ACTION_ROUTE.match(req.path)):
                # The HoldAndDelegate URL of SSH check rules.
                endpoint = "GET /machine/ssh/action/{src_node_id}/to/{dst_node_id}"
                await handle_ssh_action(self.ssh_action, req, recorded, int(m[1]), int(m[2]))
            else:
                await reply(recorded, 404, "not found")
        finally:
            metrics.http_request(endpoint, "HTTP/2.0", recorded.status,
                                 time.monotonic() - start)

    async def verify_derp_request(self, raw: bytes) -> bool | None:
        """tailcfg.DERPAdmitClientRequest -> allowed, or None when malformed."""
        try:
            body = orjson.loads(raw)
            key = tailcfg.parse_key(tailcfg.KeyKind.NODE, body["NodePublic"])
        except (orjson.JSONDecodeError, KeyError, TypeError, tailcfg.TailcfgError):
            return None
        return self.tailnet.node_by_node_key(key) is not None
