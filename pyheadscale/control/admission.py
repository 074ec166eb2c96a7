"""Admission of new map sessions: at most LIMIT are opened (first map built and written) at a
time; the others wait their turn, and one that waited MAX_WAIT_S is answered 503.

After a server restart every node re-opens its poll within seconds (tailscaled retries with
backoff). Opened all at once, each session subscribes, then waits for its first map (megabytes
at 10,000 nodes) behind every other one's: nobody finishes early, and the changes a waiting
session is owed pile up until its buffer collapses to a FULL, one more full map to build.
Taking them a few at a time keeps each first map's wait short and its backlog small, and a
waiting request costs nothing but its parsed body.

The 503 is the cheap early answer: tailscaled takes any non-200 answer to its map request as
a failed poll and polls again after its backoff (10 ms x failures squared, at most 30 s, with
jitter; reset by the next map it gets), on the same Noise connection and without logging in
again. MAX_WAIT_S keeps every answer well inside its 120 s watchdog, which covers a map
request from the moment it is sent until the first map arrives.
"""

from __future__ import annotations

import asyncio

__all__ = ["LIMIT", "MAX_HOLD_S", "MAX_WAIT_S", "Admission", "Ticket"]

# Sessions opening at once. A few keep the loop busy while others wait for the client's
# window updates; more only lengthen every first map's wait.
LIMIT = 16
MAX_WAIT_S = 45.0
# A ticket frees itself this long after admission even if the first map is not written yet:
# writing waits on the client (flow-control window, socket), and a peer that never reads
# must not keep its slot. Past this its session goes on outside the gate; a node that
# re-polls joins the back of the queue, so a few such nodes slow admission, never stop it.
MAX_HOLD_S = 5.0


class Ticket:
    """One admitted session's place; ``release`` once its first map is written (idempotent),
    or it releases itself after the gate's ``max_hold``."""

    __slots__ = ("_gate", "_timer")

    def __init__(self, gate: Admission) -> None:
        self._gate: Admission | None = gate
        self._timer = asyncio.get_running_loop().call_later(gate.max_hold, self.release)

    def release(self) -> None:
        self._timer.cancel()
        gate, self._gate = self._gate, None
        if gate is not None:
            gate._sem.release()
            gate.opening -= 1


class Admission:
    """FIFO admission of map sessions (asyncio.Semaphore wakes waiters in order)."""

    def __init__(self, limit: int = LIMIT, max_wait: float = MAX_WAIT_S,
                 max_hold: float = MAX_HOLD_S) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._sem = asyncio.Semaphore(limit)
        self.max_wait = max_wait
        self.max_hold = max_hold
        self.opening = 0  # admitted, first map not written yet
        self.waiting = 0
        self.refused = 0  # answered "busy" after MAX_WAIT_S

    async def enter(self) -> Ticket | None:
        """A ticket, or None after max_wait (answer the client 503: it polls again)."""
        self.waiting += 1
        try:
            async with asyncio.timeout(self.max_wait):
                await self._sem.acquire()
        except TimeoutError:
            self.refused += 1
            return None
        finally:
            self.waiting -= 1
        self.opening += 1
        return Ticket(self)
