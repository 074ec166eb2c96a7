"""The few typed things the /api/v2 handlers use: the tailnet state (shared with /api/v1, so
both APIs go through the same writes), the OAuth store, the policy and a settings snapshot."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

from pyheadscale.config import Config
from pyheadscale.state.oauth import OAuthStore
from pyheadscale.state.policystore import StoredPolicy
from pyheadscale.state.tailnet import Tailnet


class PolicyAccess(Protocol):
    """The running policy: its text (file or database), writes, checks and tag ownership.
    get() raises PolicyNotFound/PolicyReadError; set() PolicyUpdateDisabled/PolicyError."""

    @property
    def mode(self) -> str: ...

    async def get(self) -> StoredPolicy: ...

    async def set(self, text: str) -> StoredPolicy: ...

    async def check(self, text: str) -> None: ...

    def tag_exists(self, tag: str) -> bool: ...

    def tag_owned_by_tags(self, tag: str, owner_tags: Sequence[str]) -> bool: ...


@dataclass(frozen=True)
class Settings:
    """What GET .../settings reports; fixed by the configuration."""

    policy_mode: str
    key_duration_days: int
    https: bool
    policy_path_set: bool

    @classmethod
    def from_config(cls, cfg: Config) -> Settings:
        expiry = cfg.node.expiry or timedelta(0)
        return cls(policy_mode=cfg.policy.mode, key_duration_days=expiry // timedelta(days=1),
                   https=bool(cfg.tls_cert_path or cfg.tls_letsencrypt_hostname),
                   policy_path_set=cfg.policy.path is not None)


@dataclass(frozen=True)
class V2Deps:
    tailnet: Tailnet
    oauth: OAuthStore
    policy: PolicyAccess
    settings: Settings
    revoked_key_retention: timedelta = timedelta(hours=168)
