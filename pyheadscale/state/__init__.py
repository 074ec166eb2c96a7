"""The authoritative in-memory tailnet, its change bus, IPAM, names and ephemeral GC."""

from pyheadscale.state.changes import Change, ChangeBus, ChangeKind, Subscription
from pyheadscale.state.errors import (
    AlreadyExists,
    Conflict,
    InvalidAPIKey,
    InvalidArgument,
    InvalidAuthKey,
    NotFound,
    PersistError,
    StateError,
)
from pyheadscale.state.tailnet import Tailnet

__all__ = [
    "AlreadyExists", "Change", "ChangeBus", "ChangeKind", "Conflict", "InvalidAPIKey",
    "InvalidArgument", "InvalidAuthKey", "NotFound", "PersistError", "StateError",
    "Subscription", "Tailnet",
]
