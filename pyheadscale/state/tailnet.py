"""The one authoritative tailnet in memory, put together from its parts.

base.py holds the memory, indices and write plumbing (`@serialized`); the writes live in
users.py, keys.py (pre-auth and API keys, bcrypt checks), registration.py (joining with a key
or for a user), nodes.py (admin changes of nodes) and online.py (what a node's map polls
report; the pure diff is mapreq.py) and, with several instances on one database, replica.py
(what the others committed, through the change log of changelog.py). Errors are in errors.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from sqlalchemy import Engine

from pyheadscale.config import Config
from pyheadscale.state import persist
from pyheadscale.state.changelog import ChangeLog
from pyheadscale.state.changes import ChangeBus
from pyheadscale.state.ipam import IPAllocator
from pyheadscale.state.nodes import NodeWrites
from pyheadscale.state.online import OnlineTracking
from pyheadscale.state.registration import Registration
from pyheadscale.state.replica import Replica
from pyheadscale.state.users import UserWrites


class Tailnet(UserWrites, Registration, NodeWrites, OnlineTracking, Replica):
    @classmethod
    async def load(cls, engine: Engine, cfg: Config, bus: ChangeBus | None = None,
                   changelog: ChangeLog | None = None) -> Tailnet:
        """Everything from the database into memory; the addresses in use are reserved.
        With a change log (several instances), also who holds which node's session, and the
        log position the rows reflect."""
        clustered = changelog is not None
        loaded = await asyncio.to_thread(persist.load_all, engine, cluster=clustered)
        ipam = IPAllocator(cfg.prefixes.v4, cfg.prefixes.v6, cfg.prefixes.allocation)
        tn = cls(engine, cfg, ipam, bus, changelog)
        if changelog is not None:
            changelog.applied = loaded.log_id
        for u in loaded.users:
            tn.users[u.id] = u
        for k in loaded.preauth_keys:
            tn._put_pak(k)
        for a in loaded.api_keys:
            tn._put_apikey(a)
        for n in loaded.nodes:
            for addr in n.addresses:
                ipam.reserve(addr)
            held = loaded.presence.get(n.id)
            if held is not None:
                tn.presence[n.id] = held[0]
                n = replace(n, online=True, capver=held[1])
            tn._put_node(n)
            if n.ephemeral and not n.online:
                # Nobody is connected right after a start: give each a fresh timer.
                tn.gc.schedule(n.id)
        return tn
