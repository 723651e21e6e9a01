"""The per-GPU memory arithmetic of `forkrl check` (cluster/driver/memory.py) and the GPU placement fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster.cli import app
from cluster.config import ConfigError, load_config
from cluster.driver.memory import KNOWN, Shape, budgets, check_gpu_memory, model_shape

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GPU_RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml") if load_config(p).cluster.generator_gpus)


def test_there_are_gpu_recipes():
    assert len(GPU_RECIPES) == 11


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_every_gpu_recipe_fits_its_gpus(name):
    cfg = load_config(CONFIGS / name)
    found, notes = budgets(cfg)
    assert [b.who.split(" (")[0] for b in found] == ["generator worker", "learner rank"] and notes == []
    for b in found:
        assert 0 < b.total <= b.limit, b.line()
    assert check_gpu_memory(cfg) == []


def test_published_parameter_counts():
    """The table's shapes give the models' published sizes (model cards: 8.2B, 14.8B, 32.8B, 7.6B, 32.5B)."""
    want = {"qwen3-8b": 8.19e9, "qwen3-14b": 14.77e9, "qwen3-32b": 32.76e9, "qwen2.5-7b": 7.62e9,
            "qwen2.5-32b": 32.76e9}
    for k, n in want.items():
        assert abs(KNOWN[k].num_params - n) / n < 0.01, k


def test_an_oversized_config_fails_with_one_line_naming_the_fields():
    """Qwen3-32B on one GPU per generator: 61 GiB of weights + 40 GiB of KV cache cannot fit 72 GiB."""
    args = ["check", "--remote", str(CONFIGS / "qwen3-32b-dapo.yaml"), "rollout.tensor_parallel_size=1",
            "cluster.generator_gpus=1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, result.stderr
    for field in ("rollout.tensor_parallel_size=1", "rollout.gpu_memory_utilization x cluster.gpu_memory_gib",
                  "rollout.kv_cache_gib", "does not fit in GPU memory", "kv cache 40.0"):
        assert field in lines[0], lines[0]


def test_smaller_gpus_fail_the_learner_too():
    cfg = load_config(CONFIGS / "qwen3-32b-dapo.yaml", ["cluster.gpu_memory_gib=40", "learner.num_ranks=4"])
    with pytest.raises(ConfigError, match=r"learner rank: weights\+grads\+adam \(ZeRO-3 over learner.num_ranks=4\)"):
        check_gpu_memory(cfg)


def test_zero_stage_counts():
    """ZeRO paper: stage 0 replicates 16 bytes/param; stage 3 divides all of it by the ranks."""
    base = ["learner.num_ranks=8", "model.num_params=1e9", "rollout.kv_cache_gib=1", "model.path=/nowhere/m"]
    states = {}
    for z in (0, 1, 2, 3):
        cfg = load_config(CONFIGS / "qwen3-8b-dapo.yaml", base + [f"learner.zero_stage={z}"])
        (_, learner), _ = budgets(cfg)
        states[z] = next(v for k, v in learner.terms.items() if k.startswith("weights+grads+adam"))
    gib = 1e9 / (1 << 30)
    assert states == pytest.approx({0: 16 * gib, 1: (4 + 12 / 8) * gib, 2: (2 + 14 / 8) * gib, 3: 2 * gib})


def test_shape_from_a_local_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 4096, "num_hidden_layers": 36, "intermediate_size": 12288, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False}))
    cfg = load_config(CONFIGS / "qwen3-8b-dapo.yaml", [f"model.path={tmp_path}"])
    assert model_shape(cfg) == KNOWN["qwen3-8b"]


def test_an_unknown_model_needs_num_params():
    cfg = load_config(CONFIGS / "qwen3-8b-dapo.yaml", ["model.path=/models/Mystery-9B"])
    with pytest.raises(ConfigError, match="model.num_params"):
        check_gpu_memory(cfg)
    cfg = load_config(CONFIGS / "qwen3-8b-dapo.yaml", ["model.path=/models/Mystery-9B", "model.num_params=9e9"])
    assert "activations" in " ".join(check_gpu_memory(cfg))


def test_cpu_configs_have_no_gpu_arithmetic():
    assert budgets(load_config(CONFIGS / "demo.yaml")) == ([], [])


def test_generator_gpus_must_match_tensor_parallelism():
    with pytest.raises(ConfigError, match="cluster.generator_gpus .2. must equal rollout.tensor_parallel_size .4."):
        load_config(CONFIGS / "qwen3-32b-dapo.yaml", ["cluster.generator_gpus=2"])
    with pytest.raises(ConfigError, match="needs whole GPUs"):
        load_config(CONFIGS / "qwen3-32b-dapo.yaml", ["cluster.generator_gpus=0.5"])


COLOCATED = ["cluster.generator_gpus=0.5", "cluster.learner_gpus=0.5", "rollout.num_generators=1",
             "learner.num_ranks=8", "model.path=/models/Qwen3-8B-Base"]


def test_colocated_nccl_is_refused_naming_the_fields():
    with pytest.raises(ConfigError, match=r"sync.backend 'nccl' with cluster.generator_gpus=0.5 / "
                                          r"cluster.learner_gpus=0.5.*NCCL refuses"):
        load_config(CONFIGS / "qwen3-8b-dapo.yaml", COLOCATED + ["sync.backend=nccl"])


def test_colocated_auto_syncs_over_gloo_and_counts_both_on_one_gpu():
    cfg = load_config(CONFIGS / "qwen3-8b-dapo.yaml", COLOCATED)
    assert cfg.sync.backend == "gloo"
    with pytest.raises(ConfigError, match=r"colocated learner rank \+ generator.*vLLM share 72.0"):
        check_gpu_memory(cfg)   # vLLM's default 0.9 of the GPU leaves the learner too little
    cfg = load_config(CONFIGS / "qwen3-8b-dapo.yaml",
                      COLOCATED + ["rollout.gpu_memory_utilization=0.5", "rollout.kv_cache_gib=16"])
    assert check_gpu_memory(cfg) == []
    (gen, both), _ = budgets(cfg)
    assert both.terms["vLLM share"] == 40.0 and gen.limit == 40.0


def test_shape_counts_tied_embeddings_once():
    s = Shape(64, 2, 128, 2, 2, 32, 1000, True)
    assert Shape(64, 2, 128, 2, 2, 32, 1000, False).num_params - s.num_params == 64 * 1000
