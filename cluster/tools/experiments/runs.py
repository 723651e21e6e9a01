"""The training runs of an experiment: every (arm, seed) with `cluster.driver.loops.train` in this process on
one shared Ray session, or the newest finished run of each found on disk (`reuse_runs`)."""

from __future__ import annotations

import json
import logging
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from cluster.config import load_config
from cluster.observe.report import read_metrics
from cluster.tools.experiments.spec import Arm, Spec

log = logging.getLogger("forkrl")


@dataclass
class RunResult:
    arm: str
    seed: int
    run_dir: Path | None
    rows: list[dict[str, float]]
    seconds: float
    error: str | None = None


def train_all(spec: Spec, runs: Path) -> list[RunResult]:
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


def existing_runs(spec: Spec, runs: Path) -> list[RunResult]:
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
