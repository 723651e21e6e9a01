"""Claims in experiment specs: validated with the field named, judged by the compare analysis on synthetic runs
whose per-seed numbers are known (no training), written to NAME.claims.json and led into results.md."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from cluster.tools.experiments import write_index
from cluster.tools.experiments.analyses import analyse_compare, check_claims
from cluster.tools.experiments.runs import RunResult
from cluster.tools.experiments.spec import SPEC_DIR, ExperimentError, load_spec
from cluster.tools.experiments.stats import compare

CLAIM = {"claim": "b beats a", "paper": "+7.71 | AIME", "metric": "final eval acc", "arm": "b", "base": "a",
         "expect": "higher"}


def write_spec(d: Path, claims, arms=("a", "b", "c")) -> Path:
    spec = {"kind": "train", "arms": [{"name": a} for a in arms], "seeds": [0, 1, 2],
            "budget": {"run.steps": 4}, "smoke": {"arms": ["a", "b"]}, "claims": claims}
    (d / "x.yaml").write_text(yaml.safe_dump(spec))
    return d


@pytest.mark.parametrize("change, match", [
    ({"arm": "z"}, r"claims\[0\]\.arm: 'z' is not an arm"),
    ({"base": "z"}, r"claims\[0\]\.base: 'z' is not an arm"),
    ({"expect": "bigger"}, r"claims\[0\]\.expect must be one of \('higher', 'lower', 'equal'\), got 'bigger'"),
    ({"base": "b"}, r"claims\[0\]: arm and base are both 'b'"),
    ({"colour": "red"}, r"claims\[0\]: unknown keys \['colour'\]"),
])
def test_a_bad_claim_names_its_field(tmp_path, change, match):
    with pytest.raises(ExperimentError, match=match):
        load_spec("x", spec_dir=write_spec(tmp_path, [{**CLAIM, **change}]))


def test_claim_structure_errors_and_smoke_filtering(tmp_path):
    with pytest.raises(ExperimentError, match=r"claims\[0\]: missing keys \['expect'\]"):
        load_spec("x", spec_dir=write_spec(tmp_path, [{k: v for k, v in CLAIM.items() if k != "expect"}]))
    with pytest.raises(ExperimentError, match="claims must be a list"):
        load_spec("x", spec_dir=write_spec(tmp_path, CLAIM))
    other = {**CLAIM, "arm": "c"}
    spec = load_spec("x", spec_dir=write_spec(tmp_path, [CLAIM, other]))
    assert [c.arm for c in spec.claims] == ["b", "c"]
    # the smoke run has arms a and b only: the claim about c is not evaluated there
    assert [c.arm for c in load_spec("x", smoke=True, spec_dir=tmp_path).claims] == ["b"]
    with pytest.raises(ExperimentError, match=r"claims\[0\]\.metric 'final acc' is not a column of the compare"):
        check_claims(load_spec("x", spec_dir=write_spec(tmp_path, [{**CLAIM, "metric": "final acc"}])))


def test_the_shipped_specs_claims_name_real_columns():
    claims = {}
    for path in sorted(SPEC_DIR.glob("*.yaml")):
        spec = load_spec(path.stem)
        check_claims(spec)
        claims[path.stem] = [(c.arm, c.base, c.metric, c.expect) for c in spec.claims]
    assert {("top20", "full", "final eval acc", "higher"), ("bottom80", "full", "final eval acc", "lower"),
            ("random20", "full", "final eval acc", "equal")} <= set(claims["forking-tokens"])
    assert {(arm, "grpo", metric, "higher") for arm in ("clip-cov", "kl-cov")
            for metric in ("final entropy (last 5)", "final eval acc")} <= set(claims["entropy-mechanism"])
    assert ("ttrl", "gold", "final eval acc", "equal") in claims["label-free"]


# ------------------------------------------------------------------------------------------- judged

FINAL = {"a": [0.40, 0.30, 0.50], "b": [0.52, 0.41, 0.61], "c": [0.401, 0.302, 0.499]}


def run(arm: str, seed: int) -> RunResult:
    acc = FINAL[arm][seed]
    rows = [{"step": float(s), "time/step_s": 1.0, "entropy/policy": 0.5 - 0.01 * s, "reward/mean": 0.3,
             **({"eval/accuracy_avg": acc if s else 0.3} if s % 2 == 0 else {})} for s in range(5)]
    return RunResult(arm, seed, None, rows, 1.0)


def test_compare_analysis_judges_the_claims_and_the_index_leads_with_them(tmp_path):
    claims = [CLAIM, {**CLAIM, "claim": "c equals a", "arm": "c", "expect": "equal"},
              {**CLAIM, "claim": "a beats b", "arm": "a", "base": "b"}]
    spec = load_spec("x", spec_dir=write_spec(tmp_path, claims))
    out = tmp_path / "out"
    out.mkdir()
    body, summary = analyse_compare(spec, [run(a, s) for a in FINAL for s in range(3)], out)
    judged = json.loads((out / "x.claims.json").read_text())
    assert judged["experiment"] == "x" and judged["document"] == "x.md"
    got = {c["claim"]: c for c in judged["claims"]}
    ref = compare(dict(enumerate(FINAL["b"])), dict(enumerate(FINAL["a"])))
    assert got["b beats a"]["test"] == "paired t" and got["b beats a"]["p"] == ref.p < 0.05
    assert got["b beats a"]["diff"] == pytest.approx(0.34 / 3) and got["b beats a"]["verdict"] == "agrees"
    assert got["a beats b"]["verdict"] == "does not agree"
    assert got["c equals a"]["verdict"] == "agrees"               # |diff| <= 0.002, CI well within +-0.05
    assert got["b beats a"]["per_seed"] == {"b": {"0": 0.52, "1": 0.41, "2": 0.61}, "a": {"0": 0.4, "1": 0.3,
                                                                                           "2": 0.5}}
    assert "## Claims" in body and "+7.71 \\| AIME" in body       # a | in the text does not break the table
    row = next(line for line in body.splitlines() if line.startswith("| b beats a"))
    assert f"final eval acc, b vs a: +0.113 [{ref.ci[0]:+.3f}, {ref.ci[1]:+.3f}]" in row and "| agrees |" in row
    # the metric table: mean [95% CI], the reading from the t-test
    assert "| a | 3 | 0.300 [" in body and "0.400 [0.152, 0.648]" in body
    assert "two standard errors" not in body and "paired t p = " in body
    assert "a 0.400 [0.152, 0.648]" in summary
    (out / "x.md").write_text(f"# x\n\n**Summary:** {summary}\n")
    index = write_index(out).read_text()
    table_at, experiments_at = index.index("| claim | paper | forkrl | verdict | experiment |"), index.index("- [x]")
    assert table_at < experiments_at
    assert "| b beats a | +7.71 \\| AIME | final eval acc, b vs a: +0.113 [" in index
    assert "| does not agree | [x](x.md#claims) |" in index


def test_a_spec_without_claims_writes_an_empty_sidecar_and_no_section(tmp_path):
    spec = load_spec("x", spec_dir=write_spec(tmp_path, []))
    body, _ = analyse_compare(spec, [run(a, s) for a in FINAL for s in range(3)], tmp_path)
    assert "## Claims" not in body and json.loads((tmp_path / "x.claims.json").read_text())["claims"] == []
    assert "| claim |" not in write_index(tmp_path).read_text()


def test_one_seed_per_arm_is_inconclusive_not_an_error(tmp_path):
    spec = load_spec("x", smoke=True, spec_dir=write_spec(tmp_path, [CLAIM]))
    spec.seeds = [0]
    body, _ = analyse_compare(spec, [run(a, 0) for a in ("a", "b")], tmp_path)
    c = json.loads((tmp_path / "x.claims.json").read_text())["claims"][0]
    assert c["p"] is None and c["ci"] == [None, None] and c["verdict"].startswith("inconclusive")
    assert math.isclose(c["diff"], 0.12) and "0.400 (n=1)" in body


def write_collapse_spec(d: Path, claims) -> Path:
    spec = {"kind": "train", "analysis": "collapse", "arms": [{"name": "grpo"}], "seeds": [0, 1, 2],
            "budget": {"run.steps": 40, "run.eval_every": 2}, "smoke": {"seeds": [0]}, "claims": claims}
    (d / "c.yaml").write_text(yaml.safe_dump(spec))
    return d


LAW = {"claim": "law beats a constant", "paper": "RMSE 0.9%", "metric": "prediction RMSE", "arm": "law",
       "base": "constant", "expect": "lower"}


def test_collapse_claims_compare_predictors_not_arms(tmp_path):
    spec = load_spec("c", spec_dir=write_collapse_spec(tmp_path, [LAW]))
    check_claims(spec)
    assert load_spec("c", smoke=True, spec_dir=tmp_path).claims == spec.claims   # no arm to filter on
    with pytest.raises(ExperimentError, match=r"claims\[0\]\.arm: 'grpo' is not a predictor of this experiment "
                                              r"\(allowed: \['law', 'constant'\]\)"):
        load_spec("c", spec_dir=write_collapse_spec(tmp_path, [{**LAW, "arm": "grpo"}]))
    with pytest.raises(ExperimentError, match=r"claims\[0\]\.metric 'final eval acc' is not a column of the "
                                              r"collapse analysis"):
        check_claims(load_spec("c", spec_dir=write_collapse_spec(tmp_path, [{**LAW, "metric": "final eval acc"}])))


def test_collapse_claims_are_judged_on_the_per_seed_errors(tmp_path):
    """Runs whose accuracy follows R = -a e^H + b with noise: the law's held-out RMSE (recomputed here in
    float64 from its own OLS fit on the early points) beats the constant's on every seed."""
    from cluster.tools.experiments.analyses import analyse_collapse

    spec = load_spec("c", spec_dir=write_collapse_spec(tmp_path, [LAW, {**LAW, "metric": "final error"}]))
    results, expect = [], {}
    for seed in spec.seeds:
        rng = np.random.default_rng(seed)
        rows = [{"step": 0, "eval/accuracy_avg": 0.3}]
        for step in range(1, 41):
            h = 0.32 * math.exp(-step / 25)
            r = {"step": step, "entropy/policy": h}
            if step % 2 == 0:
                r["eval/accuracy_avg"] = -2.5 * math.exp(h) + 3.8 + 0.01 * rng.standard_normal()
            rows.append(r)
        results.append(RunResult("grpo", seed, None, rows, 1.0))
        pts = [(r["entropy/policy"], r["eval/accuracy_avg"], r["step"]) for r in rows[1:] if "eval/accuracy_avg" in r]
        fit = [p for p in pts if p[2] <= 6]
        x, y = np.exp([p[0] for p in fit]), np.array([p[1] for p in fit])
        slope, icpt = np.polyfit(x, y, 1)
        rest = [p for p in pts if p[2] > 6]
        expect[seed] = math.sqrt(np.mean([(slope * math.exp(h) + icpt - r) ** 2 for h, r, _ in rest]))
    out = tmp_path / "out"
    out.mkdir()
    analyse_collapse(spec, results, out)
    judged = json.loads((out / "c.claims.json").read_text())["claims"]
    law = {int(k): v for k, v in judged[0]["per_seed"]["law"].items()}
    # both sides are float64; only the OLS route differs (Welford co-moments against polyfit)
    assert law == pytest.approx(expect, rel=1e-9, abs=1e-12)
    assert [c["verdict"] for c in judged] == ["agrees", "agrees"]
