import pytest

from pyheadscale.state import names


@pytest.mark.parametrize(("raw", "want"), [
    ("Joe's Mac mini", "joes-mac-mini"),
    ("my_host.local", "my-host"),
    ("laptop.lan", "laptop"),
    ("box.localdomain", "box"),
    ("--Weird--Name--", "weird--name"),
    ("a.b.c", "a-b-c"),
    ("Ünïcödé", "ncd"),
    ("日本語", ""),
    ("alice@corp", "alice-corp"),
])
def test_sanitize_hostname(raw: str, want: str) -> None:
    assert names.sanitize_hostname(raw) == want


def test_non_ascii_falls_back_to_node() -> None:
    assert names.given_name_base("日本語") == "node"
    assert names.given_name_base("") == "node"


def test_sanitize_truncates_to_63() -> None:
    out = names.sanitize_hostname("x" * 100)
    assert out == "x" * 63
    assert names.label_error(out) is None


def test_unique_suffixes() -> None:
    taken = {"web", "web-1"}
    assert names.unique_given_name("web", taken) == "web-2"
    assert names.unique_given_name("db", taken) == "db"
    long = "y" * 63
    got = names.unique_given_name(long, {long})
    assert got.endswith("-1") and len(got) == 63 and names.label_error(got) is None


def test_validate_given_name() -> None:
    names.validate_given_name("good-name")
    for bad in ("", "-x", "x-", "a_b", "a.b", "x" * 64):
        with pytest.raises(names.InvalidName):
            names.validate_given_name(bad)
    with pytest.raises(names.InvalidName):
        names.validate_given_name("a" * 63, "b" * 200)


def test_is_auto_derived() -> None:
    assert names.is_auto_derived("joes-mac-mini", "Joe's Mac mini")
    assert names.is_auto_derived("joes-mac-mini-3", "Joe's Mac mini")
    assert not names.is_auto_derived("renamed", "Joe's Mac mini")


@pytest.mark.parametrize(("name", "ok"), [
    ("alice", True), ("al", True), ("a", False), ("1abc", False), ("bob@example.com", True),
    ("a@b@c", False), ("has space", False), ("dot.and_under-score", True), ("Élise", True),
])
def test_validate_username(name: str, ok: bool) -> None:
    if ok:
        names.validate_username(name)
    else:
        with pytest.raises(names.InvalidName):
            names.validate_username(name)
