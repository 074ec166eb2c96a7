from datetime import UTC, datetime, timedelta
from pathlib import Path

import bcrypt
import pytest
from sqlalchemy import text

from pyheadscale.auth import apikeys, preauthkeys
from pyheadscale.state.errors import InvalidAPIKey, InvalidArgument, InvalidAuthKey
from tests.unit._statefix import key, new_engine, open_tailnet


def test_key_format_and_parse() -> None:
    full, prefix, secret = preauthkeys.new_key()
    assert full == f"hskey-auth-{prefix}-{secret}"
    assert len(prefix) == 12 and len(secret) == 64
    p = preauthkeys.parse_key(full)
    assert (p.prefix, p.secret) == (prefix, secret)
    assert preauthkeys.parse_key("legacyplaintext").prefix is None
    with pytest.raises(preauthkeys.KeyFormatError):
        preauthkeys.parse_key("hskey-auth-short-x")
    afull, aprefix, _ = apikeys.new_key()
    assert afull.startswith("hskey-api-") and apikeys.parse_api_key(afull).prefix == aprefix
    assert apikeys.parse_api_key("abcdefg.secretsecret").legacy
    with pytest.raises(apikeys.KeyFormatError):
        apikeys.parse_api_key("nodotshere")


def test_tags_validation() -> None:
    assert preauthkeys.validate_tags(["tag:b", "tag:a", "tag:b"]) == ("tag:a", "tag:b")
    with pytest.raises(ValueError):
        preauthkeys.validate_tags(["server"])


async def test_preauth_key_lifecycle(tmp_path: Path) -> None:
    engine = new_engine(tmp_path)
    tn = await open_tailnet(engine)
    u = await tn.create_user("alice")
    k, full = await tn.create_preauth_key(u.id)
    # Only the prefix and a bcrypt hash are stored, never the secret.
    with engine.connect() as c:
        row = c.execute(text("SELECT key, prefix, hash FROM pre_auth_keys")).one()
    assert row.key == "" and row.prefix == k.prefix
    assert bcrypt.checkpw(full.rsplit("-", 1)[1].encode(), row.hash)
    assert full.rsplit("-", 1)[1] not in str(row)

    assert (await tn.validate_preauth_key(full)).id == k.id
    bad = full[:-1] + ("0" if full[-1] != "0" else "1")
    with pytest.raises(InvalidAuthKey) as ei:
        await tn.validate_preauth_key(bad)
    assert str(ei.value) == "invalid pre auth key"
    with pytest.raises(InvalidAuthKey, match="^invalid pre auth key$"):
        await tn.validate_preauth_key("hskey-auth-000000000000-" + "0" * 64)

    await tn.expire_preauth_key(k.id)
    with pytest.raises(InvalidAuthKey, match="^authkey expired$"):
        await tn.validate_preauth_key(full)
    await tn.delete_preauth_key(k.id)
    with pytest.raises(InvalidAuthKey, match="^invalid pre auth key$"):
        await tn.validate_preauth_key(full)
    with pytest.raises(InvalidArgument, match="tagged or owned"):
        await tn.create_preauth_key(None)
    await tn.close()


async def test_legacy_plaintext_preauth_key(tmp_path: Path) -> None:
    engine = new_engine(tmp_path)
    tn = await open_tailnet(engine)
    u = await tn.create_user("bob")
    await tn.close()
    with engine.begin() as c:
        c.execute(text(
            "INSERT INTO pre_auth_keys (key, prefix, user_id, reusable, ephemeral, used, "
            "created_at) VALUES ('0123456789abcdef0123456789abcdef0123456789abcdef', '', :u, "
            "0, 0, 0, '2025-01-01 00:00:00+00:00')"), {"u": u.id})
    tn = await open_tailnet(engine)
    node = await tn.register_with_authkey(
        key(1), key(2), None, {"Hostname": "legacy"},
        key="0123456789abcdef0123456789abcdef0123456789abcdef")
    assert node.user_id == u.id
    await tn.close()


async def test_api_keys(tmp_path: Path) -> None:
    engine = new_engine(tmp_path)
    tn = await open_tailnet(engine)
    a, full = await tn.create_api_key(datetime.now(UTC) + timedelta(days=1))
    got = await tn.validate_api_key(full)
    assert got.id == a.id and got.last_seen is not None
    with pytest.raises(InvalidAPIKey, match="invalid API key"):
        await tn.validate_api_key(full[:-1] + ("0" if full[-1] != "0" else "1"))
    with pytest.raises(InvalidAPIKey):
        await tn.validate_api_key("garbage")
    assert tn.api_key_by_prefix(f"hskey-api-{a.prefix}-***") is not None
    await tn.expire_api_key(a.id)
    with pytest.raises(InvalidAPIKey, match="expired"):
        await tn.validate_api_key(full)
    await tn.close()

    # Legacy "<7>.<secret>" keys stored by old Headscale versions are accepted.
    with engine.begin() as c:
        c.execute(text("INSERT INTO api_keys (prefix, hash, created_at) VALUES "
                       "('abcdefg', :h, '2025-01-01 00:00:00+00:00')"),
                  {"h": bcrypt.hashpw(b"oldsecret", bcrypt.gensalt(4))})
    tn = await open_tailnet(engine)
    assert (await tn.validate_api_key("abcdefg.oldsecret")).prefix == "abcdefg"
    await tn.delete_api_key(tn.api_key_by_prefix("abcdefg").id)  # type: ignore[union-attr]
    with pytest.raises(InvalidAPIKey):
        await tn.validate_api_key("abcdefg.oldsecret")
    await tn.close()
