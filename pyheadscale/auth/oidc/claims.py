"""Claims of a verified ID token (and UserInfo), and what a login may do with them.

Pure: Headscale's claim parsing (lenient about how providers spell booleans and lists), its
provider identifier, the allowed_groups/domains/users rules and User.FromClaim.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, replace
from email.utils import parseaddr
from typing import Any
from urllib.parse import urlsplit

from pyheadscale.auth.oidc.errors import OIDCError
from pyheadscale.config import OIDCConfig
from pyheadscale.state import names


def _flex_bool(v: Any) -> bool:
    # Some providers (JumpCloud) send email_verified as the string "true".
    if isinstance(v, str):
        return v.strip().lower() in ("1", "t", "true")
    return v is True


def flex_strs(v: Any) -> tuple[str, ...]:
    """A claim that may be one string or a list of them; anything else reads as none."""
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list):
        return tuple(x for x in v if isinstance(x, str))
    return ()


def as_str(v: Any) -> str:
    """A string claim; a missing or mistyped one reads as ""."""
    return v if isinstance(v, str) else ""


def clean_identifier(ident: str) -> str:
    """Headscale's CleanIdentifier: trim, drop empty path segments, lower-case the scheme."""
    ident = ident.strip()
    if not ident:
        return ""
    parts = urlsplit(ident)
    if parts.scheme and "://" in ident:
        segs = [s.strip() for s in parts.path.split("/") if s.strip()]
        path = "/" + "/".join(segs) if segs else ""
        out = f"{parts.scheme.lower()}://{parts.netloc}{path}"
        if parts.query:
            out += "?" + parts.query
        return out + ("#" + parts.fragment if parts.fragment else "")
    return "/".join(s.strip() for s in ident.split("/") if s.strip())


@dataclass(frozen=True)
class Claims:
    sub: str
    iss: str
    name: str = ""
    groups: tuple[str, ...] = ()
    email: str = ""
    email_verified: bool = False
    picture: str = ""
    username: str = ""

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> Claims:
        return cls(sub=as_str(d.get("sub")), iss=as_str(d.get("iss")),
                   name=as_str(d.get("name")), groups=flex_strs(d.get("groups")),
                   email=as_str(d.get("email")),
                   email_verified=_flex_bool(d.get("email_verified")),
                   picture=as_str(d.get("picture")), username=as_str(d.get("preferred_username")))

    def identifier(self) -> str:
        """Provider identifier: issuer + "/" + subject (plain concatenation, then cleaned)."""
        if not self.iss and not self.sub:
            return ""
        if not self.iss:
            return "/" + clean_identifier(self.sub).lstrip("/")
        if not self.sub:
            return clean_identifier(self.iss)
        return clean_identifier(self.iss.rstrip("/") + "/" + self.sub.lstrip("/"))

    def needs_userinfo(self) -> bool:
        return not self.email or not self.groups

    def merged_with_userinfo(self, info: Mapping[str, Any]) -> Claims:
        """UserInfo values win where present; a response for another subject is ignored."""
        if as_str(info.get("sub")) != self.sub:
            return self
        u = Claims.from_mapping({**info, "iss": self.iss})
        return replace(
            self, email=u.email or self.email,
            email_verified=u.email_verified or self.email_verified,
            username=u.username or self.username, name=u.name or self.name,
            picture=u.picture or self.picture,
            groups=u.groups if "groups" in info else self.groups)


def authorize(oidc: OIDCConfig, c: Claims) -> None:
    """allowed_groups, then (email trusted?) allowed_domains and allowed_users; raises 401."""
    if oidc.allowed_groups and not any(g in c.groups for g in oidc.allowed_groups):
        raise OIDCError(401, "unauthorised group: you are not in any group allowed to log in")
    trust_email = not oidc.email_verified_required or c.email_verified
    if (oidc.allowed_domains or oidc.allowed_users) and not trust_email:
        raise OIDCError(401, "unverified email: your email address is not verified by the "
                             "identity provider")
    if oidc.allowed_domains:
        at = c.email.rfind("@")
        if at < 0 or c.email[at + 1:] not in oidc.allowed_domains:
            raise OIDCError(401, "unauthorised domain: your email domain is not allowed")
    if oidc.allowed_users and c.email not in oidc.allowed_users:
        raise OIDCError(401, "unauthorised user: your email address is not allowed")


def _valid_email(s: str) -> bool:
    name, addr = parseaddr(s)
    return bool(addr) and addr == s.strip() and "@" in addr and not name


def user_fields(c: Claims, email_verified_required: bool) -> dict[str, Any]:
    """Headscale's User.FromClaim: the user fields a login sets (name only when valid)."""
    out: dict[str, Any] = {"display_name": c.name, "profile_pic_url": c.picture,
                           "provider": "oidc", "provider_identifier": c.identifier(),
                           "groups": tuple(c.groups)}
    try:
        names.validate_username(c.username)
        out["name"] = c.username
    except names.InvalidName:
        pass
    if (c.email_verified or not email_verified_required) and _valid_email(c.email):
        out["email"] = c.email
    return out


def machine_key_short(machine_key: bytes) -> str:
    """Tailscale's key ShortString: the first five base64 characters in brackets."""
    if not machine_key or machine_key == bytes(len(machine_key)):
        return ""
    return "[" + base64.b64encode(machine_key).decode()[:5] + "]"
