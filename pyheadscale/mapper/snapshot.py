"""The inputs every viewer's map is built from at one moment, passed as one value."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from pyheadscale.mapper.context import MapContext
from pyheadscale.mapper.full import PeerCache
from pyheadscale.state.model import Node, User

__all__ = ["Snapshot"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The tailnet's nodes and users, the map context and the clock of one map (or one
    batch's frames), with the peer-entry cache shared by every session of the loop."""

    nodes: Mapping[int, Node]
    users: Mapping[int, User]
    ctx: MapContext
    now: datetime
    cache: PeerCache
