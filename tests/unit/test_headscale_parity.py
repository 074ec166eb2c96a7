"""tests/integration/HEADSCALE_PARITY.md stays complete and honest: one row per Headscale
integration test in tests/integration/headscale_tests.txt, and every test a row names exists
in our integration suite (pytest collects it)."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INTEGRATION = REPO / "tests" / "integration"
TABLE = INTEGRATION / "HEADSCALE_PARITY.md"
NAMES = INTEGRATION / "headscale_tests.txt"

STATUSES = {"equivalent", "partial", "cannot", "none"}


@dataclass(frozen=True)
class Row:
    name: str
    file: str
    status: str
    tests: tuple[str, ...]
    notes: str


def headscale_tests() -> dict[str, str]:
    """Test name -> Headscale file (as listed in the data file)."""
    out: dict[str, str] = {}
    for line in NAMES.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, path, refs = line.split()
        assert re.fullmatch(r"Test\w+", name), line
        assert set(refs.split(",")) <= {"release", "dev"}, line
        assert name not in out, f"{name} listed twice"
        out[name] = path.removeprefix("integration/")
    return out


def table_rows() -> list[Row]:
    rows = []
    for line in TABLE.read_text().splitlines():
        if not line.startswith("| Test"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 5, f"a row has 5 cells: {line}"
        name, path, status, tests, notes = cells
        ids = tuple(re.findall(r"`([^`]+)`", tests))
        assert tests == "" or ids, f"tests are written as `file::function`: {line}"
        rows.append(Row(name, path, status, ids, notes))
    return rows


@cache
def collected() -> frozenset[str]:
    """Node ids of the integration suite, parameters stripped (`file::function`)."""
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "tests/integration"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return frozenset(line.split("[")[0] for line in r.stdout.splitlines() if "::" in line)


def test_every_headscale_test_has_exactly_one_row() -> None:
    names = headscale_tests()
    assert len(names) >= 158
    rows = table_rows()
    seen = [r.name for r in rows]
    assert sorted(n for n in set(seen) if seen.count(n) > 1) == []
    assert sorted(set(names) - set(seen)) == [], "Headscale tests without a row"
    assert sorted(set(seen) - set(names)) == [], "rows for tests Headscale does not have"
    for r in rows:
        assert r.file == names[r.name], (r.name, r.file, names[r.name])


def test_rows_say_what_and_why() -> None:
    for r in table_rows():
        assert r.status in STATUSES, r
        if r.status in ("equivalent", "partial"):
            assert r.tests, f"{r.name}: {r.status} names our test"
        if r.status == "none":
            assert not r.tests, f"{r.name}: a row naming a test is at least partial"
        if r.status != "equivalent":
            assert len(r.notes) >= 10, f"{r.name}: {r.status} says why in the notes"


def test_named_tests_exist_in_the_integration_suite() -> None:
    ids = collected()
    missing = [(r.name, t) for r in table_rows() for t in r.tests if t not in ids]
    assert missing == [], "rows name tests pytest does not collect"


def test_counts_line_matches_the_rows() -> None:
    rows = table_rows()
    n = {s: sum(r.status == s for r in rows) for s in STATUSES}
    want = (f"Counts: {n['equivalent']} equivalent, {n['partial']} partial, "
            f"{n['cannot']} cannot, {n['none']} none (of {len(rows)} Headscale tests).")
    assert want in TABLE.read_text(), want
