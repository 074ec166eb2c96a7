"""The tailnet picture (who can reach whom), the DERP map with each region's health as the
server sees it, and DNS and settings (read-only: they come from the config file)."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from pyheadscale import audit
from pyheadscale.console.reach import VERTEX_R, picture
from pyheadscale.console.web import Access, Console, read_form, route
from pyheadscale.mapper.context import AllowAllPolicy
from pyheadscale.mapper.dns import ExtraRecordsError

PROBE_TIMEOUT_S = 2.0
PROBE_CACHE_S = 30.0
MAX_PROBES = 64  # DERP servers probed per refresh at most


@dataclass(frozen=True)
class Probe:
    ok: bool
    detail: str
    at: float


class DerpProber:
    """A TCP connect to each DERP server of the map, from this server, cached briefly.
    It says whether the server can reach a relay, not whether clients can."""

    def __init__(self) -> None:
        self.cache: dict[tuple[str, int], Probe] = {}

    async def probe(self, host: str, port: int) -> Probe:
        key = (host, port)
        hit = self.cache.get(key)
        now = time.monotonic()
        if hit is not None and now - hit.at < PROBE_CACHE_S:
            return hit
        start = time.monotonic()
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection(host, port), PROBE_TIMEOUT_S)
            w.close()
            res = Probe(True, f"TCP connect in {(time.monotonic() - start) * 1000:.0f} ms", now)
        except (OSError, TimeoutError) as e:
            res = Probe(False, f"unreachable: {e.__class__.__name__} {e}".strip(), now)
        if len(self.cache) > 4 * MAX_PROBES:
            self.cache.clear()
        self.cache[key] = res
        return res


def _derp_latency(hostinfo: dict[str, Any], region: int) -> float | None:
    ni = hostinfo.get("NetInfo")
    lat = ni.get("DERPLatency") if isinstance(ni, dict) else None
    if not isinstance(lat, dict):
        return None
    vals = [v for k, v in lat.items() if isinstance(k, str) and k.split("-")[0] == str(region)
            and isinstance(v, int | float)]
    return min(vals) if vals else None


class TailnetPages:
    def __init__(self, console: Console) -> None:
        self.c = console
        self.prober = DerpProber()
        console.mount(self)

    @route("GET", "/tailnet", Access.READ)
    async def tailnet(self, request: web.Request) -> web.StreamResponse:
        tn = self.c.deps.tailnet
        q = request.query
        view = q.get("view", "machines")
        user, tag, node = q.get("user", "")[:200], q.get("tag", "")[:200], q.get("node", "")
        nodes = sorted(tn.list_nodes(), key=lambda n: n.id)
        if user:
            nodes = [n for n in nodes if not n.is_tagged and n.user_id is not None
                     and tn.users.get(n.user_id) is not None
                     and tn.users[n.user_id].name == user]
        if tag:
            nodes = [n for n in nodes if tag in n.tags]
        policy = self.c.deps.context().policy or AllowAllPolicy()
        pic = picture(policy, nodes, tn.users, group=view == "owners")
        if node:
            pic = type(pic)(pic.vertices, [e for e in pic.edges
                                           if node in (e.src, e.dst)], pic.size, pic.truncated)
        labels = {v.key: v.label for v in pic.vertices}
        return self.c.render(
            request, "tailnet.html", title="Tailnet", pic=pic, labels=labels, vertex_r=VERTEX_R,
            view=view, user=user, tag=tag, node=node,
            users=sorted(u.name for u in tn.list_users()),
            tags=sorted({t for n in tn.list_nodes() for t in n.tags}),
            policy_running=self.c.deps.policy.manager is not None)

    @route("GET", "/derp", Access.READ)
    async def derp(self, request: web.Request) -> web.StreamResponse:
        ctx = self.c.deps.context()
        regions_in = (ctx.derp_map or {}).get("Regions") or {}
        nodes = self.c.deps.tailnet.list_nodes()
        regions = []
        probes = 0
        for rid in sorted(regions_in, key=lambda k: int(k)):
            r = regions_in[rid]
            servers = []
            for s in r.get("Nodes") or []:
                host = s.get("IPv4") if s.get("IPv4") not in (None, "", "none") else s.get(
                    "HostName", "")
                port = int(s.get("DERPPort") or 443)
                probe = None
                if host and probes < MAX_PROBES:
                    probes += 1
                    probe = await self.prober.probe(str(host), port)
                servers.append({"name": s.get("Name", ""), "host": s.get("HostName", ""),
                                "port": port, "stun": s.get("STUNPort", 3478),
                                "probe": probe})
            rid_int = int(rid)
            home = [n for n in nodes if isinstance(n.hostinfo.get("NetInfo"), dict)
                    and n.hostinfo["NetInfo"].get("PreferredDERP") == rid_int]
            lats = [x for n in nodes if (x := _derp_latency(n.hostinfo, rid_int)) is not None]
            healthy = bool(servers) and all(s["probe"] is not None and s["probe"].ok
                                            for s in servers)
            regions.append({
                "id": rid_int, "code": r.get("RegionCode", ""), "name": r.get("RegionName", ""),
                "servers": servers, "home": [n.given_name for n in home],
                "online_home": sum(1 for n in home if n.online),
                "latency": f"{statistics.median(lats) * 1000:.0f} ms" if lats else "",
                "reports": len(lats), "healthy": healthy,
                "embedded": rid_int == self.c.deps.embedded_region,
            })
        return self.c.render(request, "derp.html", title="DERP relays", regions=regions,
                             relay_clients=self.c.deps.relay_clients())

    @route("GET", "/dns", Access.READ)
    async def dns(self, request: web.Request) -> web.StreamResponse:
        ctx = self.c.deps.context()
        d = ctx.dns
        cfg = self.c.deps.dns
        return self.c.render(
            request, "dns.html", title="DNS & settings", magic_dns=d.magic_dns,
            base_domain=cfg.base_domain, override=d.override_local_dns,
            nameservers=list(d.nameservers_global),
            split={k: list(v) for k, v in d.nameservers_split.items()},
            search=list(d.search_domains),
            records=self._records(),
            records_path=str(cfg.extra_records_path or ""),
            editable=self.c.deps.write_extra_records is not None,
            settings=self.c.deps.settings, server_url=self.c.deps.server_url,
            policy_mode=self.c.deps.policy.mode)

    # -- extra records (only those of dns.extra_records_path) ------------------------------

    def _records(self) -> list[dict[str, str]]:
        return [{"name": str(r.get("Name", "")), "type": str(r.get("Type", "")),
                 "value": str(r.get("Value", ""))}
                for r in self.c.deps.context().dns.extra_records]

    async def _save(self, request: web.Request, records: list[dict[str, str]],
                    what: str) -> web.StreamResponse:
        write = self.c.deps.write_extra_records
        if write is None:
            self.c.flash(request, "error", "The records are in the config file: edit it there.")
            return self.c.redirect("/dns")
        try:
            await write(records)
        except ExtraRecordsError as e:
            self.c.flash(request, "error", str(e))
            return self.c.redirect("/dns")
        # Not an API operation (Headscale's API cannot change DNS): the one audit helper
        # directly, under an action name of our own.
        audit.record(self.c.actor(request), "dns.extra_records", "dns", change=what)
        self.c.flash(request, "ok", "Records saved; clients are getting them now.")
        return self.c.redirect("/dns")

    @route("POST", "/dns/records/add", Access.WRITE)
    async def add_record(self, request: web.Request) -> web.StreamResponse:
        f = await read_form(request)
        new = {"name": f.get("name", "").strip()[:253], "type": f.get("type", "")[:4],
               "value": f.get("value", "").strip()[:64]}
        return await self._save(request, [*self._records(), new],
                                f"added={new['name']}:{new['value']}")

    @route("POST", "/dns/records/remove", Access.WRITE)
    async def remove_record(self, request: web.Request) -> web.StreamResponse:
        f = await read_form(request)
        gone = (f.get("name", ""), f.get("value", ""))
        kept = [r for r in self._records() if (r["name"], r["value"]) != gone]
        return await self._save(request, kept, f"removed={gone[0]}:{gone[1]}")
