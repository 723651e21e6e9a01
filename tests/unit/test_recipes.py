"""The papers' GPU recipes in configs/: `forkrl check` accepts each, and each resolves to the papers' numbers.

The expected values below are copied from docs/algorithms.md (sections 1.4, 2.5-2.7, 4.1), not
from the recipe files, so editing a recipe away from its paper fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cluster.cli import app

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# docs/algorithms.md 1.4: the DAPO recipe of "Beyond the 80/20 Rule", identical for 8B/14B/32B.
DAPO_8020 = {
    "rollout.backend": "vllm", "rollout.prompts_per_step": 512, "rollout.group_size": 16,
    "rollout.temperature": 1.0, "rollout.top_p": 1.0, "rollout.max_new_tokens": 20480,
    "rollout.eval_temperature": 1.0, "rollout.eval_top_p": 0.7, "rollout.eval_samples": 32,
    "data.task": "file", "data.layout": "dapo", "data.answer_format": "answer_line", "data.max_prompt_tokens": 2048,
    "reward.correct": 1.0, "reward.incorrect": -1.0, "reward.overlong_buffer": 4096, "reward.overlong_max": 20480,
    "reward.overlong_factor": 1.0, "reward.dynamic_sampling": True, "reward.max_gen_batches": 10,
    "algorithm.adv_estimator": "grpo", "algorithm.loss_agg": "token-mean", "algorithm.policy_loss": "ppo",
    "algorithm.clip_low": 0.2, "algorithm.clip_high": 0.28, "algorithm.dual_clip_c": 10.0,
    "algorithm.kl_coef": 0.0, "algorithm.entropy_coef": 0.0, "algorithm.adaptive_entropy": False,
    "learner.lr": 1e-6, "learner.weight_decay": 0.1, "learner.schedule": "constant", "learner.grad_clip": 1.0,
    "learner.mini_batches": 16, "learner.epochs": 1,
    # 10 warm-up steps of verl's per-RL-step scheduler = 10 x 16 optimizer updates.
    "learner.warmup_steps": 160,
    "run.max_staleness": 0,
}
# docs/algorithms.md 2.7: shared by the Clip-Cov and KL-Cov scripts of "The Entropy Mechanism".
ENTROPY_MECH = {
    "rollout.backend": "vllm", "rollout.prompts_per_step": 256, "rollout.group_size": 8,
    "rollout.temperature": 1.0, "rollout.max_new_tokens": 8192, "rollout.eval_temperature": 0.6,
    "data.task": "file", "data.answer_format": "boxed", "data.max_prompt_tokens": 2048,
    "reward.correct": 1.0, "reward.incorrect": 0.0, "reward.overlong_buffer": 0, "reward.dynamic_sampling": True,
    "algorithm.adv_estimator": "grpo", "algorithm.loss_agg": "token-mean", "algorithm.kl_coef": 0.0,
    "algorithm.entropy_coef": 0.0, "algorithm.top_entropy_ratio": 1.0,
    "learner.weight_decay": 0.0, "learner.schedule": "constant", "learner.grad_clip": 1.0,
    "learner.mini_batches": 8, "learner.epochs": 1, "run.max_staleness": 0,
}
CLIP_COV = {"algorithm.policy_loss": "clip_cov", "algorithm.clip_cov_ratio": 2e-4, "algorithm.clip_cov_lb": 1.0,
            "algorithm.clip_cov_ub": 5.0, "algorithm.clip_low": 1.0, "algorithm.clip_high": 1.0}
KL_COV = {"algorithm.policy_loss": "kl_cov", "algorithm.kl_cov_coef": 1.0}

EXPECTED = {
    **{f"qwen3-{s}-dapo.yaml": {**DAPO_8020, "algorithm.top_entropy_ratio": 1.0} for s in ("8b", "14b", "32b")},
    **{f"qwen3-{s}-dapo-top20.yaml": {**DAPO_8020, "algorithm.top_entropy_ratio": 0.2,
                                      "algorithm.entropy_norm": "all_tokens"} for s in ("8b", "14b", "32b")},
    "qwen2.5-7b-clip-cov.yaml": {**ENTROPY_MECH, **CLIP_COV, "learner.lr": 5e-7},
    "qwen2.5-32b-clip-cov.yaml": {**ENTROPY_MECH, **CLIP_COV, "learner.lr": 1e-6},
    "qwen2.5-7b-kl-cov.yaml": {**ENTROPY_MECH, **KL_COV, "algorithm.kl_cov_ratio": 2e-3, "learner.lr": 5e-7},
    "qwen2.5-32b-kl-cov.yaml": {**ENTROPY_MECH, **KL_COV, "algorithm.kl_cov_ratio": 2e-4, "learner.lr": 1e-6},
    # docs/algorithms.md 4.1: examples/ttrl/aime.sh.
    "ttrl-qwen2.5-math-7b-aime24.yaml": {
        "reward.ttrl": True, "reward.ttrl_vote": 64, "reward.ttrl_train": 32, "rollout.group_size": 64,
        "rollout.prompts_per_step": 8, "rollout.temperature": 1.0, "rollout.max_new_tokens": 3072,
        "rollout.eval_temperature": 0.6, "rollout.eval_top_p": 0.95, "rollout.eval_samples": 16,
        "rollout.backend": "vllm", "algorithm.adv_estimator": "grpo", "algorithm.kl_coef": 0.001,
        "algorithm.kl_estimator": "k3", "algorithm.clip_low": 0.2, "algorithm.clip_high": 0.2,
        "learner.lr": 5e-7, "learner.schedule": "cosine", "learner.mini_batches": 8,
        "learner.warmup_steps": 72, "run.steps": 300, "reward.dynamic_sampling": False,
        "data.answer_format": "boxed", "data.task": "file", "run.max_staleness": 0,
    },
}
SIZES = {"8b": "Qwen3-8B-Base", "14b": "Qwen3-14B-Base", "32b": "Qwen3-32B-Base",
         "2.5-7b": "Qwen2.5-7B", "2.5-32b": "Qwen2.5-32B"}


def check(name: str) -> dict:
    """`forkrl check configs/<name>` through the real CLI; returns the resolved config it prints."""
    result = CliRunner().invoke(app, ["check", "--remote", str(CONFIGS / name)])   # paths on the cluster
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.stdout)


def get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def test_every_recipe_is_listed():
    recipes = {p.name for p in CONFIGS.glob("*.yaml") if re.match(r"(qwen|ttrl)", p.name)}
    assert recipes == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_resolves_to_the_paper(name):
    cfg = check(name)
    wrong = {k: (get(cfg, k), v) for k, v in EXPECTED[name].items() if get(cfg, k) != v}
    assert wrong == {}, f"(resolved, paper) differ: {wrong}"
    # A GPU run: vLLM generators on GPUs, one GPU per tensor-parallel rank, learners on GPUs.
    assert cfg["rollout"]["enforce_eager"] is False and cfg["model"]["dtype"] == "bfloat16"
    assert cfg["cluster"]["generator_gpus"] == cfg["rollout"]["tensor_parallel_size"]
    assert cfg["cluster"]["learner_gpus"] == 1
    # model.path is a local placeholder the user points at their copy (no hub ids).
    assert cfg["model"]["path"].startswith("/models/")
    for key, model in SIZES.items():
        if name.startswith(("qwen3-" + key + "-", "qwen" + key + "-")):
            assert cfg["model"]["path"] == f"/models/{model}"
    assert cfg["run"]["name"] == name.removesuffix(".yaml")


@pytest.mark.parametrize("size", ["8b", "14b", "32b"])
def test_8020_pairs_differ_only_in_top_entropy_ratio(size):
    """docs/algorithms.md 1.4: the full-token and top-20% scripts differ ONLY in entropy_top_ratio."""
    full, top = check(f"qwen3-{size}-dapo.yaml"), check(f"qwen3-{size}-dapo-top20.yaml")
    diff = {(s, k) for s in full for k in full[s] if full[s][k] != top[s][k]}
    assert diff == {("run", "name"), ("algorithm", "top_entropy_ratio")}


def test_mini_batch_sizes_match_the_papers():
    """80/20 and Entropy-Mechanism: mini-batch 32 prompts; TTRL: 1 prompt (x N_train responses)."""
    for name in EXPECTED:
        cfg = check(name)
        per_update = cfg["rollout"]["prompts_per_step"] // cfg["learner"]["mini_batches"]
        assert per_update == (1 if name.startswith("ttrl") else 32), name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_setting_cites_its_source(name):
    """Each value line carries a comment: the paper section it reproduces, or 'deployment'/'placeholder'."""
    uncited = [line for line in (CONFIGS / name).read_text().splitlines()
               if re.match(r"^\s+\w+:\s*\S", line) and " # " not in line]
    assert uncited == []


def test_check_rejects_a_broken_recipe(tmp_path):
    """The CLI path above can fail: a misspelt field in a recipe is an error naming it."""
    text = (CONFIGS / "qwen3-8b-dapo-top20.yaml").read_text().replace("top_entropy_ratio:", "top_entropy_rato:")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    result = CliRunner().invoke(app, ["check", str(bad)])
    assert result.exit_code != 0
    assert "algorithm.top_entropy_rato: unknown key (did you mean algorithm.top_entropy_ratio?)" in result.output
