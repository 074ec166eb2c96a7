"""A small count of the `make fuzz` run (tests/fuzz): every target against a real server
in this process; no failure, no growth in connections, fds or tasks, DB and memory agree."""

from __future__ import annotations

from pathlib import Path

from tests.fuzz.__main__ import fuzz


async def test_fuzz_small_count(tmp_path: Path) -> None:
    rep, problems = await fuzz(count=20_000, seed=12, tmp=tmp_path)
    assert rep.inputs >= 20_000 and set(rep.per_target) == {
        "noise", "h2", "control", "derp", "stun", "policy", "api"}
    assert problems == []
