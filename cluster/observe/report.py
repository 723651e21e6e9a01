"""The run report: report.md with PNG plots, written from a run directory's metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

PHASES = ("generate", "grade", "queue", "train", "sync", "eval")


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
    if not pts:
        return np.zeros(0), np.zeros(0)
    x, y = zip(*pts)
    return np.asarray(x), np.asarray(y)


def save_figure(fig, ax, path: Path, title: str, xlabel: str, ylabel: str, legend: int | None = 8,
                grid: bool = True) -> None:
    """Label the axes, add the grid and legend (font size `legend`; None for none), write the PNG, free it."""
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if grid:
        ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=legend)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot(path: Path, title: str, curves: list[tuple[str, np.ndarray, np.ndarray]], ylabel: str = "",
          kind: str = "line") -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [c for c in curves if c[1].size]
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for label, x, y in curves:
        if kind == "scatter":
            ax.scatter(x, y, s=14, label=label)
        else:
            ax.plot(x, y, marker="o" if x.size < 30 else None, ms=3, label=label)
    save_figure(fig, ax, path, title, "step" if kind == "line" else "", ylabel,
                legend=8 if len(curves) > 1 else None)
    return True


def _collapse_plot(path: Path, rows: list[dict]) -> str | None:
    """R against H at the eval steps with the fitted R = -a exp(H) + b (Cui et al. 2505.22617)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cluster.observe.collapse import fit_collapse

    def h_of(r: dict) -> float:   # the tracker's H: Cui et al. Eq. 5, the token mean for older runs
        return r.get("entropy/policy", r.get("entropy/mean", math.nan))

    pairs = [(h_of(r), r["eval/accuracy_avg"]) for r in rows if "eval/accuracy_avg" in r and math.isfinite(h_of(r))]
    if len(pairs) < 2:
        return None
    h, acc = map(np.asarray, zip(*pairs))
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.scatter(h, acc, s=16, label="eval steps")
    note = None
    try:
        fit = fit_collapse(h, acc)
        grid = np.linspace(0, max(h.max() * 1.1, 1e-3), 100)
        ax.plot(grid, [fit.predict(float(x)) for x in grid], "r-", label=f"R = -{fit.a:.3f} e^H + {fit.b:.3f}")
        ax.axhline(fit.ceiling, color="gray", ls="--", label=f"ceiling b - a = {fit.ceiling:.3f}")
        # the residual of a constant (the mean accuracy): what the law must beat to say anything
        note = f"a = {fit.a:.4f}, b = {fit.b:.4f}, predicted ceiling {fit.ceiling:.3f}, RMSE {fit.rmse:.4f} " \
               f"over {fit.points} points (a constant accuracy: RMSE {float(np.std(acc)):.4f})"
    except ValueError as e:
        note = f"no fit: {e}"
    save_figure(fig, ax, path, "Entropy-performance trade-off", "policy entropy H (nats)", "eval accuracy R")
    return note


def _time_plot(path: Path, rows: list[dict]) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_rows = [r for r in rows if "time/step_s" in r]
    if not train_rows:
        return False
    steps = np.asarray([r["step"] for r in train_rows])
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    bottom = np.zeros(len(train_rows))
    for ph in PHASES:
        vals = np.asarray([r.get(f"time/{ph}_s", 0.0) for r in train_rows])
        if vals.any():
            ax.bar(steps, vals, bottom=bottom, label=ph, width=0.9)
            bottom += vals
    save_figure(fig, ax, path, "Step time by phase", "step", "seconds", grid=False)
    return True


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    figs: list[tuple[str, str]] = []

    def add(name: str, title: str, keys: list[tuple[str, str]], ylabel: str = "") -> None:
        if _plot(out / name, title, [(label, *series(rows, k)) for label, k in keys], ylabel):
            figs.append((title, name))

    add("reward.png", "Training reward and accuracy", [("reward", "reward/mean"), ("accuracy", "reward/accuracy")])
    add("eval.png", "Eval accuracy", [("avg@k", "eval/accuracy_avg"), ("pass@k", "eval/accuracy_pass")], "accuracy")
    add("entropy.png", "Policy entropy percentiles", [(f"p{q}", f"entropy/p{q}") for q in (50, 80, 95, 99)]
        + [("H (Eq. 5)", "entropy/policy"), ("token mean", "entropy/mean")], "nats")
    add("forking.png", "Forking tokens", [("selected share", "selected_frac"),
                                          ("share H > 0.672", "entropy/frac_above_0.672"), ("tau", "tau")])
    add("covariance.png", "Covariance of log-prob and advantage",
        [("mean", "cov/mean"), ("top 0.02% mean", "cov/top_0.02pct_mean"), ("share positive", "cov/frac_positive")])
    add("length.png", "Response length", [("mean", "response/length_mean")], "tokens")
    note = _collapse_plot(out / "collapse.png", rows)
    if note is not None:
        figs.append(("R against H with the fitted curve", "collapse.png"))
    if _time_plot(out / "time.png", rows):
        figs.append(("Step time breakdown", "time.png"))

    ev = [(r["step"], r["eval/accuracy_avg"], r.get("eval/accuracy_pass", float("nan")))
          for r in rows if "eval/accuracy_avg" in r]
    lines = [f"# forkrl run {run_dir.name}", ""]
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        lines += ["Configuration: [config.yaml](../config.yaml)", ""]
    if ev:
        lines += ["## Evaluation", "", "| step | avg@k | pass@k |", "|---:|---:|---:|"]
        lines += [f"| {int(s)} | {a:.3f} | {p:.3f} |" for s, a, p in ev]
        lines += ["", f"Eval accuracy went from {ev[0][1]:.3f} to {ev[-1][1]:.3f} "
                      f"({ev[-1][1] - ev[0][1]:+.3f}).", ""]
    hs = [(r["step"], r["entropy/policy"]) for r in rows
          if "time/step_s" in r and math.isfinite(r.get("entropy/policy", math.nan))]
    if note or hs:
        lines += ["## Entropy collapse", ""]
    if hs:
        (s0, h0), (s1, h1) = hs[0], hs[-1]
        change = f" ({(h1 - h0) / h0:+.0%})" if h0 > 0 else ""
        lines += [f"Policy entropy (Cui et al. Eq. 5) went from {h0:.3f} nats at step {int(s0)} to {h1:.3f} at step "
                  f"{int(s1)}{change}.", ""]
    if note:
        lines += [(note if note.startswith("no fit") else f"R = -a e^H + b fitted on the eval steps: {note}") + ".", ""]
    train_rows = [r for r in rows if "time/step_s" in r]
    if train_rows:
        mean = {ph: float(np.mean([r.get(f"time/{ph}_s", 0.0) for r in train_rows])) for ph in PHASES}
        lines += ["## Time per step (mean seconds)", "", "| " + " | ".join(PHASES) + " | total |",
                  "|" + "---:|" * (len(PHASES) + 1),
                  "| " + " | ".join(f"{mean[p]:.2f}" for p in PHASES)
                  + f" | {np.mean([r['time/step_s'] for r in train_rows]):.2f} |", ""]
    lines += ["## Plots", ""]
    for title, name in figs:
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
