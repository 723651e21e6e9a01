"""The analyses of train experiments (spec `analysis:`): compare (arms on accuracy, entropy, covariance),
collapse (the R = -a e^H + b law fitted early, judged on the later steps) and ttrl (label-free rewards).
Each returns (markdown body, one-line summary)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cluster.config import load_config
from cluster.observe.report import save_figure
from cluster.tools.experiments.runs import RunResult
from cluster.tools.experiments.spec import Spec
from cluster.tools.experiments.tables import (best, by_arm, diff_reading, final, first, fmt, last_mean, mean_std,
                                              metric_table, overall_verdict, plot_section, train_rows)


ACC = "eval/accuracy_avg"
H = "entropy/policy"   # Cui et al. Eq. 5: per-response mean token entropy, then the mean over responses


def analyse_compare(spec: Spec, results: list[RunResult], out: Path) -> tuple[str, str]:
    cols = [("initial eval acc", lambda r: first(r, ACC)), ("final eval acc", lambda r: final(r, ACC)),
            ("best eval acc (step > 0)", lambda r: best(r, ACC)),
            ("final train reward (last 5)", lambda r: last_mean(r, "reward/mean")),
            ("initial entropy", lambda r: first(r, H)),
            ("final entropy (last 5)", lambda r: last_mean(r, H)),
            ("final cov mean (last 5)", lambda r: last_mean(r, "cov/mean")),
            ("selected share", lambda r: last_mean(r, "selected_frac")),
            ("clip-cov / kl-cov tokens per step", lambda r: last_mean(r, "clip_cov/clipped", 1000)
             + last_mean(r, "kl_cov/penalised", 1000))]
    table, stats = metric_table(spec, results, cols)
    plots = plot_section(spec, results, out, [
        (ACC, "Eval accuracy (avg@k), mean ± std over seeds", "accuracy"),
        (H, "Policy entropy (Cui et al. Eq. 5 over the training batch)", "nats"),
        ("reward/mean", "Training reward", "reward"),
        ("cov/mean", "Mean token covariance of log-prob and advantage", "cov"),
        ("entropy/frac_above_0.672", "Share of tokens with entropy > 0.672", "share")])
    arms = [a.name for a in spec.arms]
    base = arms[0]
    gains = {a: mean_std([final(r.rows, ACC) - first(r.rows, ACC) for r in rs])
             for a, rs in by_arm(spec, results).items()}
    reading = ("Change of eval accuracy from step 0 to the last step, per arm: "
               + ", ".join(f"{a} {fmt(m, s)}" for a, (m, s, _) in gains.items()) + ". "
               "Final eval accuracy: " + diff_reading(stats, arms, base, "final eval acc", "accuracy") + ". "
               "Final entropy: " + diff_reading(stats, arms, base, "final entropy (last 5)", "entropy") + ". "
               + overall_verdict(stats, gains, arms, base))
    summary = f"{spec.title}: " + ", ".join(
        f"{a} {fmt(*stats[a]['final eval acc'][:2])}" for a in arms) + " final eval accuracy (mean ± std, " \
        f"{len(spec.seeds)} seeds)."
    body = "\n".join(["## Results (mean ± std across seeds)", "", table,
                      "Entropies in nats; covariance = Cui et al. Eq. 10 per token, averaged; the last column counts "
                      "the tokens Clip-Cov detached or KL-Cov penalised per step.", "",
                      "## Plots", "", plots, "## Reading (computed from the numbers above)", "", reading, ""])
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
        out.update(pred_rmse=float(np.sqrt(np.mean(err ** 2))), final_error=float(abs(err[-1])),
                   const_rmse=float(np.sqrt(np.mean((np.array([r for _, r, _ in rest])
                                                     - np.mean([p[1] for p in fit_pts])) ** 2))))
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
            "full_rmse"]
    lines = ["| seed | " + " | ".join(keys) + " |", "|---:|" + "---:|" * len(keys)]
    for seed, f in fits.items():
        lines.append(f"| {seed} | " + " | ".join(fmt(f.get(k, math.nan), digits=4) for k in keys) + " |")
    agg = {k: mean_std([f.get(k, math.nan) for f in fits.values()]) for k in keys}
    lines.append("| mean ± std | " + " | ".join(fmt(agg[k][0], agg[k][1], 4) for k in keys) + " |")
    errors = [f"seed {s}: {f['error']}" for s, f in fits.items() if "error" in f]

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
    pm, ps, _ = agg["pred_rmse"]
    cm, _, _ = agg["const_rmse"]
    reading = (f"Fitted on the eval points of the first {share:.0%} of the steps, the law predicts the later eval "
               f"accuracy with RMSE {fmt(pm, ps, 4)} (paper: ~0.009 on math). A constant equal to the mean early "
               f"accuracy does {fmt(cm, digits=4)}, and one eval point alone has a binomial standard error of "
               f"~{fmt(noise, digits=4)} ({n_eval} samples at accuracy {fmt(p)}): "
               + ("the law's error is at the level of the eval noise. " if math.isfinite(pm) and pm < 1.5 * noise
                  else "the law's error is well above the eval noise. ")
               + ("It beats the constant predictor. " if math.isfinite(pm) and math.isfinite(cm) and pm < cm
                  else "It does not beat the constant predictor, i.e. it adds nothing at this scale. "))
    summary = (f"{spec.title}: prediction RMSE {fmt(pm, ps, 4)} on the held-out {1 - share:.0%} of steps "
               f"(paper ~0.009; constant predictor {fmt(cm, digits=4)}; eval noise ~{fmt(noise, digits=4)}).")
    body = "\n".join(["## Fit per seed", "", "\n".join(lines), "",
                      "a, b: coefficients of R = -a e^H + b (OLS on exp(H), cluster/observe/collapse.py); "
                      "ceiling = b - a; fit_rmse: residual on the fit points; pred_rmse: RMSE of the prediction on "
                      "the later eval points; const_rmse: the same for a constant equal to the mean accuracy of the "
                      "fit points; final_error: |prediction - observed| at the last eval; full_rmse: residual of a "
                      "fit on all points.", "", *(["Fit failures: " + "; ".join(errors), ""] if errors else []),
                      "## Plots", "", f"![fit]({png})", "", plots,
                      "## Reading (computed from the numbers above)", "", reading, ""])
    return body, summary


def analyse_ttrl(spec: Spec, results: list[RunResult], out: Path) -> tuple[str, str]:
    cols = [("initial eval acc", lambda r: first(r, ACC)), ("final eval acc", lambda r: final(r, ACC)),
            ("best eval acc (step > 0)", lambda r: best(r, ACC)),
            ("train gold acc (last 5)", lambda r: last_mean(r, "reward/accuracy")),
            ("TTRL label acc (mean)", lambda r: float(np.mean([x["ttrl/label_accuracy"] for x in train_rows(r)
                                                               if "ttrl/label_accuracy" in x] or [math.nan]))),
            ("TTRL reward acc (mean)", lambda r: float(np.mean([x["ttrl/reward_accuracy"] for x in train_rows(r)
                                                                if "ttrl/reward_accuracy" in x] or [math.nan]))),
            ("final entropy (last 5)", lambda r: last_mean(r, H))]
    table, stats = metric_table(spec, results, cols)
    plots = plot_section(spec, results, out, [
        (ACC, "Eval accuracy (gold-graded), mean ± std over seeds", "accuracy"),
        ("reward/accuracy", "Training accuracy against the gold answer", "accuracy"),
        ("ttrl/label_accuracy", "TTRL: share of majority-vote labels equal to the gold answer", "accuracy"),
        (H, "Policy entropy (Eq. 5)", "nats")])
    arms = [a.name for a in spec.arms]
    ttrl = next((a.name for a in spec.arms if a.overrides.get("reward.ttrl")), arms[-1])
    gold = next((a for a in arms if a != ttrl), arms[0])
    lm, ls, _ = stats[ttrl]["TTRL label acc (mean)"]
    reading = (f"The majority vote matched the gold answer on {fmt(lm, ls)} of the voted prompts. "
               "Final eval accuracy: " + diff_reading(stats, [gold, ttrl], gold, "final eval acc", "accuracy") + ". "
               "Gain over the initial model: " + ", ".join(
                   f"{a} {stats[a]['final eval acc'][0] - stats[a]['initial eval acc'][0]:+.3f}" for a in (gold, ttrl))
               + ". " + ("With the majority right on fewer than half of the prompts, the vote reward pushes the "
                         "policy towards wrong answers about as often as towards right ones; TTRL's gains need a "
                         "model whose majority answer is usually right." if lm < 0.5 else
                         "The majority answer was right on most prompts, the regime in which TTRL's label-free "
                         "reward is expected to work." if math.isfinite(lm) else "No vote statistics were recorded."))
    summary = (f"{spec.title}: final eval accuracy gold {fmt(*stats[gold]['final eval acc'][:2])} vs TTRL "
               f"{fmt(*stats[ttrl]['final eval acc'][:2])}; vote-label accuracy {fmt(lm, ls)}.")
    body = "\n".join(["## Results (mean ± std across seeds)", "", table,
                      "TTRL label acc: share of voted prompts whose majority answer equals the gold answer; TTRL "
                      "reward acc: share of trained responses whose vote reward equals their gold reward. Eval is "
                      "always graded against the gold answers.", "", "## Plots", "", plots,
                      "## Reading (computed from the numbers above)", "", reading, ""])
    return body, summary


ANALYSE = {"compare": analyse_compare, "collapse": analyse_collapse, "ttrl": analyse_ttrl}
