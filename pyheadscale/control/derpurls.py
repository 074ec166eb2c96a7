"""The DERP maps behind `derp.urls`: fetched at start, and again every `derp.update_frequency`
when `derp.auto_update_enabled` (Headscale's scheduled DERP map update).

A refresh replaces the maps only when every URL answered with a valid map; otherwise the
previous maps stay and the fetch is retried with exponential backoff (1 s doubling, at most
the update frequency), as Headscale retries before its next tick. The update runs with or
without URLs: Headscale's tick rebuilds the whole map, so `derp.paths` files are read again
too; the caller does that and sends the map only when the merged map changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import aiohttp

from pyheadscale.mapper.derpmap import DERPMapError, parse_derp_map_json

log = logging.getLogger("pyheadscale.derp")

FETCH_TIMEOUT_S = 10.0  # Headscale's types.HTTPTimeout is 30 s; a map is small
MAX_BODY = 4 << 20  # Tailscale's default map is ~30 KiB; refuse anything absurd


class DerpURLMaps:
    """The parsed maps of `derp.urls`, in the order given."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = list(urls)
        self.maps: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self.refreshes = 0  # completed periodic refreshes (for tests and /debug)

    async def _fetch_one(self, session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
        async with session.get(url) as r:
            if r.status != 200:
                raise DERPMapError(f"HTTP {r.status}")
            body = await r.content.read(MAX_BODY + 1)
            if len(body) > MAX_BODY:
                raise DERPMapError(f"larger than {MAX_BODY} bytes")
            return parse_derp_map_json(body, url)

    async def fetch(self) -> tuple[list[dict[str, Any]], list[str]]:
        """(maps of the URLs that answered, errors of those that did not)."""
        maps, errors = [], []
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for url in self.urls:
                try:
                    maps.append(await self._fetch_one(session, url))
                except (aiohttp.ClientError, TimeoutError, DERPMapError, ValueError) as e:
                    errors.append(f"DERP map {url} not loaded: {e or type(e).__name__}")
        return maps, errors

    async def load(self) -> None:
        """At start: whatever answers is used; a URL that fails is logged (the server still
        starts, with the other sources)."""
        maps, errors = await self.fetch()
        for e in errors:
            log.warning("%s", e)
        self.maps = maps

    def start_updates(self, every: timedelta, on_update: Callable[[], None]) -> None:
        """Every `every`: fetch the URLs again, then `on_update()` (which rebuilds the map)."""
        if every > timedelta(0):
            self._task = asyncio.create_task(self._update_loop(every.total_seconds(),
                                                               on_update))

    async def _update_loop(self, every: float, on_update: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(every)
            log.info("fetching DERPMap updates")
            delay = 1.0
            while True:
                maps, errors = await self.fetch()
                if not errors:
                    break
                log.error("failed to fetch the DERP maps, retrying in %.0fs: %s", delay,
                          "; ".join(errors))
                await asyncio.sleep(delay)
                delay = min(delay * 2, every)
            self.maps = maps
            self.refreshes += 1
            on_update()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
