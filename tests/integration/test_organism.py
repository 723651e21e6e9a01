"""The model organism (`forkrl models build-organism`, docs/organism.md): built with a fixed seed (cached under
$FORKRL_CACHE, shared with every user of builtin:organism), it has the 80/20 paper's token-entropy profile on
its own chains of thought at T = 1, its top-20% entropy tokens are the decision points, its accuracy is partial,
and the grader pays every correct path."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DECISIONS = ("connective", "operand", "result")   # organism_kinds' decision points


@pytest.fixture(scope="module")
def profile(organism_model_dir):
    """The profile measured again on the saved directory, as transformers loads it back (fixed seed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.config import DataConfig
    from cluster.data.profile import entropy_profile, organism_kinds, sample_entropies
    from cluster.data.tasks import synthetic_problems

    tok = AutoTokenizer.from_pretrained(organism_model_dir)
    model = AutoModelForCausalLM.from_pretrained(organism_model_dir, dtype=torch.float32).eval()
    cfg = DataConfig(task="organism")
    held = synthetic_problems("organism", 128, "eval", 1, cfg.difficulty)   # not the build's own seed
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return entropy_profile(sample_entropies(model, tok, held, cfg, samples=2, seed=1), tok, kinds=organism_kinds)
    finally:
        torch.set_num_threads(threads)


def test_entropy_profile_targets(profile):
    # the 80/20 paper on Qwen3-8B: 50.6% below 0.01 nats, 80th percentile 0.672 nats
    assert 0.35 <= profile["low_share"] <= 0.65, profile
    assert 0.3 <= profile["p80"] <= 1.2, profile
    assert 0.2 <= profile["accuracy"] <= 0.5, profile          # partial: RL has signal both ways


def test_top_entropy_tokens_are_the_decision_points(profile):
    top, allk = profile["kinds_top"], profile["kinds_all"]
    assert sum(top.get(k, 0) for k in DECISIONS) >= 0.8, profile
    assert sum(allk.get(k, 0) for k in DECISIONS) <= 0.6, profile     # they are the minority of all tokens
    # the fixed text is near-deterministic
    assert profile["low_by_kind"]["format"] >= 0.8 and profile["low_by_kind"]["answer"] >= 0.8, profile
    assert profile["examples"] and all("[" in e["text"] for e in profile["examples"])


def test_manifest_and_cache(organism_model_dir):
    info = json.loads((Path(organism_model_dir) / "forkrl_build.json").read_text())
    assert info["params"] < 3e6 and info["spec"]["arch"]["head_dim"] >= 32, info
    assert 0.35 <= info["entropy_profile_t1"]["low_share"] <= 0.65, info["entropy_profile_t1"]
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "models", "build-organism", organism_model_dir],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith(str(Path(organism_model_dir).resolve())), r.stderr
    assert json.loads((Path(organism_model_dir) / "forkrl_build.json").read_text()) == info   # a cache hit


def test_tokenizer_round_trip(organism_model_dir):
    from transformers import AutoTokenizer

    from cluster.data.models import tiny_tokenizer
    from cluster.data.tasks import ORGANISM_WORDS

    text = "5+7=12, then 12+9=21, wait, 12+9=21, so 1+21=22. Answer: 22"
    back, built = AutoTokenizer.from_pretrained(organism_model_dir), tiny_tokenizer(ORGANISM_WORDS)
    ids = built(text, add_special_tokens=False)["input_ids"]
    assert back(text, add_special_tokens=False)["input_ids"] == ids and back.decode(ids) == text
    assert {back.decode([i]) for i in ids} >= {" then", " wait", " so", " Answer"}   # one token each


def test_grader_pays_every_correct_path():
    from cluster.data.tasks import ORGANISM, organism_trace, synthetic_problems
    from reward.verifiers import resolve_verifier, score_response

    verifier = resolve_verifier("auto", "organism")
    assert verifier == "numeric"
    p = synthetic_problems("organism", 1, "eval", 0)[0]
    rng = random.Random(0)
    traces = {organism_trace(p.meta["numbers"], rng) for _ in range(400)}
    right = {t for t in traces if t.rsplit("Answer: ", 1)[1] == p.gold}
    paths = {t.split(".")[0].replace(", wait", "") for t in right}
    assert len(paths) >= 10 and len(right) < len(traces)        # many correct paths, and slips
    for t in traces:
        assert score_response(verifier, t, p.gold, p.meta)["correct"] == (t in right)
    assert sum(w for _, w in ORGANISM["strategies"]) > 0


def test_the_shipped_build_is_the_current_spec_and_seeds_a_cache(tmp_path):
    """cluster/data/builtin/organism is what the default build gives: a change to the organism's spec (traces,
    words, architecture, SFT) must come with `forkrl models build-organism cluster/data/builtin/organism
    --force`; a new cache is a copy of it, not 12 minutes of SFT."""
    from safetensors.torch import load_file

    from cluster.data.models import SHIPPED_ORGANISM, build_organism, organism_spec

    shipped = json.loads((SHIPPED_ORGANISM / "forkrl_build.json").read_text())
    assert shipped["spec"] == json.loads(json.dumps(organism_spec())), "the shipped organism is stale: rebuild it"
    said = []
    out = build_organism(tmp_path / "organism", log=said.append)
    assert "shipped build" in said[0]
    a, b = load_file(out / "model.safetensors"), load_file(SHIPPED_ORGANISM / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
