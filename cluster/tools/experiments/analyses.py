"""The analyses of train experiments (spec `analysis:`): compare (arms on accuracy, entropy, covariance),
collapse (the R = -a e^H + b law fitted early, judged on the later steps) and ttrl (label-free rewards).
Each returns (markdown body, one-line summary) and judges the spec's claims (`claims_section`): compare and
ttrl on their metric tables, collapse on the held-out errors of the law and of a constant predictor."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cluster.config import load_config
from cluster.observe.report import save_figure
from cluster.tools.experiments.runs import RunResult
from cluster.tools.experiments.spec import PREDICTORS, ExperimentError, Spec
from cluster.tools.experiments.stats import compare, mean_ci, verdict
from cluster.tools.experiments.tables import (best, by_arm, diff_reading, final, first, fmt, fmt_ci, fmt_p,
                                              last_mean, metric_table, overall_verdict, plot_section, train_rows)


ACC = "eval/accuracy_avg"
H = "entropy/policy"   # Cui et al. Eq. 5: per-response mean token entropy, then the mean over responses


def _step_mean(key: str):
    """The mean of `key` over a run's training steps (NaN where the run never logged it)."""
    return lambda r: float(np.mean([x[key] for x in train_rows(r) if key in x] or [math.nan]))


# the metric tables' columns: (header, fn(one run's metric rows) -> float); a claim's `metric` is a header
COMPARE_COLUMNS = [
    ("initial eval acc", lambda r: first(r, ACC)), ("final eval acc", lambda r: final(r, ACC)),
    ("best eval acc (step > 0)", lambda r: best(r, ACC)),
    ("final train reward (last 5)", lambda r: last_mean(r, "reward/mean")),
    ("initial entropy", lambda r: first(r, H)),
    ("final entropy (last 5)", lambda r: last_mean(r, H)),
    ("final cov mean (last 5)", lambda r: last_mean(r, "cov/mean")),
    ("selected share", lambda r: last_mean(r, "selected_frac")),
    ("clip-cov / kl-cov tokens per step", lambda r: last_mean(r, "clip_cov/clipped", 1000)
     + last_mean(r, "kl_cov/penalised", 1000)),
    # forking-aware sampling (docs/algorithms.md 9.3): the share of positions sampled at T_high, per step
    ("T_high share (mean)", _step_mean("generator/forking_high_share"))]


TTRL_COLUMNS = [
    ("initial eval acc", lambda r: first(r, ACC)), ("final eval acc", lambda r: final(r, ACC)),
    ("best eval acc (step > 0)", lambda r: best(r, ACC)),
    ("train gold acc (last 5)", lambda r: last_mean(r, "reward/accuracy")),
    ("TTRL label acc (mean)", _step_mean("ttrl/label_accuracy")),
    ("TTRL reward acc (mean)", _step_mean("ttrl/reward_accuracy")),
    ("final entropy (last 5)", lambda r: last_mean(r, H))]
# collapse: per seed, the held-out error of each predictor (spec.PREDICTORS: the law, the constant)
COLLAPSE_METRICS = {"prediction RMSE": ("pred_rmse", "const_rmse"), "final error": ("final_error", "const_final")}
METRICS = {"compare": [h for h, _ in COMPARE_COLUMNS], "ttrl": [h for h, _ in TTRL_COLUMNS],
           "collapse": list(COLLAPSE_METRICS)}
CI_NOTE = ("Cells: the mean over seeds [its 95% Student-t confidence interval]; (n=1): one seed, no interval.")


def check_claims(spec: Spec) -> None:
    """Every claim's metric must be a column of its analysis's metric table (before any run starts)."""
    if not spec.claims:
        return
    metrics = METRICS.get(spec.analysis, []) if spec.kind == "train" else []
    for i, c in enumerate(spec.claims):
        if c.metric not in metrics:
            raise ExperimentError(f"configs/experiments/{spec.name}.yaml: claims[{i}].metric {c.metric!r} is not "
                                  f"a column of the {spec.analysis if spec.kind == 'train' else spec.kind} "
                                  f"analysis's metric table (columns: {metrics or 'none'})")


def measurement(r: dict) -> str:
    """A judged claim's difference as "arm vs base: +d [lo, hi]" (r: one entry of NAME.claims.json)."""
    d, (lo, hi) = r["diff"], r["ci"]
    ci = f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None else " (no CI)"
    return f"{r['arm']} vs {r['base']}: " + ("n/a" if d is None else f"{d:+.3f}{ci}")


def _json_value(x):
    """NaN and inf are not JSON: None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_value(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_value(v) for v in x]
    return x


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def claims_section(spec: Spec, values: dict, out: Path) -> str:
    """Judge each claim of the spec on the per-seed values of its metric (`stats.compare`, `stats.verdict`);
    write NAME.claims.json into `out` (for the index) and return the "## Claims" section ("" without claims)."""
    judged = []
    for c in spec.claims:
        a, b = values[c.arm][c.metric], values[c.base][c.metric]
        cmp = compare(a, b)
        judged.append(_json_value({**asdict(c), "test": cmp.test, "diff": cmp.diff, "ci": cmp.ci, "p": cmp.p,
                                   "g": cmp.g, "n_arm": cmp.n_a, "n_base": cmp.n_b,
                                   "verdict": verdict(cmp, c.expect), "per_seed": {c.arm: a, c.base: b}}))
    (out / f"{spec.name}.claims.json").write_text(json.dumps(
        {"experiment": spec.name, "document": f"{spec.name}.md", "claims": judged}, indent=1) + "\n")
    if not judged:
        return ""
    lines = ["## Claims", "",
             "Each claim of the paper tested on this experiment's seeds: the difference of the metric's seed means "
             "(arm minus base) with its 95% confidence interval, from the paired t-test when both arms ran the same "
             "seeds, else Welch's; p two-sided, not corrected for the number of claims; Hedges' g in pooled seed "
             "standard deviations. Verdict: a higher/lower claim agrees when p < 0.05 in its direction and does "
             "not agree when p < 0.05 the other way; an equal claim does not agree when p < 0.05 and agrees only "
             "when the whole CI lies within +-0.05; anything else is inconclusive.", "",
             "| claim | paper | forkrl: arm vs base, diff [95% CI] | test, p | Hedges g | verdict |",
             "|---|---|---|---|---:|---|"]
    for r in judged:
        g = "n/a" if r["g"] is None else f"{r['g']:+.2f}"
        lines.append(f"| {cell(r['claim'])} | {cell(r['paper'])} | {r['metric']}, {measurement(r)} | "
                     f"{r['test']} (n = {r['n_arm']}, {r['n_base']}), {fmt_p(r['p'])} | {g} | {r['verdict']} |")
    return "\n".join(lines) + "\n\n"


def analyse_compare(spec: Spec, results: list[RunResult], out: Path) -> tuple[str, str]:
    table, values = metric_table(spec, results, COMPARE_COLUMNS)
    plots = plot_section(spec, results, out, [
        (ACC, "Eval accuracy (avg@k), seed mean and its 95% CI", "accuracy"),
        (H, "Policy entropy (Cui et al. Eq. 5 over the training batch)", "nats"),
        ("reward/mean", "Training reward", "reward"),
        ("cov/mean", "Mean token covariance of log-prob and advantage", "cov"),
        ("entropy/frac_above_0.672", "Share of tokens with entropy > 0.672", "share")])
    arms = [a.name for a in spec.arms]
    base = arms[0]
    gains = {a: {r.seed: final(r.rows, ACC) - first(r.rows, ACC) for r in rs}
             for a, rs in by_arm(spec, results).items()}
    reading = ("Change of eval accuracy from step 0 to the last step, per arm: "
               + ", ".join(f"{a} {fmt_ci(mean_ci(g.values()))}" for a, g in gains.items()) + ". "
               "Final eval accuracy: " + diff_reading(values, arms, base, "final eval acc", "accuracy") + ". "
               "Final entropy: " + diff_reading(values, arms, base, "final entropy (last 5)", "entropy") + ". "
               + overall_verdict(values, gains, arms, base))
    summary = f"{spec.title}: " + ", ".join(
        f"{a} {fmt_ci(mean_ci(values[a]['final eval acc'].values()))}" for a in arms) \
        + f" final eval accuracy (mean [95% CI], {len(spec.seeds)} seeds)."
    body = "\n".join(["## Results (mean [95% CI] across seeds)", "", table, CI_NOTE + " "
                      "Entropies in nats; covariance = Cui et al. Eq. 10 per token, averaged; the last column counts "
                      "the tokens Clip-Cov detached or KL-Cov penalised per step.", "",
                      claims_section(spec, values, out) + "## Plots", "", plots,
                      "## Reading (computed from the numbers above)", "", reading, ""])
    return body, summary


def collapse_split(rows: list[dict], steps: int, share: float = 0.15):
    """(entropy, accuracy, step) triples of a run's eval steps (entropy of that step's training batch),
    split into the fit part (step <= share * steps, at least two points) and the rest."""
    pts = [(r[H], r[ACC], r["step"]) for r in rows
           if ACC in r and H in r and math.isfinite(r[H])]
    cut = max(math.ceil(share * steps), pts[1][2] if len(pts) > 1 else 0)
    return [p for p in pts if p[2] <= cut], [p for p in pts if p[2] > cut]


def collapse_fit_run(rows: list[dict], steps: int, share: float = 0.15) -> dict[str, float]:
    """Fit R = -a e^H + b on the early eval points of one run; prediction RMSE on the later ones."""
    from cluster.observe.collapse import fit_collapse

    fit_pts, rest = collapse_split(rows, steps, share)
    out = {"fit_points": float(len(fit_pts)), "test_points": float(len(rest))}
    try:
        f = fit_collapse([p[0] for p in fit_pts], [p[1] for p in fit_pts])
    except ValueError as e:
        out["error"] = str(e)  # type: ignore[assignment]
        return out
    out.update(a=f.a, b=f.b, ceiling=f.ceiling, fit_rmse=f.rmse)
    if rest:
        err = np.array([f.predict(h) - r for h, r, _ in rest])
        const = np.array([r for _, r, _ in rest]) - np.mean([p[1] for p in fit_pts])
        out.update(pred_rmse=float(np.sqrt(np.mean(err ** 2))), final_error=float(abs(err[-1])),
                   const_rmse=float(np.sqrt(np.mean(const ** 2))), const_final=float(abs(const[-1])))
    try:
        full = fit_collapse([p[0] for p in fit_pts + rest], [p[1] for p in fit_pts + rest])
        out.update(full_a=full.a, full_b=full.b, full_rmse=full.rmse)
    except ValueError:
        pass
    return out


def analyse_collapse(spec: Spec, results: list[RunResult], out: Path) -> tuple[str, str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = float(spec.params.get("fit_share", 0.15))
    steps = int(load_config(None, spec.overrides(spec.arms[0], spec.seeds[0])).run.steps)
    ok = [r for r in results if r.error is None]
    fits = {r.seed: collapse_fit_run(r.rows, steps, share) for r in ok}
    keys = ["fit_points", "test_points", "a", "b", "ceiling", "fit_rmse", "pred_rmse", "const_rmse", "final_error",
            "const_final", "full_rmse"]
    lines = ["| seed | " + " | ".join(keys) + " |", "|---:|" + "---:|" * len(keys)]
    for seed, f in fits.items():
        lines.append(f"| {seed} | " + " | ".join(fmt(f.get(k, math.nan), digits=4) for k in keys) + " |")
    agg = {k: mean_ci([f.get(k, math.nan) for f in fits.values()]) for k in keys}
    lines.append("| mean [95% CI] | " + " | ".join(fmt_ci(agg[k], 4) for k in keys) + " |")
    errors = [f"seed {s}: {f['error']}" for s, f in fits.items() if "error" in f]
    values = {p: {m: {s: f.get(k[i], math.nan) for s, f in fits.items()} for m, k in COLLAPSE_METRICS.items()}
              for i, p in enumerate(PREDICTORS)}

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for r in ok:
        fit_pts, rest = collapse_split(r.rows, steps, share)
        sc = ax.scatter([p[0] for p in fit_pts], [p[1] for p in fit_pts], marker="o", s=22,
                        label=f"seed {r.seed}: fit points")
        ax.scatter([p[0] for p in rest], [p[1] for p in rest], marker="x", s=18, color=sc.get_facecolor()[0],
                   label=f"seed {r.seed}: held-out")
        f = fits[r.seed]
        if "a" in f:
            hs = [p[0] for p in fit_pts + rest]
            grid = np.linspace(min(hs) * 0.9, max(hs) * 1.1, 50)
            ax.plot(grid, -f["a"] * np.exp(grid) + f["b"], color=sc.get_facecolor()[0], lw=1)
    png = f"{spec.name}_fit.png"
    save_figure(fig, ax, out / png, f"R = -a e^H + b fitted on the first {share:.0%} of steps",
                "policy entropy H (nats)", "eval accuracy R", legend=7)
    plots = plot_section(spec, results, out, [(ACC, "Eval accuracy", "accuracy"),
                                        (H, "Policy entropy (Eq. 5)", "nats")])
    # binomial noise of one eval point: what a perfect law could not predict below
    evals = [r[ACC] for x in ok for r in x.rows if ACC in r]
    cfg = load_config(None, spec.overrides(spec.arms[0], spec.seeds[0]))
    n_eval = cfg.data.eval_size * cfg.rollout.eval_samples
    p = float(np.mean(evals)) if evals else math.nan
    noise = math.sqrt(p * (1 - p) / n_eval) if math.isfinite(p) else math.nan
    pm, cm, pred = agg["pred_rmse"][0], agg["const_rmse"][0], fmt_ci(agg["pred_rmse"], 4)
    reading = (f"Fitted on the eval points of the first {share:.0%} of the steps, the law predicts the later eval "
               f"accuracy with RMSE {pred} (paper: ~0.009 on math). A constant equal to the mean early "
               f"accuracy does {fmt(cm, digits=4)}, and one eval point alone has a binomial standard error of "
               f"~{fmt(noise, digits=4)} ({n_eval} samples at accuracy {fmt(p)}): "
               + ("the law's error is at the level of the eval noise. " if math.isfinite(pm) and pm < 1.5 * noise
                  else "the law's error is well above the eval noise. ")
               + ("It beats the constant predictor. " if math.isfinite(pm) and math.isfinite(cm) and pm < cm
                  else "It does not beat the constant predictor, i.e. it adds nothing at this scale. "))
    summary = (f"{spec.title}: prediction RMSE {pred} on the held-out {1 - share:.0%} of steps "
               f"(paper ~0.009; constant predictor {fmt(cm, digits=4)}; eval noise ~{fmt(noise, digits=4)}).")
    body = "\n".join(["## Fit per seed", "", "\n".join(lines), "",
                      "a, b: coefficients of R = -a e^H + b (OLS on exp(H), cluster/observe/collapse.py); "
                      "ceiling = b - a; fit_rmse: residual on the fit points; pred_rmse: RMSE of the prediction on "
                      "the later eval points; const_rmse: the same for a constant equal to the mean accuracy of the "
                      "fit points; final_error: |prediction - observed| at the last eval (const_final: the same for "
                      "the constant); full_rmse: residual of a fit on all points.", "",
                      *(["Fit failures: " + "; ".join(errors), ""] if errors else []),
                      claims_section(spec, values, out) + "## Plots", "", f"![fit]({png})", "", plots,
                      "## Reading (computed from the numbers above)", "", reading, ""])
    return body, summary


def analyse_ttrl(spec: Spec, results: list[RunResult], out: Path) -> tuple[str, str]:
    table, values = metric_table(spec, results, TTRL_COLUMNS)
    plots = plot_section(spec, results, out, [
        (ACC, "Eval accuracy (gold-graded), seed mean and its 95% CI", "accuracy"),
        ("reward/accuracy", "Training accuracy against the gold answer", "accuracy"),
        ("ttrl/label_accuracy", "TTRL: share of majority-vote labels equal to the gold answer", "accuracy"),
        (H, "Policy entropy (Eq. 5)", "nats")])
    arms = [a.name for a in spec.arms]
    ttrl = next((a.name for a in spec.arms if a.overrides.get("reward.ttrl")), arms[-1])
    gold = next((a for a in arms if a != ttrl), arms[0])
    label = mean_ci(values[ttrl]["TTRL label acc (mean)"].values())
    lm = label[0]
    acc = {a: mean_ci(values[a]["final eval acc"].values()) for a in (gold, ttrl)}
    reading = (f"The majority vote matched the gold answer on {fmt_ci(label)} of the voted prompts. "
               "Final eval accuracy: " + diff_reading(values, [gold, ttrl], gold, "final eval acc", "accuracy") + ". "
               "Gain over the initial model: " + ", ".join(
                   f"{a} {acc[a][0] - mean_ci(values[a]['initial eval acc'].values())[0]:+.3f}" for a in (gold, ttrl))
               + ". " + ("With the majority right on fewer than half of the prompts, the vote reward pushes the "
                         "policy towards wrong answers about as often as towards right ones; TTRL's gains need a "
                         "model whose majority answer is usually right." if lm < 0.5 else
                         "The majority answer was right on most prompts, the regime in which TTRL's label-free "
                         "reward is expected to work." if math.isfinite(lm) else "No vote statistics were recorded."))
    summary = (f"{spec.title}: final eval accuracy gold {fmt_ci(acc[gold])} vs TTRL {fmt_ci(acc[ttrl])} "
               f"(mean [95% CI]); vote-label accuracy {fmt_ci(label)}.")
    body = "\n".join(["## Results (mean [95% CI] across seeds)", "", table, CI_NOTE + " "
                      "TTRL label acc: share of voted prompts whose majority answer equals the gold answer; TTRL "
                      "reward acc: share of trained responses whose vote reward equals their gold reward. Eval is "
                      "always graded against the gold answers.", "", claims_section(spec, values, out) + "## Plots",
                      "", plots,
                      "## Reading (computed from the numbers above)", "", reading, ""])
    return body, summary


ANALYSE = {"compare": analyse_compare, "collapse": analyse_collapse, "ttrl": analyse_ttrl}
