"""Console sessions and one-time sign-in links, kept in memory.

A session is a random 256-bit id in an HttpOnly cookie; the server keeps who it belongs to,
the role, a CSRF token for its forms, and when it started and was last used. It ends after
`idle` without a request, after `max_age` in any case, or at sign-out. Sign-in links are
single use and short-lived. Both stores are bounded (anyone can ask for a sign-in page) and
nothing survives a restart: signing in again is the cheap, safe answer.
"""

from __future__ import annotations

import enum
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

MAX_SESSIONS = 256
MAX_LINKS = 64


class Role(enum.Enum):
    ADMIN = "admin"  # may change anything the API can
    AUDITOR = "auditor"  # sees every page, changes nothing

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls(text)
        except ValueError:
            raise ValueError(f"unknown role {text!r}: use admin or auditor") from None


@dataclass
class Session:
    id: str
    user: str  # shown on every page and named in audit lines
    role: Role
    csrf: str
    started: float
    seen: float
    flashes: list[tuple[str, str]] = field(default_factory=list)  # (kind, text) to show once

    @property
    def can_write(self) -> bool:
        return self.role is Role.ADMIN


@dataclass(frozen=True)
class SignInLink:
    token: str
    user: str
    role: Role
    created: float


class Sessions:
    """The live sessions of one server."""

    def __init__(self, idle_s: float, max_age_s: float, link_ttl_s: float) -> None:
        self.idle_s = idle_s
        self.max_age_s = max_age_s
        self.link_ttl_s = link_ttl_s
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._links: OrderedDict[str, SignInLink] = OrderedDict()

    # -- sessions --------------------------------------------------------------------------

    def start(self, user: str, role: Role) -> Session:
        now = time.monotonic()
        self._sweep(now)
        s = Session(id=secrets.token_urlsafe(32), user=user, role=role,
                    csrf=secrets.token_urlsafe(32), started=now, seen=now)
        self._sessions[s.id] = s
        while len(self._sessions) > MAX_SESSIONS:  # the least recently used goes first
            self._sessions.popitem(last=False)
        return s

    def get(self, session_id: str | None) -> Session | None:
        """The live session behind a cookie value, touched; None when absent or ended."""
        if not session_id:
            return None
        now = time.monotonic()
        s = self._sessions.get(session_id)
        if s is None:
            return None
        if now - s.seen > self.idle_s or now - s.started > self.max_age_s:
            del self._sessions[session_id]
            return None
        s.seen = now
        self._sessions.move_to_end(session_id)
        return s

    def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def _sweep(self, now: float) -> None:
        for sid in [sid for sid, s in self._sessions.items()
                    if now - s.seen > self.idle_s or now - s.started > self.max_age_s]:
            del self._sessions[sid]
        for tok in [t for t, link in self._links.items()
                    if now - link.created > self.link_ttl_s]:
            del self._links[tok]

    # -- one-time sign-in links ------------------------------------------------------------

    def new_link(self, user: str, role: Role) -> SignInLink:
        now = time.monotonic()
        self._sweep(now)
        link = SignInLink(secrets.token_urlsafe(32), user, role, now)
        self._links[link.token] = link
        while len(self._links) > MAX_LINKS:
            self._links.popitem(last=False)
        return link

    def peek_link(self, token: str) -> SignInLink | None:
        self._sweep(time.monotonic())
        return self._links.get(token)

    def redeem_link(self, token: str) -> Session | None:
        """Trade a link for a session, once."""
        self._sweep(time.monotonic())
        link = self._links.pop(token, None)
        if link is None:
            return None
        return self.start(link.user, link.role)
