"""Admission of new map sessions: at most LIMIT are opened (first map built) at a time; the
others wait their turn, and one that waited MAX_WAIT_S is answered 503. Both are set by
`tuning.node_mapsession_open_limit` and `tuning.node_mapsession_open_timeout`.

After a server restart every node re-opens its poll within seconds (tailscaled retries with
backoff). Opened all at once, each session subscribes, then waits for its first map (megabytes
at 10,000 nodes) behind every other one's: nobody finishes early, and the changes a waiting
session is owed pile up until its buffer collapses to a FULL, one more full map to build.
Taking them a few at a time keeps each first map's wait short and its backlog small, and a
waiting request costs nothing but its parsed body.

The gate rations the server's own work (the request's database writes and the first map's
build): a place is freed once the first map is handed to the response for writing, never
held while the client reads it, so a peer that does not read keeps no place. A node has at
most one request waiting: a newer one of the same node takes the older's turn away (answered
503 at once), so one node flooding the gate holds one place in the line, not the line.

The 503 is the cheap early answer: tailscaled takes any non-200 answer to its map request as
a failed poll and polls again after its backoff (10 ms x failures squared, at most 30 s, with
jitter; reset by the next map it gets), on the same Noise connection and without logging in
again. MAX_WAIT_S keeps every answer well inside its 120 s watchdog, which covers a map
request from the moment it is sent until the first map arrives. Official clients of every
pinned version are seen doing so in tests/integration/test_restart_gate.py.
"""

from __future__ import annotations

import asyncio
import enum

__all__ = ["LIMIT", "MAX_WAIT_S", "Admission", "Refused", "Ticket"]

# Sessions opening at once. A few keep the loop busy while others wait on the database;
# more only lengthen every first map's wait.
LIMIT = 16
MAX_WAIT_S = 45.0


class Refused(enum.Enum):
    """Why a request got no place (it is answered 503 and the client polls again)."""

    TIMEOUT = "timeout"  # waited max_wait
    DISPLACED = "displaced"  # a newer request of the same node took its turn


class Ticket:
    """One admitted session's place; ``release`` once its first map is built (idempotent)."""

    __slots__ = ("_gate",)

    def __init__(self, gate: Admission) -> None:
        self._gate: Admission | None = gate

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.opening -= 1
            gate._hand_on()


class Admission:
    """FIFO admission of map sessions, at most one waiting request per node."""

    def __init__(self, limit: int = LIMIT, max_wait: float = MAX_WAIT_S) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.max_wait = max_wait
        self.opening = 0  # admitted, first map not built yet
        self.refused = 0  # answered "busy" after MAX_WAIT_S
        self.displaced = 0  # turns taken away by a newer request of the same node
        # node id -> its waiting request (True: admitted, False: displaced), oldest first.
        self._line: dict[int, asyncio.Future[bool]] = {}

    @property
    def waiting(self) -> int:
        return len(self._line)

    async def enter(self, node_id: int) -> Ticket | Refused:
        """A ticket, or why there is none: max_wait passed, or a newer request of the node
        came (answer the client 503: it polls again)."""
        older = self._line.pop(node_id, None)
        if older is not None and not older.done():
            older.set_result(False)
            self.displaced += 1
        if not self._line and self.opening < self.limit:
            self.opening += 1
            return Ticket(self)
        turn: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._line[node_id] = turn
        try:
            async with asyncio.timeout(self.max_wait):
                admitted = await turn
        except BaseException as e:
            # Given a place in the same loop turn the wait ended: keep it, or pass it on.
            admitted = turn.done() and not turn.cancelled() and turn.result()
            if not isinstance(e, TimeoutError):
                if admitted:
                    Ticket(self).release()
                raise
            if not admitted:
                self.refused += 1
                return Refused.TIMEOUT
        finally:
            if self._line.get(node_id) is turn:
                del self._line[node_id]
        return Ticket(self) if admitted else Refused.DISPLACED

    def _hand_on(self) -> None:
        """Give free places to the oldest waiting requests."""
        while self._line and self.opening < self.limit:
            node_id = next(iter(self._line))
            turn = self._line.pop(node_id)
            if not turn.done():
                self.opening += 1
                turn.set_result(True)
