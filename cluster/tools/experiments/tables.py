"""From runs' metrics to numbers and words: per-run reductions (final, best, last_mean, first), the seed mean
with its 95% CI, the markdown tables, the seed-mean curves and the readings that compare arms by a t-test over
the seeds (cluster.tools.experiments.stats)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from cluster.observe.report import save_figure
from cluster.tools.experiments.runs import RunResult
from cluster.tools.experiments.spec import Spec
from cluster.tools.experiments.stats import ALPHA, compare, mean_ci


def train_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "time/step_s" in r]


def final(rows: list[dict], key: str) -> float:
    """Last finite value of `key` in a run (NaN if none)."""
    vals = [r[key] for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
    return float(vals[-1]) if vals else math.nan


def best(rows: list[dict], key: str) -> float:
    """Largest finite value of `key` after training started (step > 0; NaN if none)."""
    vals = [r[key] for r in rows if key in r and r["step"] > 0 and r[key] is not None and math.isfinite(r[key])]
    return float(max(vals)) if vals else math.nan


def last_mean(rows: list[dict], key: str, n: int = 5) -> float:
    """Mean of the last n finite training-step values (less noisy than the last one)."""
    vals = [r[key] for r in train_rows(rows) if key in r and math.isfinite(r[key])][-n:]
    return float(np.mean(vals)) if vals else math.nan


def first(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
    return float(vals[0]) if vals else math.nan


def fmt(m: float, digits: int = 3) -> str:
    return f"{m:.{digits}f}" if math.isfinite(m) else "n/a"


def fmt_ci(ci: tuple[float, float, float, int], digits: int = 3) -> str:
    """`mean_ci`'s (mean, low, high, n) as "mean [low, high]"; "mean (n=1)" where there is no interval."""
    m, lo, hi, n = ci
    if not math.isfinite(m):
        return "n/a"
    if not math.isfinite(lo):
        return f"{m:.{digits}f} (n={n})"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def fmt_p(p: float | None) -> str:
    return "p n/a" if p is None or not math.isfinite(p) else "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def by_arm(spec: Spec, results: list[RunResult]) -> dict[str, list[RunResult]]:
    return {a.name: [r for r in results if r.arm == a.name and r.error is None] for a in spec.arms}


def metric_table(spec: Spec, results: list[RunResult], columns: list[tuple[str, Any]]) -> tuple[str, dict]:
    """Markdown table, one row per arm, each cell the mean [95% CI] over the arm's successful seeds.
    columns: (header, fn(rows) -> float). Returns (markdown, {arm: {header: {seed: value}}}), the per-seed
    values the readings and claims test."""
    by = by_arm(spec, results)
    values = {arm: {h: {r.seed: fn(r.rows) for r in rs} for h, fn in columns} for arm, rs in by.items()}
    lines = ["| arm | seeds | " + " | ".join(h for h, _ in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for arm, cols in values.items():
        lines.append(f"| {arm} | {len(by[arm])} | "
                     + " | ".join(fmt_ci(mean_ci(v.values())) for v in cols.values()) + " |")
    return "\n".join(lines) + "\n", values


def curves_plot(path: Path, spec: Spec, results: list[RunResult], key: str, title: str, ylabel: str) -> bool:
    """One curve per arm: the mean over seeds at each step where every seed has the key, with the 95% CI of
    that mean as a band (none for one seed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    drawn = False
    for arm, rs in by_arm(spec, results).items():
        per_seed = [{r["step"]: r[key] for r in x.rows if key in r and r[key] is not None and math.isfinite(r[key])}
                    for x in rs]
        if not per_seed:
            continue
        steps = sorted(set.intersection(*(set(d) for d in per_seed)))
        if not steps:
            continue
        vals = np.array([[d[s] for s in steps] for d in per_seed])
        m, lo, hi, _ = np.array([mean_ci(vals[:, j]) for j in range(len(steps))]).T
        line, = ax.plot(steps, m, marker="o" if len(steps) < 30 else None, ms=3, label=f"{arm} (n={len(vals)})")
        if len(vals) > 1:
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.18)
        drawn = True
    if drawn:
        save_figure(fig, ax, path, title, "step", ylabel)
    else:
        plt.close(fig)
    return drawn


def plot_section(spec: Spec, results: list[RunResult], out: Path, keys: list[tuple[str, str, str]]) -> str:
    md = []
    for key, title, ylabel in keys:
        name = f"{spec.name}_{re.sub(r'[^A-Za-z0-9]+', '_', key).strip('_')}.png"
        if curves_plot(out / name, spec, results, key, title, ylabel):
            md += [f"![{title}]({name})", ""]
        else:
            md += [f"*{title}: no data (`{key}` absent from every run).*", ""]
    return "\n".join(md)


def runs_table(results: list[RunResult]) -> str:
    lines = ["## Runs", "", "| arm | seed | status | steps | wall s | run directory |", "|---|---:|---|---:|---:|---|"]
    for r in results:
        status = "ok" if r.error is None else "FAILED: " + r.error[:300].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r.arm} | {r.seed} | {status} | {len(train_rows(r.rows))} | {r.seconds:.0f} | "
                     f"{r.run_dir.name if r.run_dir else '-'} |")
    failed = [r for r in results if r.error]
    if failed:
        lines += ["", f"**{len(failed)} of {len(results)} runs failed; the tables below use the others only.**"]
    return "\n".join(lines) + "\n\n"


def diff_reading(values: dict, arms: list[str], base: str, col: str, what: str) -> str:
    """One sentence per arm comparing `col` with the base arm: the difference, its 95% CI and the p-value of
    the paired (same seeds) or Welch t-test (`stats.compare`)."""
    out = []
    b = mean_ci(values[base][col].values())
    for a in arms:
        if a == base:
            continue
        m = mean_ci(values[a][col].values())
        if not (math.isfinite(m[0]) and math.isfinite(b[0])):
            out.append(f"{a}: no {what} to compare")
            continue
        c = compare(values[a][col], values[base][col])
        verdict = ("fewer than two seeds in an arm: no test" if not math.isfinite(c.p)
                   else f"{c.test} {fmt_p(c.p)}: " + ("no difference detected at p < 0.05" if c.p >= ALPHA
                                                      else "higher" if c.diff > 0 else "lower"))
        ci = f" [{c.ci[0]:+.3f}, {c.ci[1]:+.3f}]" if math.isfinite(c.ci[0]) else ""
        out.append(f"{a} {fmt_ci(m)} vs {base} {fmt_ci(b)} ({c.diff:+.3f}{ci}, {verdict})")
    return "; ".join(out)


def _separated(values: dict, arm: str, base: str, col: str) -> int:
    """+1 / -1 when arm's mean is above / below base's at p < 0.05 (stats.compare), else 0."""
    c = compare(values[arm][col], values[base][col])
    return 0 if not c.p < ALPHA else (1 if c.diff > 0 else -1)


def overall_verdict(values: dict, gains: dict, arms: list[str], base: str) -> str:
    """The overall outcome in words, from the same numbers. gains: {arm: {seed: final - initial eval acc}}."""
    acc = {a: _separated(values, a, base, "final eval acc") for a in arms if a != base}
    ent = {a: _separated(values, a, base, "final entropy (last 5)") for a in arms if a != base}
    h0 = mean_ci([mean_ci(values[a]["initial entropy"].values())[0] for a in arms])[0]
    h1 = mean_ci([mean_ci(values[a]["final entropy (last 5)"].values())[0] for a in arms])[0]
    g = [m for m in (mean_ci(gains[a].values())[0] for a in arms) if math.isfinite(m)]
    out = []
    if any(acc.values()):
        out.append("Final eval accuracy differs from " + base + " at p < 0.05 for " + ", ".join(
            f"{a} ({'higher' if v > 0 else 'lower'})" for a, v in acc.items() if v) + ".")
    else:
        out.append(f"No arm's final eval accuracy differs from {base} at p < 0.05 (paired or Welch t-test over "
                   f"the seeds): at this scale and budget the experiment cannot tell the arms apart on accuracy.")
    if any(ent.values()):
        out.append("Final entropy differs at p < 0.05 for " + ", ".join(
            f"{a} ({'higher' if v > 0 else 'lower'})" for a, v in ent.items() if v) + ".")
    out.append(f"Averaged over arms, the mean token entropy went from {fmt(h0)} to {fmt(h1)} nats over the run ("
               + ("no collapse within this budget" if h1 > 0.8 * h0 else "a fall" if h1 <= 0.8 * h0
                  else "no entropy recorded") + ")")
    if g:
        out[-1] += (f", and eval accuracy changed by {min(g):+.3f} to {max(g):+.3f} from step 0"
                    + (": training lowered it in every arm." if max(g) < 0 else
                       ": training raised it in every arm." if min(g) > 0 else "."))
    else:
        out[-1] += "."
    return " ".join(out)
