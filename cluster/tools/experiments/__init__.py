"""`forkrl experiment NAME`: the papers' findings reproduced at small scale, one command each.

An experiment is a YAML file in configs/experiments/NAME.yaml:

    title, paper (the published figure, markdown), context (what differs from the paper)
    kind: train | entropy-patterns
    analysis: compare | collapse | ttrl          (train experiments)
    base: {dotted.key: value}                    overrides shared by every arm
    arms: [{name, overrides: {dotted.key: value}}]
    seeds: [0, 1, 2]                             every arm runs every seed with the same budget
    budget: {run.steps: 24, run.eval_every: 6}
    smoke: {seeds: [0], arms: [names], overrides: {...}}   the test suite's few-step version

Train experiments run every (arm, seed) with `cluster.driver.loops.train` in this process, all sharing one Ray
session (start-up per run is the actors only), then aggregate each run's metrics.jsonl into tables (mean ±
std across seeds) and PNG curves (seed mean with a ±1 std band), and write NAME.md into the output
directory (docs/results by default; a temporary directory in smoke mode so tests never touch the tree) and
regenerate the index results.md there. A run that fails is recorded with its error in the results file;
the others still count.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cluster.config import ConfigError, load_config
from cluster.observe.report import read_metrics, save_figure

log = logging.getLogger("forkrl")

ROOT = Path(__file__).resolve().parents[3]
SPEC_DIR = ROOT / "configs" / "experiments"
RESULTS_DIR = ROOT / "docs" / "results"
ANALYSES = ("compare", "collapse", "ttrl")
# 80/20 paper (docs/algorithms.md 1.7): Qwen3-8B chains of thought on AIME.
PAPER_LOW_SHARE, PAPER_P80 = 0.5064, 0.672
FORKING_WORDS = ("wait", "however", "thus", "suppose", "assume", "since", "given", "maybe", "perhaps")


# ---------------------------------------------------------------------------------------------- specs

@dataclass
class Arm:
    name: str
    overrides: dict[str, Any]


@dataclass
class Spec:
    name: str
    title: str
    kind: str
    analysis: str
    paper: str
    context: str
    base: dict[str, Any]
    arms: list[Arm]
    seeds: list[int]
    budget: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)

    def overrides(self, arm: Arm, seed: int) -> list[str]:
        """`key=value` strings for `load_config` / `forkrl train` (JSON values are valid YAML scalars)."""
        merged = {**self.base, **self.budget, **arm.overrides, "run.seed": seed,
                  "run.name": f"{self.name}-{arm.name}-s{seed}"}
        return [f"{k}={json.dumps(v)}" for k, v in merged.items()]


class ExperimentError(ValueError):
    """A bad experiment file, naming the file and the field."""


def _mapping(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise ExperimentError(f"{where} must be a mapping of dotted config keys to values")
    return dict(raw)


def load_spec(name: str, smoke: bool = False, spec_dir: Path = SPEC_DIR) -> Spec:
    """Read and validate configs/experiments/NAME.yaml (smoke: its `smoke:` block applied)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ExperimentError(f"experiment name {name!r} must be letters, digits, - or _")
    path = Path(spec_dir) / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(spec_dir).glob("*.yaml"))
        raise ExperimentError(f"no experiment {name!r} ({path} does not exist); known: {', '.join(known)}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}: top level must be a mapping")
    known_keys = {"title", "paper", "context", "kind", "analysis", "base", "arms", "seeds", "budget", "smoke",
                  "params"}
    if extra := set(raw) - known_keys:
        raise ExperimentError(f"{path}: unknown keys {sorted(extra)} (allowed: {sorted(known_keys)})")
    kind = raw.get("kind", "train")
    if kind not in ("train", "entropy-patterns"):
        raise ExperimentError(f"{path}: kind must be train or entropy-patterns, got {kind!r}")
    analysis = raw.get("analysis", "compare")
    if analysis not in ANALYSES:
        raise ExperimentError(f"{path}: analysis must be one of {ANALYSES}, got {analysis!r}")
    arms = []
    for i, a in enumerate(raw.get("arms") or [{"name": "run"}]):
        if not isinstance(a, dict) or not re.fullmatch(r"[A-Za-z0-9_.-]+", str(a.get("name", ""))):
            raise ExperimentError(f"{path}: arms[{i}] needs a name of letters, digits, '.', '-' or '_'")
        arms.append(Arm(str(a["name"]), _mapping(a.get("overrides"), f"{path}: arms[{i}].overrides")))
    if len({a.name for a in arms}) != len(arms):
        raise ExperimentError(f"{path}: arm names must be unique")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ExperimentError(f"{path}: seeds must be a non-empty list of integers")
    spec = Spec(name=name, title=str(raw.get("title", name)), kind=kind, analysis=analysis,
                paper=str(raw.get("paper", "")).strip(), context=str(raw.get("context", "")).strip(),
                base=_mapping(raw.get("base"), f"{path}: base"), arms=arms, seeds=seeds,
                budget=_mapping(raw.get("budget"), f"{path}: budget"),
                params=_mapping(raw.get("params"), f"{path}: params"))
    if not smoke and kind == "train" and len(arms) > 1 and len(seeds) < 3:
        raise ExperimentError(f"{path}: arms are compared, so seeds needs at least 3 entries (got {seeds})")
    if smoke:
        sm = raw.get("smoke")
        if not isinstance(sm, dict):
            raise ExperimentError(f"{path}: a `smoke:` block is required (the test suite runs it)")
        if "seeds" in sm:
            spec.seeds = list(sm["seeds"])
        if "arms" in sm:
            names = {a.name for a in arms}
            if missing := [a for a in sm["arms"] if a not in names]:
                raise ExperimentError(f"{path}: smoke.arms names unknown arms {missing}")
            spec.arms = [a for a in arms if a.name in sm["arms"]]
        spec.budget = {**spec.budget, **_mapping(sm.get("overrides"), f"{path}: smoke.overrides")}
        spec.params = {**spec.params, **_mapping(sm.get("params"), f"{path}: smoke.params")}
    if kind == "train":  # every run's config must be valid before the first one starts
        for arm in spec.arms:
            try:
                load_config(None, spec.overrides(arm, spec.seeds[0]))
            except ConfigError as e:
                raise ExperimentError(f"{path}: arm {arm.name!r}: {e}") from None
    return spec


# ---------------------------------------------------------------------------------------------- running

@dataclass
class RunResult:
    arm: str
    seed: int
    run_dir: Path | None
    rows: list[dict[str, float]]
    seconds: float
    error: str | None = None


def run_experiment(name: str, smoke: bool = False, out_dir: str | Path | None = None,
                   runs_dir: str | Path | None = None, spec_dir: str | Path = SPEC_DIR,
                   reuse_runs: bool = False) -> str:
    """Run experiment NAME and write NAME.md (+ PNGs) and results.md into out_dir.

    out_dir: docs/results by default; in smoke mode a fresh temporary directory unless given.
    runs_dir: where the training runs go (default: out_dir/runs in smoke mode, else runs/experiments/NAME).
    spec_dir: where NAME.yaml is read from (configs/experiments).
    reuse_runs: do not train; analyse the newest finished run of each (arm, seed) in runs_dir (after a
    change to the analysis only).
    Returns a short text naming the results file and its summary line.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = load_spec(name, smoke=smoke, spec_dir=Path(spec_dir))
    if out_dir is None:
        out_dir = Path(tempfile.mkdtemp(prefix=f"forkrl-{name}-")) if smoke else RESULTS_DIR
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(runs_dir) if runs_dir else (out / "runs" if smoke else ROOT / "runs" / "experiments" / name)
    t0 = time.time()
    if spec.kind == "entropy-patterns":
        body, summary = entropy_patterns(spec, out)
    else:
        results = _existing_runs(spec, runs) if reuse_runs else _train_all(spec, runs)
        if reuse_runs:  # the training's wall time, not this analysis's
            t0 = time.time() - sum(r.seconds for r in results)
        body, summary = {"compare": analyse_compare, "collapse": analyse_collapse,
                         "ttrl": analyse_ttrl}[spec.analysis](spec, results, out)
        body = _runs_table(results) + body
    wall = time.time() - t0
    path = out / f"{name}.md"
    path.write_text(_document(spec, smoke, wall, body, summary, reused=reuse_runs))
    write_index(out)
    return f"{path}\n{summary}"


def _train_all(spec: Spec, runs: Path) -> list[RunResult]:
    """Every (arm, seed) in turn, in this process, on one Ray session started here if none is running."""
    import ray

    from cluster.runtime import runtime_env_vars, setup_env

    setup_env()
    started = False
    if not ray.is_initialized():
        ray.init(include_dashboard=False, runtime_env={"env_vars": runtime_env_vars()},
                 dashboard_host="127.0.0.1", log_to_driver=False)
        started = True
    out = []
    try:
        for arm in spec.arms:
            for seed in spec.seeds:
                out.append(_train_one(spec, arm, seed, runs))
    finally:
        if started:
            ray.shutdown()
    return out


def _train_one(spec: Spec, arm: Arm, seed: int, runs: Path) -> RunResult:
    import ray
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup

    from cluster.driver.loops import train

    cfg = load_config(None, [*spec.overrides(arm, seed), f"run.output_dir={json.dumps(str(runs / arm.name))}"])
    before = set(placement_group_table())
    old_dirs = set((runs / arm.name).glob(f"{cfg.run.name}-*"))
    t0 = time.time()
    error = None
    try:
        code = train(cfg)
        if code:  # e.g. driver.EXIT_ACTOR_LOST: the run stopped early with a checkpoint
            error = f"forkrl train exited with code {code}"
    except Exception as e:  # noqa: BLE001 - one failed run must not lose the others: it is reported
        error = f"{type(e).__name__}: {e}"
        log.error("experiment %s arm %s seed %d failed:\n%s", spec.name, arm.name, seed, traceback.format_exc())
    finally:
        # a run that died before System.stop could remove its placement group must not hold the CPUs the
        # next run in this shared Ray session needs
        for pg_id, info in placement_group_table().items():
            if pg_id not in before and info.get("state") != "REMOVED":
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
    new_dirs = sorted(set((runs / arm.name).glob(f"{cfg.run.name}-*")) - old_dirs)
    run_dir = new_dirs[-1] if new_dirs else None
    rows = read_metrics(run_dir) if run_dir else []
    if run_dir is not None:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the analysis needs only the metrics
    if error is None and not any("time/step_s" in r for r in rows):
        error = "the run wrote no training step"
    return RunResult(arm.name, seed, run_dir, rows, time.time() - t0, error)


def _existing_runs(spec: Spec, runs: Path) -> list[RunResult]:
    """The newest run directory of each (arm, seed) that reached the budget's last step."""
    out = []
    for arm in spec.arms:
        for seed in spec.seeds:
            cfg = load_config(None, spec.overrides(arm, seed))
            found = None
            for d in sorted((runs / arm.name).glob(f"{cfg.run.name}-*"), reverse=True):
                rows = read_metrics(d)
                if any(r["step"] == cfg.run.steps and "time/step_s" in r for r in rows):
                    secs = (d / "metrics.jsonl").stat().st_mtime - (d / "config.yaml").stat().st_mtime
                    found = RunResult(arm.name, seed, d, rows, secs)
                    break
            out.append(found or RunResult(arm.name, seed, None, [], 0.0, f"no finished run under {runs / arm.name}"))
    return out


# ---------------------------------------------------------------------------------------------- aggregation

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


def _by_arm(spec: Spec, results: list[RunResult]) -> dict[str, list[RunResult]]:
    return {a.name: [r for r in results if r.arm == a.name and r.error is None] for a in spec.arms}


def metric_table(spec: Spec, results: list[RunResult], columns: list[tuple[str, Any]]) -> tuple[str, dict]:
    """Markdown table, one row per arm, each cell mean ± std over the arm's successful seeds.
    columns: (header, fn(rows) -> float). Returns (markdown, {arm: {header: (mean, std, n)}})."""
    by = _by_arm(spec, results)
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
    for arm, rs in _by_arm(spec, results).items():
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


def _plots(spec: Spec, results: list[RunResult], out: Path, keys: list[tuple[str, str, str]]) -> str:
    md = []
    for key, title, ylabel in keys:
        name = f"{spec.name}_{re.sub(r'[^A-Za-z0-9]+', '_', key).strip('_')}.png"
        if curves_plot(out / name, spec, results, key, title, ylabel):
            md += [f"![{title}]({name})", ""]
        else:
            md += [f"*{title}: no data (`{key}` absent from every run).*", ""]
    return "\n".join(md)


def _runs_table(results: list[RunResult]) -> str:
    lines = ["## Runs", "", "| arm | seed | status | steps | wall s | run directory |", "|---|---:|---|---:|---:|---|"]
    for r in results:
        status = "ok" if r.error is None else "FAILED: " + r.error[:300].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r.arm} | {r.seed} | {status} | {len(train_rows(r.rows))} | {r.seconds:.0f} | "
                     f"{r.run_dir.name if r.run_dir else '-'} |")
    failed = [r for r in results if r.error]
    if failed:
        lines += ["", f"**{len(failed)} of {len(results)} runs failed; the tables below use the others only.**"]
    return "\n".join(lines) + "\n\n"


def _diff_reading(stats: dict, arms: list[str], base: str, col: str, what: str) -> str:
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


def _verdict(stats: dict, gains: dict, arms: list[str], base: str) -> str:
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


# ---------------------------------------------------------------------------------------------- analyses

ACC = "eval/accuracy_avg"


def analyse_compare(spec: Spec, results: list[RunResult], out: Path) -> tuple[str, str]:
    cols = [("initial eval acc", lambda r: first(r, ACC)), ("final eval acc", lambda r: final(r, ACC)),
            ("best eval acc (step > 0)", lambda r: best(r, ACC)),
            ("final train reward (last 5)", lambda r: last_mean(r, "reward/mean")),
            ("initial entropy", lambda r: first(r, "entropy/mean")),
            ("final entropy (last 5)", lambda r: last_mean(r, "entropy/mean")),
            ("final cov mean (last 5)", lambda r: last_mean(r, "cov/mean")),
            ("selected share", lambda r: last_mean(r, "selected_frac")),
            ("clip-cov / kl-cov tokens per step", lambda r: last_mean(r, "clip_cov/clipped", 1000)
             + last_mean(r, "kl_cov/penalised", 1000))]
    table, stats = metric_table(spec, results, cols)
    plots = _plots(spec, results, out, [
        (ACC, "Eval accuracy (avg@k), mean ± std over seeds", "accuracy"),
        ("entropy/mean", "Policy entropy (mean token entropy of the training batch)", "nats"),
        ("reward/mean", "Training reward", "reward"),
        ("cov/mean", "Mean token covariance of log-prob and advantage", "cov"),
        ("entropy/frac_above_0.672", "Share of tokens with entropy > 0.672", "share")])
    arms = [a.name for a in spec.arms]
    base = arms[0]
    gains = {a: mean_std([final(r.rows, ACC) - first(r.rows, ACC) for r in rs])
             for a, rs in _by_arm(spec, results).items()}
    reading = ("Change of eval accuracy from step 0 to the last step, per arm: "
               + ", ".join(f"{a} {fmt(m, s)}" for a, (m, s, _) in gains.items()) + ". "
               "Final eval accuracy: " + _diff_reading(stats, arms, base, "final eval acc", "accuracy") + ". "
               "Final entropy: " + _diff_reading(stats, arms, base, "final entropy (last 5)", "entropy") + ". "
               + _verdict(stats, gains, arms, base))
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
    pts = [(r["entropy/mean"], r[ACC], r["step"]) for r in rows
           if ACC in r and "entropy/mean" in r and math.isfinite(r["entropy/mean"])]
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
    plots = _plots(spec, results, out, [(ACC, "Eval accuracy", "accuracy"),
                                        ("entropy/mean", "Policy entropy", "nats")])
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
            ("final entropy (last 5)", lambda r: last_mean(r, "entropy/mean"))]
    table, stats = metric_table(spec, results, cols)
    plots = _plots(spec, results, out, [
        (ACC, "Eval accuracy (gold-graded), mean ± std over seeds", "accuracy"),
        ("reward/accuracy", "Training accuracy against the gold answer", "accuracy"),
        ("ttrl/label_accuracy", "TTRL: share of majority-vote labels equal to the gold answer", "accuracy"),
        ("entropy/mean", "Policy entropy", "nats")])
    arms = [a.name for a in spec.arms]
    ttrl = next((a.name for a in spec.arms if a.overrides.get("reward.ttrl")), arms[-1])
    gold = next((a for a in arms if a != ttrl), arms[0])
    lm, ls, _ = stats[ttrl]["TTRL label acc (mean)"]
    reading = (f"The majority vote matched the gold answer on {fmt(lm, ls)} of the voted prompts. "
               "Final eval accuracy: " + _diff_reading(stats, [gold, ttrl], gold, "final eval acc", "accuracy") + ". "
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


# ---------------------------------------------------------------------------------------------- entropy patterns

def _sample_entropies(model_path: Path, problems, data_cfg, n_samples: int, temperature: float,
                      max_new_tokens: int, batch: int, seed: int):
    """Sample chains of thought with transformers and return per response (token ids [L], entropies [L]):
    full-vocabulary entropies of the HF model's logits at the sampling temperature (learner.tokenstats)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.data.sampling import cut_at_eos, hf_sample
    from cluster.data.tasks import render_text
    from learner.tokenstats import token_stats

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    eos = tok.eos_token_id
    texts = [render_text(p, tok, data_cfg) for p in problems for _ in range(n_samples)]
    torch.manual_seed(seed)
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            gen = hf_sample(model, enc, temperature=temperature, max_new_tokens=max_new_tokens, eos_token_id=eos,
                            pad_token_id=tok.pad_token_id, logits=True)
            seqs = gen.tokens
            logits = torch.stack(gen.logits, 1)            # [B, L, V] raw logits of each sampled position
            log.info("entropy-patterns: %s: sampled %d/%d responses", model_path.name, i + len(seqs), len(texts))
            for b in range(seqs.shape[0]):
                ids, _ = cut_at_eos(seqs[b].tolist(), (eos,))
                n = len(ids)
                _, ent = token_stats(logits[b, :n], seqs[b, :n], temperature, compiled=False)
                out.append((ids, ent.double().numpy()))
    return tok, out


def entropy_patterns(spec: Spec, out: Path) -> tuple[str, str]:
    import torch

    p = spec.params
    threads = torch.get_num_threads()
    # decoding is memory-bound and the box is shared: more threads than free cores only spin
    torch.set_num_threads(int(p.get("threads", 1)))
    try:
        return _entropy_patterns(spec, out, p)
    finally:
        torch.set_num_threads(threads)


def _entropy_patterns(spec: Spec, out: Path, p: dict[str, Any]) -> tuple[str, str]:
    from cluster.config import DataConfig
    from cluster.data.models import resolve_model
    from cluster.data.tasks import load_problems

    # (model, task) pairs: every model on every task unless `pairs` lists them (the tiny model exists
    # warm-started for arith only until someone builds its countdown variant, a long SFT on this box)
    pairs = p.get("pairs") or [[m, t] for m in p.get("models", ["builtin:tiny"]) for t in p.get("tasks", ["arith"])]
    summary_parts, sections, readings = [], [], []
    tables = ["| model | task | responses | tokens | share H < 0.01 | p50 | p80 | mean H | share H > 0.672 |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|",
              f"| paper: Qwen3-8B | AIME'24/'25 | - | > 10^6 | {PAPER_LOW_SHARE:.3f} | - | {PAPER_P80:.3f} | - "
              "| 0.200 |"]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    errors = []
    for model, task in pairs:
        label = f"{model} / {task}"
        try:
            data_cfg = DataConfig(task=task, eval_size=int(p.get("prompts", 32)),
                                  difficulty=int(p.get("difficulty", 2)),
                                  **({"train_path": p["train_path"]} if task == "file" else {}))
            _, held = load_problems(data_cfg, int(p.get("seed", 0)))
            path = resolve_model(model, task)
            tok, resp = _sample_entropies(path, held, data_cfg, int(p.get("samples", 2)),
                                          float(p.get("temperature", 1.0)), int(p.get("max_new_tokens", 128)),
                                          int(p.get("batch", 16)), int(p.get("seed", 0)))
        except Exception as e:  # noqa: BLE001 - a failing model/task is reported, the others still run
            errors.append(f"{label}: {type(e).__name__}: {e}")
            log.error("entropy-patterns %s failed:\n%s", label, traceback.format_exc())
            continue
        ents = np.concatenate([e for _, e in resp]) if resp else np.zeros(0)
        if ents.size == 0:
            errors.append(f"{label}: no tokens sampled")
            continue
        ids = np.concatenate([np.asarray(i) for i, _ in resp])
        low, p50, p80 = float(np.mean(ents < 0.01)), float(np.percentile(ents, 50)), float(np.percentile(ents, 80))
        hi = float(np.mean(ents > PAPER_P80))
        tables.append(f"| {model} | {task} | {len(resp)} | {ents.size} | {low:.3f} | {p50:.3f} | {p80:.3f} | "
                      f"{ents.mean():.3f} | {hi:.3f} |")
        # most frequent decoded tokens among the top-20% entropy positions, and the least uncertain
        top_words = Counter(tok.decode([int(t)]).strip().lower() or repr(tok.decode([int(t)]))
                            for t in ids[ents >= p80])
        low_words = Counter(tok.decode([int(t)]).strip().lower() or repr(tok.decode([int(t)]))
                            for t in ids[ents < 0.01])
        forking = {w: top_words.get(w, 0) for w in FORKING_WORDS}
        sample = tok.decode(resp[0][0], skip_special_tokens=True)[:300].replace("\n", " ")
        sections += [f"### {label}", "",
                     "Most frequent tokens among the top-20% entropy positions (count): "
                     + ", ".join(f"`{w}` ({c})" for w, c in top_words.most_common(int(p.get("top_k", 25)))), "",
                     "Most frequent tokens with H < 0.01: "
                     + ", ".join(f"`{w}` ({c})" for w, c in low_words.most_common(12)), "",
                     "The paper's forking words among the top-20% positions: "
                     + ", ".join(f"`{w}` {c}" for w, c in forking.items()), "",
                     f"First sampled response: `{sample}`", ""]
        summary_parts.append(f"{label}: {low:.1%} of tokens below 0.01 nats, p80 {p80:.3f}")
        shape = ("more concentrated than the paper's: almost every position is near-deterministic and the "
                 "uncertainty sits on a few" if p80 < PAPER_P80 else
                 "far flatter than the paper's: the model is uncertain at most positions, so there is no sparse "
                 "set of forking tokens to find")
        readings.append(f"{label}: {low:.1%} of the tokens below 0.01 nats and p80 {p80:.3f} nats against the "
                        f"paper's {PAPER_LOW_SHARE:.1%} and {PAPER_P80}, i.e. {shape}; the paper's forking words "
                        f"fill {sum(forking.values())} of its {int((ents >= p80).sum())} top-20% positions, whose "
                        f"most frequent tokens are " + ", ".join(f"`{w}`" for w, _ in top_words.most_common(5)) + ".")
        srt = np.sort(ents)
        ax.plot(srt, np.arange(1, srt.size + 1) / srt.size, label=label)
    ax.axvline(PAPER_P80, color="gray", ls="--", lw=1, label="paper p80 = 0.672")
    ax.axhline(PAPER_LOW_SHARE, color="gray", ls=":", lw=1, label="paper: 50.6% below 0.01")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlim(left=0)
    png = f"{spec.name}_cdf.png"
    save_figure(fig, ax, out / png, "Token-entropy distribution of sampled chains of thought",
                "token entropy H (nats)", "share of tokens with entropy <= H", legend=7)
    body = "\n".join(["## Token-entropy statistics", "", "\n".join(tables), "",
                      f"Entropy = full-vocabulary entropy of the HF model's logits at T = {p.get('temperature', 1.0)} "
                      "at each sampled position (learner/tokenstats.py); responses sampled with transformers "
                      "`generate` at the same temperature, top-p 1, top-k off; the EOS token counts.", "",
                      *(["**Failed:** " + "; ".join(errors), ""] if errors else []),
                      "## Plots", "", f"![cdf]({png})", "", "## High- and low-entropy tokens", "", *sections,
                      "## Reading (computed from the numbers above)", "", " ".join(readings), ""])
    summary = f"{spec.title}: " + ("; ".join(summary_parts) or "no model produced tokens") + \
        f" (paper: {PAPER_LOW_SHARE:.1%}, p80 {PAPER_P80})."
    return body, summary


# ---------------------------------------------------------------------------------------------- documents

def _document(spec: Spec, smoke: bool, wall: float, body: str, summary: str, reused: bool = False) -> str:
    cmd = f"forkrl experiment {spec.name}" + (" --smoke" if smoke else "")
    arms = "\n".join(f"| {a.name} | `{' '.join(f'{k}={json.dumps(v)}' for k, v in a.overrides.items()) or '-'}` |"
                     for a in spec.arms) if spec.kind == "train" else ""
    lines = [f"# {spec.title}", "", f"**Summary:** {summary}", "",
             f"Command: `{cmd}` (configs/experiments/{spec.name}.yaml). Wall time: {wall / 60:.1f} min on this "
             f"machine ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})"
             + (", summed over the stored runs this analysis was regenerated from." if reused else "."), ""]
    if smoke:
        lines += ["**SMOKE RUN**: a few steps only, to keep the code path alive; the numbers mean nothing.", ""]
    lines += ["## Setup", ""]
    if spec.kind == "train":
        lines += [f"Seeds: {spec.seeds} (every arm runs every seed with the same budget).", "",
                  "Shared overrides: `"
                  + " ".join(f"{k}={json.dumps(v)}" for k, v in {**spec.base, **spec.budget}.items())
                  + "`", "", "| arm | overrides |", "|---|---|", arms, ""]
    else:
        lines += ["Parameters: `" + json.dumps(spec.params) + "`", ""]
    if spec.context:
        lines += [spec.context, ""]
    if spec.paper:
        lines += ["## The paper's figure", "", spec.paper, ""]
    return "\n".join(lines) + "\n" + body


def write_index(out: Path) -> Path:
    """results.md: one line per experiment document in `out`, from its **Summary:** line."""
    lines = ["# Reproduction results", "",
             "Small-scale reproductions of the papers' findings on this CPU box; each line links to the full "
             "results (setup, tables, plots, the paper's figure, a reading). Regenerate one with "
             "`forkrl experiment NAME`.", ""]
    in_docs = out.resolve() == RESULTS_DIR.resolve()
    index = out.parent / "results.md" if in_docs else out / "results.md"
    for doc in sorted(out.glob("*.md")):
        if doc.resolve() == index.resolve():
            continue
        m = re.search(r"^\*\*Summary:\*\* (.*)$", doc.read_text(), re.M)
        link = f"{out.name}/{doc.name}" if in_docs else doc.name
        lines.append(f"- [{doc.stem}]({link}): {m.group(1) if m else '(no summary)'}")
    index.write_text("\n".join(lines) + "\n")
    return index
