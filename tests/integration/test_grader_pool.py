"""GraderPool on a real local Ray: same results as the in-process group stage, stats merged, sink pushes."""

import json
import sys

import numpy as np
import pytest

from cluster.config import Config, RewardConfig
from cluster.split import split_even
from cluster.types import Response, Rollout
from reward.group import score_groups
from reward.verifiers import run_inline

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_local():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    # the sink factory below is defined in this test module, which Ray's workers cannot import
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    if started:
        ray.shutdown()


def rollout(gid, texts, gold, task, meta=None, lengths=None):
    lengths = lengths or [4 + 3 * i for i in range(len(texts))]
    return Rollout(group_id=gid, prompt_id=gid, prompt_ids=np.zeros(2, dtype=np.int32), prompt="Q",
                   responses=[Response(np.arange(n, dtype=np.int32), np.full(n, -0.1, dtype=np.float32), t)
                              for t, n in zip(texts, lengths)],
                   version=3, gold=gold, meta={"task": task, **(meta or {})})


def batch():
    rng = np.random.default_rng(5)
    out = []
    for i in range(12):
        gold = int(rng.integers(0, 3))
        out.append(rollout(f"a{i}", [f"Answer: {rng.integers(0, 3)}" for _ in range(4)], str(gold), "arith"))
    out.append(rollout("c0", ["Answer: (8*3)-4", "Answer: 8+3+4", "nope", "Answer: 8*3-4"], "20", "countdown",
                       {"numbers": [3, 8, 4], "target": 20}))
    out.append(rollout("m0", ["\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{\\frac13}", "x"], "1/2", "math"))
    return out


class FileSink:
    """Appends one JSON line per pushed group (a stand-in destination; the queue Producer plugs in the same way)."""

    def __init__(self, path):
        self.path = path

    def __call__(self, groups):
        with open(self.path, "a") as f:
            for g in groups:
                f.write(json.dumps({"group": g.group_id, "rewards": g.rewards.tolist()}) + "\n")


@pytest.mark.timeout(300)
def test_pool_matches_inline_scoring_and_pushes(ray_local, tmp_path):
    from actors.grader import GraderPool

    cfg = Config(reward=RewardConfig(num_graders=2, workers_per_grader=1, overlong_buffer=8, format_reward=0.1),
                 rollout={"max_new_tokens": 16, "group_size": 4}, algorithm={"adv_estimator": "rloo"})
    sink_path = tmp_path / "pushed.jsonl"
    pool = GraderPool(cfg, sink_factory=lambda: FileSink(str(sink_path)))
    try:
        pids = pool.wait_ready()
        assert len(set(pids)) == 2
        rolls = batch()
        got, stats = pool.score(rolls)
        want, want_stats = score_groups(rolls, cfg.reward, "rloo", np.random.default_rng(0), run_inline, l_max=16)
        assert [g.group_id for g in got] == [g.group_id for g in want] and len(got) > 2
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a.rewards, b.rewards)
            np.testing.assert_array_equal(a.advantages, b.advantages)
            assert a.answers == b.answers and a.components.keys() == b.components.keys() == {
                "correct", "format", "overlong"}
            assert a.version == 3 and len(a.rollout.responses) == 4
        for k, v in want_stats.items():
            assert stats[k] == pytest.approx(v), k
        assert stats["reward/worker_restarts"] == 0

        # pushing: the kept groups reach the sink, in order, from inside the actors
        none, pstats = pool.score(rolls, push=True, return_groups=False)
        assert none == [] and pstats["reward/groups_kept"] == len(want)
        pushed = [json.loads(l) for l in sink_path.read_text().splitlines()]
        # the two actors push concurrently into one sink: each actor's chunk arrives in order, the chunks in
        # whichever order the actors finish
        by_id = {g.group_id: g for g in want}
        assert sorted(p["group"] for p in pushed) == sorted(by_id)
        assert all(p["rewards"] == by_id[p["group"]].rewards.tolist() for p in pushed)
        order = {g.group_id: i for i, g in enumerate(want)}
        chunk_of = {r.group_id: j for j, chunk in enumerate(split_even(rolls, 2)) for r in chunk}
        for j in (0, 1):
            mine = [order[p["group"]] for p in pushed if chunk_of[p["group"]] == j]
            assert mine == sorted(mine) and mine, j
    finally:
        pool.close()


@pytest.mark.timeout(300)
def test_pool_from_reward_config_and_push_without_sink(ray_local):
    from actors.grader import GraderPool

    with pytest.raises(ValueError, match="overlong_max"):
        GraderPool(RewardConfig(overlong_buffer=4))
    with pytest.raises(ValueError, match="overlong_buffer"):
        GraderPool(Config(reward=RewardConfig(overlong_buffer=100), rollout={"max_new_tokens": 64}))
    pool = GraderPool(RewardConfig(num_graders=1, ttrl=True, ttrl_vote=4, ttrl_train=2, dynamic_sampling=False),
                      adv_estimator="grpo")
    try:
        got, stats = pool.score([rollout("t", ["Answer: 5", "Answer: 6", "Answer: 5", "x"], "6", "arith")])
        assert got[0].rewards.tolist() == [1, 0] and len(got[0].rollout.responses) == 2
        assert stats["ttrl/label_accuracy"] == 0 and stats["reward/accuracy"] == 0.25
        with pytest.raises(ray.exceptions.RayTaskError, match="sink_factory"):
            pool.score(batch()[:1], push=True)
        assert pool.score([]) == ([], {})
    finally:
        pool.close()


@pytest.mark.timeout(300)
def test_the_evaluation_scores_on_the_runs_graders_with_the_plain_reward(ray_local):
    """eval_graders(cfg, pool): the run's grader actors score with the plain 1/0 reward for that call only,
    leave the training RNG (noise flips) where it was, and closing the view closes nothing."""
    from actors.grader import GraderPool
    from cluster.driver.evaluation import eval_graders, eval_reward

    cfg = Config(reward=RewardConfig(num_graders=2, ttrl=True, ttrl_vote=4, ttrl_train=4, correct=1.0,
                                     incorrect=-1.0, noise_flip_prob=0.5, dynamic_sampling=False), run={"seed": 4},
                 rollout={"group_size": 4})
    rollouts = batch()
    rng = np.random.default_rng(0)
    want_eval = score_groups(rollouts, eval_reward(cfg.reward), "grpo", rng, run_inline)[0]
    assert all(set(g.rewards.tolist()) <= {0.0, 1.0} for g in want_eval)
    pool, again = GraderPool(cfg), GraderPool(cfg)
    try:
        view = eval_graders(cfg, pool)
        assert view.actors == pool.actors
        got_eval, _ = view.score(rollouts)
        assert [g.group_id for g in got_eval] == [r.group_id for r in rollouts]
        for g, w in zip(got_eval, want_eval):
            np.testing.assert_array_equal(g.rewards, w.rewards)   # 1/0 by the verifier: no vote, no flips
        # training scores after the evaluation are those of a pool that never evaluated (same RNG draws)
        after, fresh = pool.score(rollouts)[0], again.score(rollouts)[0]
        assert [g.rewards.tolist() for g in after] == [g.rewards.tolist() for g in fresh]
        assert any(set(g.rewards.tolist()) & {-1.0} for g in after)   # the training reward is the pool's own
        view.close()
        assert pool.score(rollouts[:2])[0]   # the actors still serve
        with pytest.raises(ValueError, match="noise_flip_prob"):
            pool.scoring_with(cfg.reward)
    finally:
        pool.close()
        again.close()
