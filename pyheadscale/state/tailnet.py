"""The one authoritative tailnet in memory, put together from its parts.

base.py holds the memory, indices and write plumbing (`@serialized`); the writes live in
users.py, keys.py (pre-auth and API keys, bcrypt checks), registration.py (joining with a key
or for a user), nodes.py (admin changes of nodes) and online.py (what a node's map polls
report; the pure diff is mapreq.py). Errors are in errors.py.
"""

from __future__ import annotations

import asyncio

from sqlalchemy import Engine

from pyheadscale.config import Config
from pyheadscale.state import persist
from pyheadscale.state.changes import ChangeBus
from pyheadscale.state.ipam import IPAllocator
from pyheadscale.state.nodes import NodeWrites
from pyheadscale.state.online import OnlineTracking
from pyheadscale.state.registration import Registration
from pyheadscale.state.users import UserWrites


class Tailnet(UserWrites, Registration, NodeWrites, OnlineTracking):
    @classmethod
    async def load(cls, engine: Engine, cfg: Config, bus: ChangeBus | None = None) -> Tailnet:
        """Everything from the database into memory; the addresses in use are reserved."""
        loaded = await asyncio.to_thread(persist.load_all, engine)
        ipam = IPAllocator(cfg.prefixes.v4, cfg.prefixes.v6, cfg.prefixes.allocation)
        tn = cls(engine, cfg, ipam, bus)
        for u in loaded.users:
            tn.users[u.id] = u
        for k in loaded.preauth_keys:
            tn._put_pak(k)
        for a in loaded.api_keys:
            tn._put_apikey(a)
        for n in loaded.nodes:
            for addr in n.addresses:
                ipam.reserve(addr)
            tn._put_node(n)
            if n.ephemeral:
                # Nobody is connected right after a start: give each a fresh timer.
                tn.gc.schedule(n.id)
        return tn
