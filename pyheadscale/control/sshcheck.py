"""Tailscale SSH check mode: the `SSHAction.HoldAndDelegate` URL, served over Noise.

The SSHPolicy of a check rule tells the destination node to GET
`<server_url>/machine/ssh/action/$SRC_NODE_ID/to/$DST_NODE_ID?local_user=$LOCAL_USER` before
letting an SSH session in (Headscale 0.29 `noise.go` SSHActionHandler):

1. First request: if the pair was approved within the rule's checkPeriod, accept at once.
   Otherwise open a check session (an auth ID in Headscale's format) and answer with a new
   HoldAndDelegate URL carrying `auth_id` plus a message naming the ID; tailscaled shows the
   message to the SSH user as a banner and fetches the new URL.
2. Follow-up request (`auth_id` set): held until `headscale auth approve|reject --auth-id`
   or the source node's owner signing in through OIDC at the banner's `/auth/<auth_id>` link
   (sshcheckweb.py) decides (accept or reject), the session expires (reject), or the client
   goes away.

Only the destination node may ask (its Noise machine key must match), and the check period
comes from the running policy, never from the URL.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode

from pyheadscale.auth.webflow import new_auth_id
from pyheadscale.control.register import reply
from pyheadscale.control.types import ControlRequest, ResponseStream
from pyheadscale.state.model import Node
from pyheadscale.state.tailnet import Tailnet

log = logging.getLogger("pyheadscale.sshcheck")

ROUTE = re.compile(r"^/machine/ssh/action/(\d{1,19})/to/(\d{1,19})$")
ACTION_PATH = "/machine/ssh/action/$SRC_NODE_ID/to/$DST_NODE_ID?local_user=$LOCAL_USER"
# How often a held follow-up looks whether its stream is still open.
_STREAM_POLL_S = 1.0


class UnknownSSHCheck(LookupError):
    def __init__(self, auth_id: str) -> None:
        super().__init__(f"no pending SSH check for auth_id {auth_id}")


@dataclass
class SSHCheck:
    auth_id: str
    src: int
    dst: int
    created: float
    verdict: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class SSHChecks:
    """Pending checks by auth ID (bounded, expiring like the registration cache) and the
    time of the last approval per (src, dst) for checkPeriod auto-approval."""

    def __init__(self, expiration_s: float, max_entries: int = 1024) -> None:
        self.expiration_s = expiration_s
        self.max_entries = max_entries
        self._items: OrderedDict[str, SSHCheck] = OrderedDict()
        self._approved_at: dict[tuple[int, int], float] = {}

    def open(self, src: int, dst: int) -> SSHCheck:
        self._evict()
        check = SSHCheck(new_auth_id(), src, dst, time.monotonic())
        self._items[check.auth_id] = check
        # An unanswered check is rejected when it expires (the held request is answered).
        asyncio.get_running_loop().call_later(self.expiration_s, self._finish, check.auth_id,
                                              False)
        return check

    def __contains__(self, auth_id: object) -> bool:
        return auth_id in self._items

    def get(self, auth_id: str) -> SSHCheck | None:
        self._evict()
        return self._items.get(auth_id)

    def approve(self, auth_id: str) -> None:
        """`headscale auth approve`: raises UnknownSSHCheck if no such pending check."""
        if not self._finish(auth_id, True):
            raise UnknownSSHCheck(auth_id)

    def reject(self, auth_id: str) -> None:
        if not self._finish(auth_id, False):
            raise UnknownSSHCheck(auth_id)

    def approved_within(self, src: int, dst: int, period_s: float) -> bool:
        at = self._approved_at.get((src, dst))
        return at is not None and time.monotonic() - at < period_s

    def record_approval(self, src: int, dst: int) -> None:
        self._approved_at[(src, dst)] = time.monotonic()

    def _finish(self, auth_id: str, accept: bool) -> bool:
        check = self._items.pop(auth_id, None)
        if check is None:
            return False
        if not check.verdict.done():
            check.verdict.set_result(accept)
        return True

    def _evict(self) -> None:
        while len(self._items) >= self.max_entries:
            self._finish(next(iter(self._items)), False)


@dataclass(frozen=True)
class SSHCheckAction:
    """What the SSH check endpoint uses."""

    tailnet: Tailnet
    checks: SSHChecks
    server_url: str
    # Seconds an approval of src -> dst stays valid under the running policy (0: every
    # session), None when no check rule covers the pair or there is no policy.
    check_period: Callable[[Node, Node], float | None]


def _base_action() -> dict[str, Any]:
    return {"allowAgentForwarding": True, "allowLocalPortForwarding": True,
            "allowRemotePortForwarding": True}


def _hold(act: SSHCheckAction, src: int, dst: int) -> dict[str, Any]:
    check = act.checks.open(src, dst)
    base = act.server_url.rstrip("/")
    # The client substitutes the $ variables; auth_id rides along unchanged.
    url = f"{base}{ACTION_PATH}&{urlencode({'auth_id': check.auth_id})}"
    log.info("SSH check pending for node %d -> node %d, auth_id %s", src, dst, check.auth_id)
    return {**_base_action(), "holdAndDelegate": url, "message": (
        "# Headscale SSH requires an additional check.\n"
        f"# To authenticate, visit: {base}/auth/{check.auth_id}\n"
        "# Authentication checked with Headscale SSH.\n")}


async def _await_verdict(check: SSHCheck, resp: ResponseStream) -> bool | None:
    """The verdict, or None when the client went away first."""
    while True:
        try:
            return await asyncio.wait_for(asyncio.shield(check.verdict), _STREAM_POLL_S)
        except TimeoutError:
            if resp.closed:
                return None


async def handle_ssh_action(act: SSHCheckAction, req: ControlRequest, resp: ResponseStream,
                            src_id: int, dst_id: int) -> None:
    tn = act.tailnet
    dst = tn.nodes.get(dst_id)
    if dst is None:
        await reply(resp, 404, "dst node not found")
        return
    if dst.machine_key != req.machine_key:
        await reply(resp, 401, "machine key does not match dst node")
        return
    query = parse_qs(req.query)
    auth_id = (query.get("auth_id") or [""])[0]
    src = tn.nodes.get(src_id)
    period = act.check_period(src, dst) if src is not None else None

    if not auth_id:
        if period and act.checks.approved_within(src_id, dst_id, period):
            await reply(resp, 200, {**_base_action(), "accept": True})
        else:
            await reply(resp, 200, _hold(act, src_id, dst_id))
        return

    check = act.checks.get(auth_id)
    if check is None:
        if period is not None:  # expired or lost in a restart: start a fresh check
            await reply(resp, 200, _hold(act, src_id, dst_id))
        else:
            await reply(resp, 400, "invalid auth_id: no pending SSH check")
        return
    if (check.src, check.dst) != (src_id, dst_id):
        await reply(resp, 401, "src/dst pair does not match auth session")
        return
    accept = await _await_verdict(check, resp)
    if accept is None:
        return
    if accept and period is not None:
        act.checks.record_approval(src_id, dst_id)
    await reply(resp, 200, {**_base_action(), "accept" if accept else "reject": True})
