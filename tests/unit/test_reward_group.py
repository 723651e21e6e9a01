"""The group stage (score_groups) against a slow float64 reference, with in-process verification."""

import math
import random

import numpy as np
import pytest

from cluster.config import RewardConfig
from cluster.types import Response, Rollout
from reward.group import merge_stats, score_groups
from reward.verifiers import run_inline


def make_rollout(gid, texts, gold=None, task="arith", lengths=None, meta=None, logprobs=None):
    lengths = lengths or [5] * len(texts)
    responses = [Response(token_ids=np.arange(n, dtype=np.int32),
                          logprobs=(np.asarray(logprobs[i], dtype=np.float32) if logprobs else
                                    np.full(n, -0.5, dtype=np.float32)), text=t)
                 for i, (t, n) in enumerate(zip(texts, lengths))]
    return Rollout(group_id=gid, prompt_id=f"p-{gid}", prompt_ids=np.zeros(3, dtype=np.int32), prompt="Q",
                   responses=responses, version=0, gold=gold, meta={"task": task, **(meta or {})})


def ref_advantages(r, estimator):
    g = len(r)
    if g == 1:
        return [0.0]
    mean = math.fsum(r) / g
    if estimator == "grpo":
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in r) / (g - 1))
        return [(x - mean) / (std + 1e-6) for x in r]
    if estimator == "drgrpo":
        return [x - mean for x in r]
    return [x - math.fsum(r[:i] + r[i + 1:]) / (g - 1) for i, x in enumerate(r)]


def ref_overlong(n, l_max, buffer, factor):
    return 0.0 if n <= l_max - buffer else (factor * (l_max - buffer - n) / buffer if n <= l_max else -factor)


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
def test_rewards_and_advantages_match_reference(estimator):
    rng = random.Random(estimator)
    cfg = RewardConfig(correct=1.0, incorrect=-1.0, format_reward=0.25, overlong_buffer=4, overlong_factor=0.5)
    rollouts, want = [], {}
    for gi in range(40):
        g = rng.randint(1, 8)
        gold = rng.randint(0, 3)
        answers = [rng.choice([None, 0, 1, 2, 3]) for _ in range(g)]
        lengths = [rng.randint(1, 20) for _ in range(g)]
        texts = [f"I think... Answer: {a}" if a is not None else "no idea" for a in answers]
        rollouts.append(make_rollout(f"g{gi}", texts, gold=str(gold), lengths=lengths))
        r = [(1.0 if a == gold else -1.0) + (0.25 if a is not None else 0.0) + ref_overlong(n, 16, 4, 0.5)
             for a, n in zip(answers, lengths)]
        want[f"g{gi}"] = (r, answers, gold)
    kept, stats = score_groups(rollouts, cfg, estimator, np.random.default_rng(0), run_inline, l_max=16)

    kept_ids = [k for k, (r, _, _) in want.items() if max(r) != min(r)]
    assert [sg.group_id for sg in kept] == kept_ids
    for sg in kept:
        r, answers, gold = want[sg.group_id]
        np.testing.assert_allclose(sg.rewards, r, atol=1e-6)
        np.testing.assert_allclose(sg.advantages, ref_advantages(r, estimator), atol=1e-5)
        assert sg.rewards.dtype == sg.advantages.dtype == np.float32
        assert sg.answers == [None if a is None else str(a) for a in answers]
        np.testing.assert_allclose(sum(sg.components.values()), sg.rewards, atol=1e-6)
        assert set(sg.components) == {"correct", "format", "overlong"}
    all_r = [x for r, _, _ in want.values() for x in r]
    n_resp = len(all_r)
    assert stats["reward/groups"] == 40 and stats["reward/groups_kept"] == len(kept_ids)
    assert stats["reward/dropped_zero_var"] == 40 - len(kept_ids)
    assert stats["reward/mean"] == pytest.approx(math.fsum(all_r) / n_resp)
    assert stats["reward/accuracy"] == pytest.approx(
        sum(a == gold for _, ans, gold in want.values() for a in ans) / n_resp)
    assert stats["reward/extract_rate"] == pytest.approx(
        sum(a is not None for _, ans, _ in want.values() for a in ans) / n_resp)
    assert stats["reward/timeouts"] == stats["reward/crashes"] == stats["reward/errors"] == 0


def test_dynamic_sampling_drops_only_zero_variance_groups():
    rolls = [make_rollout("solved", ["Answer: 4"] * 4, gold="4"),
             make_rollout("unsolved", ["Answer: 5", "Answer: 6", "nothing", "Answer: 7"], gold="4"),
             make_rollout("mixed", ["Answer: 4", "Answer: 5", "Answer: 4", "x"], gold="4"),
             make_rollout("single", ["Answer: 4"], gold="4")]
    kept, stats = score_groups(rolls, RewardConfig(), "grpo", np.random.default_rng(0), run_inline)
    assert [k.group_id for k in kept] == ["mixed"] and stats["reward/dropped_zero_var"] == 3
    assert kept[0].rewards.tolist() == [1, 0, 1, 0] and stats["reward/kept_frac"] == 0.25
    assert stats["reward/groups_with_signal"] == 1
    kept, stats = score_groups(rolls, RewardConfig(dynamic_sampling=False), "grpo", np.random.default_rng(0),
                               run_inline)
    assert [k.group_id for k in kept] == ["solved", "unsolved", "mixed", "single"]
    assert stats["reward/groups_with_signal"] == 1   # kept, but only "mixed" has rewards that differ
    assert not kept[0].advantages.any() and not kept[1].advantages.any() and not kept[3].advantages.any()


def test_ttrl_votes_truncates_and_never_uses_gold():
    texts = ["Answer: 2", "Answer: 2", "Answer: 3", "no answer", "Answer: 2", "Answer: 3"]
    cfg = RewardConfig(ttrl=True, ttrl_vote=6, ttrl_train=4, dynamic_sampling=False)
    out = {}
    for gold in ("3", "2", None):
        kept, stats = score_groups([make_rollout("t", texts, gold=gold)], cfg, "grpo", np.random.default_rng(0),
                                   run_inline)
        out[gold] = (kept[0], stats)
    for gold, (sg, stats) in out.items():
        assert sg.rewards.tolist() == [1, 1, 0, 0]                   # majority "2" (3 of 5 votes)
        assert len(sg.rollout.responses) == 4 and len(sg.answers) == 4 and sg.advantages.shape == (4,)
        assert sg.components["vote_agree"].tolist() == [1, 1, 0, 0]
        assert stats["ttrl/majority_ratio"] == pytest.approx(3 / 6)
    assert out["3"][1]["ttrl/label_accuracy"] == 0 and out["2"][1]["ttrl/label_accuracy"] == 1
    # vote reward vs gold correctness on the 4 kept: gold 3 -> right = [F,F,T,F], vote = [T,T,F,F]
    assert out["3"][1]["ttrl/reward_accuracy"] == pytest.approx(1 / 4)
    assert out["2"][1]["ttrl/reward_accuracy"] == 1
    assert "ttrl/label_accuracy" not in out[None][1] and "reward/accuracy" not in out[None][1]
    assert out["3"][1]["reward/accuracy"] == pytest.approx(2 / 6)     # the policy's accuracy on all 6


def test_ttrl_math_clusters_by_equivalence():
    texts = ["\\boxed{\\frac{1}{3}}", "\\boxed{0.5}", "\\boxed{1/2}", "\\boxed{\\dfrac{2}{4}}", "\\boxed{0.3333}",
             "\\boxed{\\frac{1}{3}}"]
    cfg = RewardConfig(ttrl=True, ttrl_vote=6, ttrl_train=6)
    kept, stats = score_groups([make_rollout("m", texts, gold="\\frac12", task="math")], cfg, "grpo",
                               np.random.default_rng(0), run_inline)
    assert kept[0].rewards.tolist() == [0, 1, 1, 1, 0, 0]            # three halves outvote two thirds
    assert stats["ttrl/label_accuracy"] == 1


def test_noise_flips_whole_groups_with_the_given_probability():
    rolls = [make_rollout(f"n{i}", ["Answer: 1", "Answer: 2", "Answer: 1"], gold="1") for i in range(50)]
    clean = [1.0, 0.0, 1.0]
    kept, stats = score_groups(rolls, RewardConfig(noise_flip_prob=1.0), "grpo", np.random.default_rng(0),
                               run_inline)
    assert all(k.rewards.tolist() == [0, 1, 0] for k in kept) and stats["reward/flipped_groups"] == 50
    kept, stats = score_groups(rolls, RewardConfig(noise_flip_prob=0.3), "grpo", np.random.default_rng(7),
                               run_inline)
    flips = np.random.default_rng(7).random(50) < 0.3
    assert stats["reward/flipped_groups"] == flips.sum()
    for k, f in zip(kept, flips):
        assert k.rewards.tolist() == ([1 - x for x in clean] if f else clean)


def test_failed_verifications_score_incorrect_and_are_counted():
    def flaky(jobs):
        res = run_inline(jobs)
        for j, r in zip(jobs, res):
            for word, err in (("HANG", "timeout"), ("CRASH", "crash"), ("OOM", "MemoryError")):
                if word in j.get("text", ""):
                    r.clear()
                    r["error"] = err
        return res

    rolls = [make_rollout("f", ["Answer: 1 HANG", "Answer: 1 CRASH", "Answer: 1 OOM", "Answer: 1"], gold="1")]
    kept, stats = score_groups(rolls, RewardConfig(correct=1, incorrect=-1), "grpo", np.random.default_rng(0), flaky)
    assert kept[0].rewards.tolist() == [-1, -1, -1, 1] and kept[0].answers == [None, None, None, "1"]
    assert (stats["reward/timeouts"], stats["reward/crashes"], stats["reward/errors"]) == (1, 1, 1)


def test_bad_inputs():
    empty = make_rollout("e", [])
    kept, stats = score_groups([empty, make_rollout("ok", ["Answer: 1", "x"], gold="1")], RewardConfig(), "grpo",
                               np.random.default_rng(0), run_inline)
    assert [k.group_id for k in kept] == ["ok"] and stats["reward/invalid_groups"] == 1
    with pytest.raises(ValueError, match="overlong_max"):
        score_groups([empty], RewardConfig(overlong_buffer=4), "grpo", np.random.default_rng(0), run_inline)
    # a countdown rollout without its numbers is counted as an error, not raised
    kept, stats = score_groups([make_rollout("c", ["Answer: 1+2", "x"], task="countdown")],
                               RewardConfig(dynamic_sampling=False), "grpo", np.random.default_rng(0), run_inline)
    assert stats["reward/errors"] == 2 and kept[0].rewards.tolist() == [0, 0]


def test_rent_from_logprobs_or_given_entropies():
    lp = [[-1.0, -3.0], [-0.5, -0.5, -2.0]]
    cfg = RewardConfig(rent_coef=0.5, correct=0.0, incorrect=0.0, dynamic_sampling=False)
    r = make_rollout("r", ["Answer: 1", "no answer"], gold="1", lengths=[2, 3], logprobs=lp)
    kept, _ = score_groups([r], cfg, "grpo", np.random.default_rng(0), run_inline)
    np.testing.assert_allclose(kept[0].components["rent"], [0.5 * -2.0, 0.5 * -7.0])
    r.meta["token_entropies"] = [[0.1, 0.3], [1.0, 1.0, 1.0]]
    kept, _ = score_groups([r], cfg, "grpo", np.random.default_rng(0), run_inline)
    np.testing.assert_allclose(kept[0].rewards, [0.5 * -0.2, 0.5 * -7.0], rtol=1e-6)


def test_mixed_tasks_and_merged_stats():
    rolls = [make_rollout("a", ["Answer: 3", "Answer: 4"], gold="3", task="arith"),
             make_rollout("c", ["Answer: (8*3)-4", "Answer: 8*3"], gold="20", task="countdown",
                          meta={"numbers": [3, 8, 4], "target": 20}),
             make_rollout("m", ["\\boxed{\\frac{1}{2}}", "\\boxed{2}"], gold="0.5", task="math"),
             make_rollout("x", ["Answer: 9", "Answer: 9"], gold="9", task="arith")]
    cfg = RewardConfig()
    kept, whole = score_groups(rolls, cfg, "grpo", np.random.default_rng(0), run_inline)
    assert [k.rewards.tolist() for k in kept] == [[1, 0], [1, 0], [1, 0]]
    parts = [score_groups(rolls[:1], cfg, "grpo", np.random.default_rng(0), run_inline)[1],
             score_groups(rolls[1:], cfg, "grpo", np.random.default_rng(0), run_inline)[1]]
    merged = merge_stats(parts)
    assert merged.keys() == whole.keys()
    for k in whole:
        assert merged[k] == pytest.approx(whole[k]), k


def test_ttrl_with_nothing_extractable():
    cfg = RewardConfig(ttrl=True, ttrl_vote=3, ttrl_train=2)
    kept, stats = score_groups([make_rollout("n", ["hmm", "no idea", "Answer:"], gold="4")], cfg, "grpo",
                               np.random.default_rng(0), run_inline)
    assert kept == [] and stats["reward/dropped_zero_var"] == 1          # all incorrect: zero variance
    assert stats["ttrl/label_accuracy"] == 0 and stats["ttrl/majority_ratio"] == 0
    kept, _ = score_groups([make_rollout("n", ["hmm", "no idea", "Answer:"], gold="4")],
                           RewardConfig(ttrl=True, ttrl_vote=3, ttrl_train=2, dynamic_sampling=False), "grpo",
                           np.random.default_rng(0), run_inline)
    assert kept[0].rewards.tolist() == [0, 0] and kept[0].answers == [None, None]
