"""The main listener: derp's h11 front door first, the aiohttp application behind it.

Routes that take a socket over (``/ts2021``, the embedded relay's ``/derp``) are front-door
routes, registered on the application with ``add_takeover_route``; every other request goes
to aiohttp.  aiohttp's low-level ``web.Server`` (``runner.server``) is the documented
protocol factory of an ``AppRunner``; the door feeds it complete requests one at a time and
never uses aiohttp's internals, so any aiohttp release works.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

from aiohttp import web

from derp.frontdoor import FrontDoor, Router, first_match

_TAKEOVER = web.AppKey("pyheadscale_takeover_routes", list[Router])


def add_takeover_route(app: web.Application, router: Router) -> None:
    """Serve ``router``'s paths on ``app``'s listener ahead of aiohttp's own routes."""
    if _TAKEOVER not in app:
        app[_TAKEOVER] = []
    app[_TAKEOVER].append(router)


class MainListener:
    """One TCP (optionally TLS) listener serving ``app`` and its takeover routes."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self._servers: list[asyncio.base_events.Server] = []

    async def start(self, host: str, port: int, ssl_ctx: ssl.SSLContext | None) -> None:
        await self.runner.setup()
        fallback = self.runner.server
        assert fallback is not None  # set by setup()
        routers: list[Router] = self.app[_TAKEOVER] if _TAKEOVER in self.app else []
        router = first_match(routers)
        loop = asyncio.get_running_loop()
        self._servers.append(await loop.create_server(
            lambda: FrontDoor(router, fallback), host or None, port, ssl=ssl_ctx,
            reuse_address=True, backlog=1024))

    @property
    def sockets(self) -> list[socket.socket]:
        return [s for srv in self._servers for s in srv.sockets]

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        for srv in self._servers:
            srv.close()
        # on_shutdown closes taken-over connections; aiohttp closes the ones it serves.
        await self.runner.cleanup()
