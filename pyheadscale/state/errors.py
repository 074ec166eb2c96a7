"""What a tailnet write can refuse; str() is the message shown to clients and admins."""

from __future__ import annotations


class StateError(Exception):
    """Base of all state errors."""


class NotFound(StateError):
    pass


class AlreadyExists(StateError):
    pass


class InvalidArgument(StateError):
    pass


class Conflict(StateError):
    """The write contradicts current state (user still has nodes, key held elsewhere...)."""


class PersistError(StateError):
    """The database refused the write; memory was left unchanged."""


class Unavailable(PersistError):
    """The database cannot be reached (or is too busy): nothing was written, try again."""


class InvalidAuthKey(StateError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidAPIKey(StateError):
    pass
