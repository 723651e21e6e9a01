"""stepstats.eval_stats, the eval/* numbers of the in-run evaluation and `forkrl eval` (no engine)."""

import numpy as np
import pytest

from cluster.driver.stepstats import eval_stats
from cluster.types import Response, Rollout, ScoredGroup


def group(correct: list[int], answers: list[str | None], lengths: list[int]) -> tuple[Rollout, ScoredGroup]:
    resp = [Response(np.zeros(n, np.int32), np.full(n, -0.5, np.float32)) for n in lengths]
    r = Rollout("g", "p", np.zeros(2, np.int32), "", resp, 0)
    c = np.asarray(correct, np.float32)
    return r, ScoredGroup(r, c, c, answers, {"correct": c})


def test_eval_stats_count_extracted_answers_apart_from_correct_ones():
    (r1, g1), (r2, g2) = group([1, 0, 0], ["3", "4", None], [2, 4, 6]), group([0, 0, 0], [None, None, "x"], [3, 3, 3])
    st = eval_stats([r1, r2], [g1, g2])
    assert st["eval/extracted"] == pytest.approx(3 / 6)      # an answer, right or wrong, was extracted
    assert st["eval/accuracy_avg"] == pytest.approx(1 / 6) and st["eval/accuracy_pass"] == pytest.approx(1 / 2)
    assert st["eval/length_mean"] == pytest.approx(21 / 6) and st["eval/entropy_sampled"] == pytest.approx(0.5)
    assert st["eval/problems"] == 2.0
    assert eval_stats([], [])["eval/extracted"] == 0.0
