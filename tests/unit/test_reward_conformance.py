"""The labelled conformance table tests/data/reward_conformance.jsonl (docs/rewards.md): GSM8K-style, MATH-style
and countdown responses and the red-team table of reward hacks, each graded as in training (an isolated worker
with a hard timeout) and compared with its hand-written label."""

import json
from collections import Counter
from pathlib import Path

import pytest

from reward.countdown import parse_countdown_answer
from reward.worker import WorkerPool

TABLE = Path(__file__).resolve().parents[1] / "data" / "reward_conformance.jsonl"
ROWS = [json.loads(line) for line in TABLE.read_text(encoding="utf-8").splitlines() if line.strip()]
FIELDS = {"id", "category", "task", "response", "gold", "reward", "why"}
CATEGORIES = {"gsm8k": "numeric", "math": "math", "countdown": "countdown", "redteam:issue": None, "redteam:own": None}


def test_table_shape_and_coverage():
    assert len(ROWS) >= 300
    assert [r["id"] for r in ROWS] == list(range(1, len(ROWS) + 1))
    for r in ROWS:
        assert set(r) == FIELDS, r["id"]
        assert r["category"] in CATEGORIES and r["reward"] in (0, 1) and r["why"].strip(), r["id"]
        assert CATEGORIES[r["category"]] in (None, r["task"]), r["id"]
    count = Counter(r["category"] for r in ROWS)
    assert count["gsm8k"] >= 60 and count["math"] >= 80 and count["countdown"] >= 30
    assert count["redteam:issue"] >= 12 and count["redteam:own"] >= 20
    # the red-team table is about hacks: all but "states exactly the gold" rows must score incorrect
    assert sum(r["reward"] == 0 for r in ROWS if r["category"].startswith("redteam")) >= 70
    for category in ("gsm8k", "math", "countdown"):
        assert {r["reward"] for r in ROWS if r["category"] == category} == {0, 1}
    assert len({(r["task"], r["response"], r["gold"]) for r in ROWS}) == len(ROWS)  # no duplicate rows


@pytest.fixture(scope="module")
def graded():
    jobs = []
    for r in ROWS:
        if r["task"] == "countdown":
            jobs.append({"op": "score", "verifier": "countdown", "text": r["response"], "gold": None,
                         "meta": parse_countdown_answer(r["gold"])})
        else:
            jobs.append({"op": "score", "verifier": r["task"], "text": r["response"], "gold": r["gold"], "meta": {}})
    with WorkerPool(1, timeout_s=3.0) as pool:
        return dict(zip((r["id"] for r in ROWS), pool.run(jobs)))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("row", ROWS, ids=[f"{r['id']}-{r['category']}" for r in ROWS])
def test_conformance_row(row, graded):
    res = graded[row["id"]]
    reward = 1 if res.get("correct") is True else 0       # a timeout or crash ({"error": ...}) scores incorrect
    assert reward == row["reward"], (row["why"], row["response"][:200], row["gold"][:200], res)
    assert "error" not in res or res["error"] == "timeout", res   # never an exception from the verifier
