"""HuJSON parser: comments, trailing commas, error positions, and fuzzing."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyheadscale.policy.errors import PolicyError
from pyheadscale.policy.hujson import HuJSONError, loads, standardize


def test_comments_and_trailing_commas() -> None:
    text = """
    // leading comment
    {
      "acls": [ /* inline */ {"src": ["*"], "dst": ["*:*"],}, ],  // trailing
      "n": -1.5e3,
      "t": true, "f": false, "z": null,
    }
    """
    assert loads(text) == {
        "acls": [{"src": ["*"], "dst": ["*:*"]}],
        "n": -1500.0,
        "t": True,
        "f": False,
        "z": None,
    }


def test_comment_markers_inside_strings_are_text() -> None:
    assert loads('{"a": "http://x/*y*/"}') == {"a": "http://x/*y*/"}


def test_bytes_input_and_unicode() -> None:
    assert loads('{"tag:сервер": ["\\u00e9"]}'.encode()) == {"tag:сервер": ["é"]}


def test_standardize() -> None:
    assert standardize('{"a": [1, 2,], // x\n}') == '{"a":[1,2]}'


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ('{\n  "a": 1\n  "b": 2\n}', 3, 3),  # missing comma
        ('{"a": [1, 2}', 1, 12),
        ("{\n\n   /* never closed", 3, 4),
        ('{"a": tru}', 1, 7),
        ('{"a": 1} x', 1, 10),
        ('{"a": 1, "a": 2}', 1, 10),  # duplicate member, refused like Go's JSON v2
        ("", 1, 1),
        ('"unterminated', 1, 1),
    ],
)
def test_errors_carry_line_and_column(text: str, line: int, column: int) -> None:
    with pytest.raises(HuJSONError) as ei:
        loads(text)
    assert (ei.value.line, ei.value.column) == (line, column)
    assert f"line {line}, column {column}" in str(ei.value)
    assert isinstance(ei.value, PolicyError)


def test_deep_nesting_is_a_typed_error() -> None:
    with pytest.raises(HuJSONError):
        loads("[" * 100_000)


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(_json_values, st.booleans())
def test_roundtrips_standard_json(value: object, indent: bool) -> None:
    text = json.dumps(value, indent=2 if indent else None, ensure_ascii=False)
    assert loads(text) == json.loads(text)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet='{}[]",:/*\n ab01-.etruflsn\\', max_size=60))
def test_arbitrary_text_never_crashes(text: str) -> None:
    try:
        loads(text)
    except HuJSONError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    try:
        loads(data)
    except HuJSONError:
        pass
