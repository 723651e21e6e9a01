"""DAPO dynamic sampling with refill (cluster/driver/refill.py): the driver's refill over a real prompt stream
and the real group stage (reward.group.score_groups, in-process verification)."""

import logging

import numpy as np
import pytest

from cluster.config import RewardConfig
from cluster.data.tasks import PromptStream, synthetic_problems
from cluster.driver.refill import refill
from cluster.types import Prompt, Response, Rollout
from reward.group import score_groups
from reward.verifiers import run_inline

G = 4


def sampler(stream: PromptStream, solved: callable):
    """sample(n): the next n problems of the stream, each answered G times (all right, all wrong or mixed, by
    `solved(problem index)`), graded by score_groups; returns the kept count. Records the batch sizes."""
    sizes = []

    def sample(n: int) -> int:
        sizes.append(n)
        rollouts = []
        for p in stream.next(n):
            k = p.meta["index"]
            right = {"all": [True] * G, "none": [False] * G, "mixed": [True, False, True, False]}[solved(k)]
            texts = [f"so... Answer: {p.gold if ok else int(p.gold) + 1}" for ok in right]
            rollouts.append(Rollout(f"g{k}-{len(sizes)}", f"p{k}", np.zeros(3, np.int32), "Q",
                                    [Response(np.arange(5, dtype=np.int32), np.full(5, -0.5, np.float32), text=t)
                                     for t in texts], 0, gold=p.gold, meta={"task": "arith"}))
        kept, _ = score_groups(rollouts, RewardConfig(), "grpo", np.random.default_rng(0), run_inline, l_max=16)
        return len(kept)

    return sample, sizes


def problems(n: int) -> list[Prompt]:
    return [Prompt(f"train-{i}", p.question, np.zeros(3, np.int32), p.gold, {**p.meta, "index": i})
            for i, p in enumerate(synthetic_problems("arith", n, "train", seed=0))]


def test_refill_fills_the_step_with_groups_with_signal():
    # a third of the prompts have signal: the first batch of 6 keeps ~2, the refills sample the shortfall
    stream = PromptStream(problems(60), batch=6, seed=0)
    sample, sizes = sampler(stream, lambda k: ["all", "none", "mixed"][k % 3])
    kept = sample(6)
    got, rounds = refill(kept, 6, 50, sample)
    assert got == 6 and rounds == len(sizes) - 1 >= 1
    assert sizes[1] == 6 - kept and sizes == sorted(sizes, reverse=True)   # each round samples the shortfall
    assert sum(sizes) == stream.pos   # every sampled prompt is a new one from the stream


def test_refill_stops_at_its_bound_with_one_warning_when_the_data_has_too_few(caplog):
    stream = PromptStream(problems(20), batch=4, seed=0)
    sample, sizes = sampler(stream, lambda k: "mixed" if k == 3 else "all")   # one prompt with signal
    with caplog.at_level(logging.WARNING, logger="forkrl"):
        got, rounds = refill(sample(4), 4, 3, sample)
    assert rounds == 2 and len(sizes) == 3 and got <= 1
    lines = [r.getMessage() for r in caplog.records if r.name == "forkrl"]
    assert len(lines) == 1 and "after 3 generation batches (reward.max_gen_batches)" in lines[0], lines
    assert f"{got} of 4 groups" in lines[0]


@pytest.mark.parametrize("bound", [1, 5])
def test_no_refill_when_off_or_already_full(caplog, bound):
    stream = PromptStream(problems(20), batch=4, seed=0)
    sample, sizes = sampler(stream, lambda k: "mixed" if bound == 5 else "all")
    with caplog.at_level(logging.WARNING, logger="forkrl"):
        got, rounds = refill(sample(4), 4, bound, sample)
    assert rounds == 0 and len(sizes) == 1 and not caplog.records   # bound 1: refill off, no warning
    assert got == (4 if bound == 5 else 0)


def test_prompt_stream_next_takes_any_count_and_continues_the_order():
    a, b = PromptStream(problems(10), batch=4, seed=3), PromptStream(problems(10), batch=4, seed=3)
    whole = [p.meta["index"] for p in a.next(7)]
    assert [p.meta["index"] for p in b.next()] + [p.meta["index"] for p in b.next(3)] == whole


def test_each_draw_of_the_stream_is_numbered_across_epochs():
    s = PromptStream(problems(4), batch=3, seed=1)
    drawn = s.next() + s.next() + s.next(2)
    assert [p.draw for p in drawn] == list(range(8))   # epoch x size + position: a resume continues it
    assert sorted(p.prompt_id for p in drawn[:4]) == sorted(p.prompt_id for p in drawn[4:])
    t = PromptStream(problems(4), batch=3, seed=1)
    t.load_state_dict({"epoch": 1, "pos": 2})
    assert [(p.draw, p.prompt_id) for p in t.next(2)] == [(p.draw, p.prompt_id) for p in drawn[6:]]
