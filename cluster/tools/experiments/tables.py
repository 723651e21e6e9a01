"""From runs' metrics to numbers and words: per-run reductions (final, best, last_mean, first), mean ± std
across seeds, the markdown tables, the seed-mean curves and the readings that compare arms against the seed
spread."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from cluster.observe.report import save_figure
from cluster.tools.experiments.runs import RunResult
from cluster.tools.experiments.spec import Spec


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


def mean_std(vals: list[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in vals if math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def fmt(m: float, s: float | None = None, digits: int = 3) -> str:
    if not math.isfinite(m):
        return "n/a"
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def by_arm(spec: Spec, results: list[RunResult]) -> dict[str, list[RunResult]]:
    return {a.name: [r for r in results if r.arm == a.name and r.error is None] for a in spec.arms}


def metric_table(spec: Spec, results: list[RunResult], columns: list[tuple[str, Any]]) -> tuple[str, dict]:
    """Markdown table, one row per arm, each cell mean ± std over the arm's successful seeds.
    columns: (header, fn(rows) -> float). Returns (markdown, {arm: {header: (mean, std, n)}})."""
    by = by_arm(spec, results)
    stats: dict[str, dict[str, tuple[float, float, int]]] = {}
    lines = ["| arm | seeds | " + " | ".join(h for h, _ in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for arm, rs in by.items():
        stats[arm] = {h: mean_std([fn(r.rows) for r in rs]) for h, fn in columns}
        lines.append(f"| {arm} | {len(rs)} | " + " | ".join(fmt(m, s) for m, s, _ in stats[arm].values()) + " |")
    return "\n".join(lines) + "\n", stats


def curves_plot(path: Path, spec: Spec, results: list[RunResult], key: str, title: str, ylabel: str) -> bool:
    """One curve per arm: the mean over seeds at each step where every seed has the key, ±1 std band."""
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
        m, s = vals.mean(0), vals.std(0, ddof=1) if len(vals) > 1 else np.zeros(len(steps))
        line, = ax.plot(steps, m, marker="o" if len(steps) < 30 else None, ms=3, label=f"{arm} (n={len(vals)})")
        ax.fill_between(steps, m - s, m + s, color=line.get_color(), alpha=0.18)
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


def diff_reading(stats: dict, arms: list[str], base: str, col: str, what: str) -> str:
    """One sentence per arm comparing `col` with the base arm against the seed spread."""
    out = []
    bm, bs, bn = stats[base][col]
    for a in arms:
        if a == base:
            continue
        m, s, n = stats[a][col]
        if not (math.isfinite(m) and math.isfinite(bm)):
            out.append(f"{a}: no {what} to compare")
            continue
        d = m - bm
        se = math.sqrt(s ** 2 / n + bs ** 2 / bn) if min(n, bn) > 1 else math.nan
        verdict = ("one seed: no spread to judge it against" if not math.isfinite(se)
                   else "within the seed noise" if abs(d) < 2 * se
                   else ("higher" if d > 0 else "lower") + " by more than two standard errors of the difference")
        out.append(f"{a} {fmt(m, s)} vs {base} {fmt(bm, bs)} ({d:+.3f}, {verdict})")
    return "; ".join(out)


def _separated(stats: dict, arm: str, base: str, col: str) -> int:
    """+1 / -1 when arm's mean is above / below base's by more than two standard errors, else 0."""
    (m, s, n), (bm, bs, bn) = stats[arm][col], stats[base][col]
    if min(n, bn) < 2 or not (math.isfinite(m) and math.isfinite(bm)):
        return 0
    se = math.sqrt(s ** 2 / n + bs ** 2 / bn)
    return 0 if abs(m - bm) <= 2 * se else (1 if m > bm else -1)


def overall_verdict(stats: dict, gains: dict, arms: list[str], base: str) -> str:
    """The overall outcome in words, from the same numbers."""
    acc = {a: _separated(stats, a, base, "final eval acc") for a in arms if a != base}
    ent = {a: _separated(stats, a, base, "final entropy (last 5)") for a in arms if a != base}
    h0 = mean_std([stats[a]["initial entropy"][0] for a in arms])[0]
    h1 = mean_std([stats[a]["final entropy (last 5)"][0] for a in arms])[0]
    g = [gains[a][0] for a in arms if math.isfinite(gains[a][0])]
    out = []
    if any(acc.values()):
        out.append("Final eval accuracy separates from " + base + " for " + ", ".join(
            f"{a} ({'higher' if v > 0 else 'lower'})" for a, v in acc.items() if v) + ".")
    else:
        out.append(f"No arm's final eval accuracy separates from {base} by more than two standard errors: at "
                   f"this scale and budget the experiment cannot tell the arms apart on accuracy.")
    if any(ent.values()):
        out.append("Entropy separates for " + ", ".join(
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
