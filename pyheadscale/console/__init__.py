"""The web admin console, served by the server itself at `admin_console.path` (/admin).

Server-rendered pages (Jinja2, autoescaped) with a little of our own JavaScript for live
updates, highlighting and copy buttons; every read-only page works without it. Every change
goes through `AdminActions`, the code path of /api/v1, and is audited from the API's own
table (api/audited.py), so the console and the API check, refuse and audit alike. See
docs/console.md.

The parts: sessions.py (sessions, one-time links), web.py (the sub-application and its
guard), signin.py, machines.py, people.py (users and keys), policyedit.py, tailnetview.py
(reachability picture, DERP, DNS), reach.py (the reachability computation), views.py.
"""

from __future__ import annotations

from aiohttp import web

from pyheadscale.console.deps import ConsoleDeps
from pyheadscale.console.highlight import hujson
from pyheadscale.console.machines import Machines
from pyheadscale.console.people import People
from pyheadscale.console.policyedit import PolicyPages
from pyheadscale.console.signin import SignIn
from pyheadscale.console.tailnetview import TailnetPages
from pyheadscale.console.web import Console


class AdminConsole:
    """The console of one server: mounted on the main app, and its sign-in link route on
    the unix socket's app."""

    def __init__(self, deps: ConsoleDeps) -> None:
        self.console = Console(deps)
        self.console.templates.filters["hujson"] = hujson
        self.signin = SignIn(self.console)
        Machines(self.console)
        People(self.console)
        PolicyPages(self.console)
        TailnetPages(self.console)

    def mount(self, app: web.Application) -> None:
        app.add_subapp(self.console.base, self.console.app())

    def add_socket_routes(self, app: web.Application) -> None:
        self.signin.add_socket_routes(app)


__all__ = ["AdminConsole", "ConsoleDeps"]
