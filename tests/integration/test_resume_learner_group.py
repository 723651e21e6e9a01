"""LearnerGroup on a real local Ray, as the driver uses it: 2 ZeRO-3 bf16 ranks read their groups from a
real Valkey queue (`train_step`), checkpoint, train one more step; a NEW group (fresh processes) loaded from
the checkpoint trains that step again and gets the same statistics and weights, bit for bit. The config
draws random numbers (the `random` forking-mask variant, shared by the ranks) and carries controller
state (Skywork adaptive entropy), so a checkpoint that forgot either would not replay."""

from __future__ import annotations

import uuid

import pytest
import ray
import torch

from cluster.config import Config
from tests.integration.test_learner_zero import make_groups, shm_segments

DELTA = 1e-3


def resume_config() -> Config:
    cfg = Config()
    cfg.run.steps = 3
    cfg.model.dtype = "bfloat16"
    cfg.rollout.prompts_per_step = 4
    lc, ac = cfg.learner, cfg.algorithm
    lc.num_ranks, lc.zero_stage, lc.threads, lc.stage3_param_persistence_threshold = 2, 3, 1, 0
    lc.lr, lc.warmup_steps, lc.schedule, lc.mini_batches = 1e-2, 1, "cosine", 2
    lc.micro_batch_tokens, lc.logits_chunk = 40, 16
    ac.top_entropy_ratio, ac.mask_variant, ac.entropy_scope = 0.5, "random", "global"
    ac.adaptive_entropy, ac.entropy_target, ac.entropy_delta, ac.entropy_coef_max = True, 100.0, DELTA, 1.0
    return cfg


@pytest.fixture(scope="module")
def ray_local():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    yield
    if started:
        ray.shutdown()


@pytest.fixture
def queue(valkey_server):
    from cluster.transport.queue import QueueAddress, delete_run, setup_run

    addr = QueueAddress(valkey_server.url, f"t-{uuid.uuid4().hex[:12]}", valkey_server.password)
    setup_run(addr)
    yield addr
    delete_run(addr)


def _stop(group) -> None:
    port = group.master[1]
    try:
        group.call("close")
    finally:
        group.kill()
    assert shm_segments(port) == []


def _comparable(stats: dict) -> dict:
    """Everything but timings; NaN made comparable."""
    return {k: "nan" if v != v else v for k, v in stats.items() if not k.startswith("time/")}


def test_learner_group_trains_from_the_queue_and_resumes(ray_local, queue, untrained_tiny_model_dir, tmp_path):
    from cluster.transport.queue import Producer
    from learner.worker import LearnerGroup

    cfg = resume_config()
    with Producer(queue) as prod:
        for step in range(2):
            for g in make_groups(seed=10 + step, n_groups=(4,), prefix=f"s{step}-")[0]:
                g.rollout.version = step
                assert prod.put(g)
    fixed = make_groups(seed=3, n_groups=(2, 2), prefix="f")
    fixed[1][1].rollout.responses[0].token_ids[0] = 10 ** 6   # outside the vocabulary: dropped, not a crash
    ckpt = tmp_path / "ckpt"

    group = LearnerGroup(cfg, untrained_tiny_model_dir)
    try:
        assert [i["rank"] for i in group.info] == [0, 1]
        group.call("attach_queue", queue.__dict__)
        steps = [group.call_each("train_step", [(2, step, 0), (2, step, 0)]) for step in range(2)]
        trained = group.call("queue_state")[0]["trained"]
        with Producer(queue) as prod:
            pending = prod.depth()["queue/pending"]
        group.call("save", str(ckpt))
        initial = group.call("full_weights")[0]
        first = group.call_each("train_on", [(g,) for g in fixed])
        first_weights = group.call("full_weights")
    finally:
        _stop(group)

    # every group was read once, trained, and acked after its step
    assert trained == sorted(f"s{s}-{k}" for s in range(2) for k in range(4)) and pending == 0.0
    for step, per_rank in enumerate(steps):
        assert [r["learner/groups"] for r in per_rank] == [2.0, 2.0]
        assert [r["queue/acked"] for r in per_rank] == [2.0 * (step + 1)] * 2
        assert [r["queue/staleness/0"] for r in per_rank] == [2.0, 2.0]
        assert per_rank[0]["learner/version"] == step + 1 and per_rank[0]["learner/step_updates"] == 2
    # the adaptive coefficient grew by Delta per step (entropy stays below the target)
    coefs = [s[0]["learner/entropy_coef"] for s in steps] + [first[0]["learner/entropy_coef"]]
    assert coefs == pytest.approx([0.0, DELTA, 2 * DELTA])
    assert torch.isfinite(torch.tensor(first[0]["loss"]))
    assert first[0]["learner/dropped_invalid"] == 1.0 and [r["learner/groups"] for r in first] == [2.0, 1.0]
    assert torch.equal(first_weights[0]["model.norm.weight"], first_weights[1]["model.norm.weight"])
    assert any(not torch.equal(initial[k], first_weights[0][k]) for k in initial)

    group = LearnerGroup(cfg, untrained_tiny_model_dir)
    try:
        loaded = group.call("load", str(ckpt))
        again = group.call_each("train_on", [(g,) for g in fixed])
        again_weights = group.call("full_weights")[0]
    finally:
        _stop(group)

    assert loaded == [{"version": 2, "updates": 4}] * 2
    assert _comparable(again[0]) == _comparable(first[0])
    assert [_comparable(r) for r in again[1:]] == [_comparable(r) for r in first[1:]]
    assert list(again_weights) == list(first_weights[0])
    assert all(torch.equal(again_weights[k], first_weights[0][k]) for k in again_weights)


def test_a_queue_error_on_rank_1_is_raised_and_the_retry_trains_every_group(ray_local, queue,
                                                                            untrained_tiny_model_dir):
    """Rank 0 gets its group, rank 1's read times out (a real QueueTimeout): the group raises rank 1's queue
    error (what the driver recovers from), not rank 0's PeerFailed; rank 0 keeps its group, and the retry
    trains it with rank 1's, each once."""
    from cluster.transport.queue import Consumer, Producer, QueueTimeout
    from learner.worker import LearnerGroup

    cfg = Config()
    cfg.learner.num_ranks, cfg.learner.threads = 2, 1
    cfg.queue.claim_idle_s = 3600.0   # rank 1 never reclaims rank 0's pending group
    first, second = make_groups(seed=5, n_groups=(2,), prefix="q")[0]
    group = LearnerGroup(cfg, untrained_tiny_model_dir)
    try:
        group.call("attach_queue", queue.__dict__)
        with Producer(queue) as prod:
            assert prod.put(first)
        with Consumer(queue, "rank0", cfg.queue) as c:   # the group is pending on rank 0's name: rank 0's
            assert [g.group_id for g in c.read(1, 0).groups] == ["q0"]   # first read takes it back at once
        with pytest.raises(QueueTimeout, match="rank1"):
            group.call_each("train_step", [(1, 0, 0, 120.0), (1, 0, 0, 3.0)])
        assert [s["version"] for s in group.call("status")] == [0, 0]   # no update
        with Producer(queue) as prod:
            assert prod.put(second)
        stats = group.call_each("train_step", [(1, 0, 0, 120.0), (1, 0, 0, 120.0)])
        status = group.call("status")
        trained = group.call("queue_state")[0]["trained"]
        with Producer(queue) as prod:
            depth = prod.depth()
    finally:
        _stop(group)
    assert [s["trained"] for s in status] == [["q0"], ["q1"]] and trained == ["q0", "q1"]
    assert [r["learner/groups"] for r in stats] == [1.0, 1.0] and [r["queue/acked"] for r in stats] == [1.0, 1.0]
    assert depth["queue/depth"] == 0 and depth["queue/pending"] == 0
