"""The metrics listener (`metrics_listen_addr`): /metrics and Headscale's /debug/* endpoints.

As in Headscale (tsweb's debugger): `/metrics` is open; every `/debug/*` page answers only
clients on loopback, Tailscale's ranges (100.64.0.0/10, fd7a:115c:a1e0::/48) or private
networks (10/8, 172.16/12, 192.168/16, fc00::/7), anyone else gets 403 "debug access
denied". Pages that have a JSON form in Headscale answer JSON when the request's Accept
names application/json and text otherwise; the bodies are built in debugview.py.

Headscale's Go-runtime pages (pprof, statsviz, goroutines, expvar) have no equivalent here;
/debug/mapresponses answers as Headscale does when no dump directory is configured.
"""

from __future__ import annotations

import asyncio
import html
import ipaddress
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from pyheadscale import debugview, metrics
from pyheadscale.config import Config
from pyheadscale.mapper.context import MapContext
from pyheadscale.state.model import Node
from pyheadscale.state.tailnet import Tailnet

if TYPE_CHECKING:
    from pyheadscale.auth.webflow import PendingRegistrations
    from pyheadscale.control.policyctl import PolicyController
    from pyheadscale.control.routectl import RouteController

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PING_TIMEOUT_S = 30.0  # Headscale's pingTimeout
_ALLOWED = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "::1/128", "100.64.0.0/10", "fd7a:115c:a1e0::/48",
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
PAGES = (
    ("overview", "State overview"), ("config", "Current configuration"),
    ("policy", "Current policy"), ("filter", "Current filter rules"),
    ("ssh", "SSH policies per node"), ("derp", "DERP map configuration"),
    ("nodestore", "NodeStore information"),
    ("registration-cache", "Registration cache information"), ("routes", "Primary routes"),
    ("policy-manager", "Policy manager state"), ("mapresponses", "Map responses for all nodes"),
    ("batcher", "Batcher connected nodes"), ("ping", "Ping a node to check connectivity"),
)


@dataclass(frozen=True)
class DebugDeps:
    """What the metrics listener reads; the server builds it once everything is started."""

    cfg: Config
    tailnet: Tailnet
    policy: PolicyController
    mapctx: Callable[[], MapContext]
    routes: RouteController
    pending: PendingRegistrations
    registry: CollectorRegistry


def debug_allowed(remote: str | None) -> bool:
    try:
        addr = ipaddress.ip_address((remote or "").split("%")[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in _ALLOWED)


def _protected(handler: Handler) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        if not debug_allowed(request.remote):
            return web.Response(status=403, text="debug access denied\n")
        return await handler(request)
    return guarded


def _wants_json(request: web.Request) -> bool:
    return "application/json" in request.headers.get("Accept", "")


def _json(body: Any) -> web.Response:
    # Headscale's json.MarshalIndent(v, "", "  ")
    return web.Response(body=orjson.dumps(body, option=orjson.OPT_INDENT_2),
                        content_type="application/json")


def _text(body: str) -> web.Response:
    return web.Response(text=body, content_type="text/plain")


class DebugPages:
    def __init__(self, deps: DebugDeps) -> None:
        self.d = deps

    # -- helpers --------------------------------------------------------------------------

    def _connected(self) -> set[int]:
        tn = self.d.tailnet
        return {nid for nid in tn.nodes if tn.bus.subscribed(nid)}

    def _policy_text(self) -> str:
        if self.d.policy.mode == "file":
            path = self.d.cfg.policy.path
            return Path(path).read_text(encoding="utf-8") if path else ""
        return self.d.policy.text or ""

    def _primary_count(self) -> int:
        return len(debugview.routes([], self.d.mapctx().primary_routes, ())["primary_routes"])

    # -- pages -----------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        links = "".join(f'<li><a href="/debug/{p}">{p}</a>: {html.escape(t)}</li>'
                        for p, t in PAGES)
        return web.Response(text=f"<html><body><h1>pyheadscale debug</h1><ul>{links}"
                                 '<li><a href="/metrics">/metrics</a>: Prometheus metrics</li>'
                                 "</ul></body></html>", content_type="text/html")

    async def overview(self, request: web.Request) -> web.Response:
        tn, ctx = self.d.tailnet, self.d.mapctx()
        regions = ctx.derp_map.get("Regions")
        info = debugview.overview(
            tn.nodes.values(), tn.users, policy_mode=self.d.policy.mode,
            policy_path=str(self.d.cfg.policy.path or ""),
            derp_regions=len(regions or {}) if ctx.derp_map else None,
            primary_routes=self._primary_count(), now=datetime.now(UTC))
        return _json(info) if _wants_json(request) else _text(debugview.overview_text(info))

    async def config(self, request: web.Request) -> web.Response:
        return _json(debugview.config(self.d.cfg, self.d.mapctx().dns_config))

    async def policy(self, request: web.Request) -> web.Response:
        try:
            text = self._policy_text()
        except OSError as e:
            return web.Response(status=500, text=f"reading the policy: {e}\n")
        kind = "application/json" if _wants_json(request) else "text/plain"
        return web.Response(text=text, content_type=kind)

    async def filter(self, request: web.Request) -> web.Response:
        manager = self.d.policy.manager
        rules = manager.global_filter() if manager is not None else \
            self.d.mapctx().policy.packet_filter(_NO_VIEWER)
        return _json(rules)

    async def ssh(self, request: web.Request) -> web.Response:
        pol = self.d.mapctx().policy
        out = {f"id:{n.id} hostname:{n.hostname} givenname:{n.given_name}": pol.ssh_policy(n)
               for n in sorted(self.d.tailnet.nodes.values(), key=lambda n: n.id)}
        return _json(out)

    async def derp(self, request: web.Request) -> web.Response:
        info = debugview.derp(self.d.mapctx().derp_map)
        return _json(info) if _wants_json(request) else _text(debugview.derp_text(info))

    async def nodestore(self, request: web.Request) -> web.Response:
        tn, up = self.d.tailnet, self._connected()
        unhealthy = self.d.routes.primaries.unhealthy
        nodes = {str(n.id): debugview.node(n, tn.users, tn.preauth_keys,
                                           unhealthy=n.id in unhealthy, connected=n.id in up)
                 for n in sorted(tn.nodes.values(), key=lambda n: n.id)}
        if _wants_json(request):
            return _json(nodes)
        lines = [f"Nodes: {len(nodes)}"] + [
            f"  {n['ID']}: {n['Hostname']} ({n['GivenName']}) {n['IPv4'] or '-'} "
            f"{'online' if n['IsOnline'] else 'offline'}" for n in nodes.values()]
        return _text("\n".join(lines) + "\n")

    async def registration_cache(self, request: web.Request) -> web.Response:
        p = self.d.pending
        return _json(debugview.registration_cache(
            len(p), timedelta(seconds=p.expiration_s), p.max_entries))

    async def routes(self, request: web.Request) -> web.Response:
        info = debugview.routes(self.d.tailnet.nodes.values(), self.d.mapctx().primary_routes,
                                self.d.routes.primaries.unhealthy)
        return _json(info) if _wants_json(request) else _text(debugview.routes_text(info))

    async def policy_manager(self, request: web.Request) -> web.Response:
        manager = self.d.policy.manager
        content = manager.debug_string() if manager is not None else "no policy loaded\n"
        return _json({"content": content}) if _wants_json(request) else _text(content)

    async def mapresponses(self, request: web.Request) -> web.Response:
        return web.Response(text="HEADSCALE_DEBUG_DUMP_MAPRESPONSE_PATH not set")

    async def batcher(self, request: web.Request) -> web.Response:
        info = debugview.batcher(self.d.tailnet.nodes, self._connected())
        return _json(info) if _wants_json(request) else _text(debugview.batcher_text(info))

    async def ping(self, request: web.Request) -> web.Response:
        query = ""
        result: dict[str, Any] | None = None
        if request.method == "POST":
            form = await request.post()
            query = str(form.get("node", ""))
            result = await self.do_ping(query)
        elif request.query.get("node"):
            query = request.query["node"]
            result = await self.do_ping(query)
        return web.Response(text=_ping_page(query, result, self._connected_nodes()),
                            content_type="text/html")

    def _connected_nodes(self) -> list[Node]:
        up = self._connected()
        return sorted((n for n in self.d.tailnet.nodes.values() if n.id in up),
                      key=lambda n: n.id)

    def resolve(self, query: str) -> Node | None:
        """Headscale's ResolveNode: an ID, else an IP, else a given name, else a hostname
        (the lowest ID wins a tie)."""
        nodes = sorted(self.d.tailnet.nodes.values(), key=lambda n: n.id)
        if query.isdigit():
            return self.d.tailnet.nodes.get(int(query))
        try:
            addr = ipaddress.ip_address(query)
        except ValueError:
            addr = None
        if addr is not None:
            return next((n for n in nodes if addr in n.addresses), None)
        return (next((n for n in nodes if n.given_name == query), None)
                or next((n for n in nodes if n.hostname == query), None))

    async def do_ping(self, query: str) -> dict[str, Any]:
        if not query:
            return {"status": "error", "message": "No node specified."}
        node = self.resolve(query)
        if node is None:
            return {"status": "error", "message": f"Node {query!r} not found."}
        if node.id not in self._connected():
            return {"status": "error", "node_id": node.id,
                    "message": f"Node {node.id} is not connected."}
        start = time.monotonic()
        ping_id, fut = self.d.routes.send_ping(node.id)
        try:
            await asyncio.wait_for(asyncio.shield(fut), PING_TIMEOUT_S)
        except TimeoutError:
            return {"status": "timeout", "node_id": node.id,
                    "message": f"No response after {int(PING_TIMEOUT_S)}s."}
        finally:
            self.d.routes.pings.cancel(ping_id)
        return {"status": "ok", "node_id": node.id,
                "latency_ms": round((time.monotonic() - start) * 1000, 1)}


class _NoViewer:
    """AllowAllPolicy's filter does not depend on the viewer."""


_NO_VIEWER: Any = _NoViewer()


def _ping_page(query: str, result: Mapping[str, Any] | None, connected: list[Node]) -> str:
    rows = "".join(
        f'<li><a href="/debug/ping?node={n.id}">{n.id}</a> {html.escape(n.hostname)} '
        f"{html.escape(' '.join(str(a) for a in n.addresses))}</li>" for n in connected)
    out = ""
    if result is not None:
        status = result["status"]
        detail = (f"latency {result['latency_ms']} ms" if status == "ok"
                  else html.escape(str(result.get("message", ""))))
        out = f'<p class="result {status}">{status}: {detail}</p>'
    return ("<html><body><h1>Ping a node</h1>"
            '<form method="post" action="/debug/ping">'
            f'<input name="node" value="{html.escape(query)}" placeholder="ID, IP or name">'
            '<button type="submit">Ping</button></form>'
            f"{out}<h2>Connected nodes</h2><ul>{rows}</ul></body></html>")


def metrics_handler(registry: CollectorRegistry) -> Handler:
    async def serve_metrics(request: web.Request) -> web.Response:
        metrics.promhttp_inflight.inc()
        try:
            body = generate_latest(registry)
        finally:
            metrics.promhttp_inflight.dec()
        metrics.promhttp_requests.labels("200").inc()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
    return serve_metrics


def metrics_app(deps: DebugDeps) -> web.Application:
    """The metrics listener's application."""
    pages = DebugPages(deps)
    app = web.Application(client_max_size=4096)
    app.router.add_get("/metrics", metrics_handler(deps.registry))
    app.router.add_get("/debug/", _protected(pages.index))
    app.router.add_get("/debug", _protected(pages.index))
    for name, _ in PAGES:
        handler = getattr(pages, name.replace("-", "_"))
        app.router.add_get(f"/debug/{name}", _protected(handler))
    app.router.add_post("/debug/ping", _protected(pages.ping))
    return app
