"""The /api/v1 handlers, one module per resource; V1API (api/v1.py) mixes the groups together
so that a route's `handler` name is looked up on one object."""

from pyheadscale.api.handlers.apikeys import ApiKeyHandlers
from pyheadscale.api.handlers.authflow import AuthFlowHandlers
from pyheadscale.api.handlers.base import AdminDeps, HandlerBase
from pyheadscale.api.handlers.nodes import NodeHandlers
from pyheadscale.api.handlers.policy import PolicyHandlers
from pyheadscale.api.handlers.preauthkeys import PreAuthKeyHandlers
from pyheadscale.api.handlers.users import UserHandlers

__all__ = ["AdminDeps", "ApiKeyHandlers", "AuthFlowHandlers", "HandlerBase", "NodeHandlers",
           "PolicyHandlers", "PreAuthKeyHandlers", "UserHandlers"]
