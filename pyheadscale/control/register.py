"""POST /machine/register: auth-key login, restart, logout, key rotation, interactive followup."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from pyheadscale import tailcfg
from pyheadscale.control.types import MIN_CAPVER, ControlRequest, ResponseStream
from pyheadscale.state.errors import InvalidAuthKey, StateError
from pyheadscale.state.model import Node
from pyheadscale.state.tailnet import Tailnet

log = logging.getLogger("pyheadscale.register")


class BadRequest(Exception):
    """The request is malformed; answered with HTTP 400 and this text."""


async def reply(resp: ResponseStream, status: int, body: dict[str, Any] | str) -> None:
    if isinstance(body, str):
        await resp.start(status, [("content-type", "text/plain; charset=utf-8")])
        await resp.end(body.encode())
        return
    await resp.start(status, [("content-type", "application/json")])
    await resp.end(orjson.dumps(body))


def parse_register(req: ControlRequest) -> dict[str, Any]:
    try:
        body = orjson.loads(req.body)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"register request is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("register request must be a JSON object")
    return body


@dataclass(frozen=True)
class Registration:
    """What /machine/register uses."""

    tailnet: Tailnet
    # The interactive flow (AuthURL, Followup) for requests without an auth key.
    interactive: Callable[[ControlRequest, tailcfg.RegisterRequest, ResponseStream],
                          Awaitable[None]]


async def handle_register(reg: Registration, req: ControlRequest,
                          resp: ResponseStream) -> None:
    try:
        rr = tailcfg.parse_register_request(parse_register(req))
    except (BadRequest, tailcfg.TailcfgError) as e:
        await reply(resp, 400, str(e))
        return
    req.body = b""  # a Followup waits up to 15 min: keep the decoded request only
    if rr.version < MIN_CAPVER:
        await reply(resp, 400, f"unsupported client version: capability version {rr.version}, "
                    f"pyheadscale needs {MIN_CAPVER} (Tailscale v1.80) or newer")
        return
    tn = reg.tailnet
    now = datetime.now(UTC)
    node = tn.node_by_node_key(rr.node_key)
    if node is not None and node.machine_key != req.machine_key:
        # A node key presented over another machine's Noise session: never act on it.
        await reply(resp, 200, register_body(error="node key belongs to another machine"))
        return

    # Logout: a past expiry with the current node key wins even when an auth key is present.
    if rr.expiry is not None and rr.expiry <= now and node is not None:
        node = await tn.logout(node.id, now)
        await reply(resp, 200, register_response(tn, node, now) if node else register_body())
        return

    if rr.auth_key:
        try:
            node = await tn.register_with_authkey(
                machine_key=req.machine_key, node_key=rr.node_key,
                old_node_key=rr.old_node_key, hostinfo=rr.hostinfo, key=rr.auth_key,
                requested_expiry=rr.expiry, ephemeral=rr.ephemeral, capver=rr.version,
            )
        except InvalidAuthKey as e:
            await reply(resp, 200, register_body(error=str(e)))
            return
        except StateError as e:
            log.warning("registration refused: %s", e)
            await reply(resp, 200, register_body(error=str(e)))
            return
        await reply(resp, 200, register_response(tn, node, now))
        return

    # A new node key without an auth key (`--force-reauth`, re-login after expiry) is a new
    # login, as in Headscale: it goes to the interactive flow, whose completion re-keys the
    # machine's existing node in place (same ID and addresses).
    if node is not None and rr.followup == "":
        await reply(resp, 200, register_response(tn, node, now))
        return

    await reg.interactive(req, rr, resp)


def register_body(*, user: dict[str, Any] | None = None, login: dict[str, Any] | None = None,
                  node_key_expired: bool = False, machine_authorized: bool = False,
                  auth_url: str = "", error: str = "") -> dict[str, Any]:
    """A tailcfg.RegisterResponse with every field Go's encoding writes, zero values included:
    clients with strict decoders (tailscale-rs's serde) refuse an answer that lacks one, even
    an `Error` or `AuthURL` answer."""
    return {
        "User": user or {"ID": 0, "DisplayName": ""},
        "Login": login or {"ID": 0, "Provider": "", "LoginName": "", "DisplayName": ""},
        "NodeKeyExpired": node_key_expired,
        "MachineAuthorized": machine_authorized,
        "AuthURL": auth_url,
        "NodeKeySignature": None,  # tailnet lock: not supported
        "Error": error,
    }


def register_response(tailnet: Tailnet, node: Node, now: datetime) -> dict[str, Any]:
    profile = tailnet.user_profile(node)
    pic = {"ProfilePicURL": profile["ProfilePicURL"]} if profile.get("ProfilePicURL") else {}
    return register_body(
        user={"ID": profile["ID"], "DisplayName": profile["DisplayName"], **pic},
        login={"ID": profile["ID"], "Provider": node.register_method,
               "LoginName": profile["LoginName"], "DisplayName": profile["DisplayName"], **pic},
        node_key_expired=node.is_expired(now), machine_authorized=True)
