"""`forkrl export` on real checkpoints of a short `forkrl train` run (ZeRO-2 and ZeRO-3): DeepSpeed's own
consolidation, an HF directory transformers and vLLM load; its weights are the learner's at that step (a real
LearnerGroup loads the same checkpoint), and the log-probs vLLM samples with on it and transformers recomputes
on it match the learner's own log-prob pass at that step."""

import json
import math
import subprocess
import sys

import pytest
import ray
import torch

from tests.e2e.test_train import ROOT


@pytest.fixture(scope="module")
def ray_local():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    if started:
        ray.shutdown()


@pytest.mark.parametrize("stage", [2, 3])
def test_export_is_the_learners_policy(tmp_path, tiny_model_dir, stage, ray_local, short_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.config import load_config
    from cluster.driver.export import HF_DIR
    from learner.worker import LearnerGroup

    run_dir = short_run(stage)
    out = tmp_path / "hf-step1"
    p = subprocess.run([sys.executable, "-m", "cluster.cli", "export", str(run_dir), "--step", "1", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == str(out)
    for f in ("model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json"):
        assert (out / f).is_file(), f
    info = json.loads((out / "forkrl_export.json").read_text())
    assert (info["step"], info["version"], info["run"]) == (1, 1, run_dir.name)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template

    # the learner's own weights at step 1: a fresh LearnerGroup loads the same checkpoint
    cfg = load_config(run_dir / "config.yaml")
    group = LearnerGroup(cfg, tiny_model_dir)
    try:
        group.call("load", str(run_dir / "checkpoints" / "step-000001"))
        learner = group.call("full_weights")[0]
    except BaseException:
        group.kill()
        raise
    exported = load_file(out / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    state = model.state_dict()
    assert set(state) - set(learner) <= {"lm_head.weight"} and set(learner) <= set(state)   # tied to the embedding
    assert torch.equal(state["lm_head.weight"], learner.get("lm_head.weight", learner["model.embed_tokens.weight"]))
    for name, w in learner.items():
        assert torch.equal(state[name], w), name
        if name in exported:
            assert torch.equal(exported[name], w), name
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    assert any(not torch.equal(base[n], w) for n, w in learner.items())       # step 1 moved the policy
    # save_hf (stage 3's run) wrote the same directory beside each checkpoint kept
    for step in ((1, 2) if stage == 3 else ()):
        hf = run_dir / "checkpoints" / f"step-{step:06d}" / HF_DIR
        assert json.loads((hf / "forkrl_export.json").read_text())["step"] == step
    if stage == 3:
        assert torch.equal(load_file(run_dir / "checkpoints" / "step-000001" / HF_DIR / "model.safetensors")
                           ["model.embed_tokens.weight"], learner["model.embed_tokens.weight"])
    else:
        assert not (run_dir / "checkpoints" / "step-000001" / HF_DIR).exists()

    # vLLM loads the export and samples with log-probs that transformers recomputes (learner's forward)
    from actors.generator import generator_actor
    from cluster.data.tasks import load_problems, render_prompts

    train, _ = load_problems(cfg.data, cfg.run.seed)
    prompts = render_prompts(train[:4], tok, cfg.data, "train")
    gen = generator_actor("export-test", str(out), cfg.rollout, seed=0,
                          max_model_len=cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens, num_cpus=1)
    try:
        rollouts = ray.get(gen.generate.remote(prompts), timeout=600)
    finally:
        ray.kill(gen)
    worst = 0.0
    with torch.no_grad():
        for r, pr in zip(rollouts, prompts):
            for resp in r.responses[:2]:
                ids = torch.tensor([list(pr.token_ids) + list(resp.token_ids)])
                logits = model(ids).logits[0, len(pr.token_ids) - 1:-1] / cfg.rollout.temperature
                lp = torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(resp.token_ids)[:, None].long())
                worst = max(worst, float((lp[:, 0] - torch.tensor(resp.logprobs).double()).abs().max()))
    assert math.isfinite(worst) and worst < 1e-3, worst

    # the learner's own log-probs at step 1 (its pi_old pass) of the same sequences: transformers on the
    # export computes them (float32, another attention layout: last-bit differences only), vLLM samples them
    pairs = [(pr, resp) for r, pr in zip(rollouts, prompts) for resp in r.responses[:2] if len(resp.token_ids)]
    try:
        got = group.call("token_logprobs", scored(pairs))[0]
    finally:
        group.call("close")
        group.kill()
    worst_hf = worst_vllm = 0.0
    with torch.no_grad():
        for (pr, resp), lp_learner in zip(pairs, got):
            ids = torch.tensor([list(pr.token_ids) + list(resp.token_ids)])
            logits = model(ids).logits[0, len(pr.token_ids) - 1:-1] / cfg.rollout.temperature
            lp = torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(resp.token_ids)[:, None].long())[:, 0]
            lp_learner = torch.tensor(lp_learner, dtype=torch.float64)
            worst_hf = max(worst_hf, float((lp - lp_learner).abs().max()))
            worst_vllm = max(worst_vllm, float((torch.tensor(resp.logprobs).double() - lp_learner).abs().max()))
    assert worst_hf < 1e-5 and worst_vllm < 1e-3, (worst_hf, worst_vllm)


def scored(pairs):
    """[(prompt, response)] as ScoredGroups of one response each (what the learner's passes read)."""
    import numpy as np

    from cluster.types import Rollout, ScoredGroup

    groups = [ScoredGroup(Rollout(group_id=f"check-{i}", prompt_id=pr.prompt_id, prompt_ids=np.asarray(pr.token_ids),
                                  prompt=pr.text, responses=[resp], version=1, generator_id="check", gold=pr.gold),
                          np.zeros(1, np.float32), np.zeros(1, np.float32), [None]) for i, (pr, resp) in enumerate(pairs)]
    return groups
