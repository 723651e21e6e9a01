"""A real Prometheus (Debian package) scrapes two exporters fed a collapsing and a healthy run; every dashboard
query and every alert-rule series returns data through the HTTP API, and the collapse alerts go active for
the collapsing run only."""

import contextlib
import json
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from cluster.config import MetricsConfig
from cluster.observe.dashboards import DASHBOARDS, render
from cluster.observe.metrics import MetricsExporter

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "forkrl-alerts.yaml"
RUNS = ("collapsing", "healthy")
STEPS = 24
RATE_WINDOW = "30s"       # stands in for Grafana's $__rate_interval: covers the whole feed


def step_stats(run: str, step: int) -> dict[str, float]:
    """One RL step's StepStats as the driver hands them over: a run whose entropy collapses (plain GRPO) or
    stays up (KL-Cov). Accuracy follows Cui et al.'s law R = -0.1 exp(H) + 0.9 with a little noise."""
    h = 0.02 + 1.2 * math.exp(-step / 6) if run == "collapsing" else 0.9 + 0.004 * step
    noise = 0.002 * ((step * 7) % 3 - 1)
    acc = -0.1 * math.exp(h) + 0.9 + noise
    stats = {
        "learner/version": step + 1,
        "entropy/policy": h, "entropy/mean": h, "entropy/p50": 0.2 * h, "entropy/p80": 0.9 * h, "entropy/p95": 2.5 * h,
        "entropy/p99": 4.0 * h, "tau": 0.9 * h, "selected_frac": 0.2,
        "entropy/frac_above_0.672": min(1.0, 0.25 * h), "learner/entropy_coef": 1e-4 * step,
        "cov/mean": 0.003, "cov/max": 6.0 - 0.1 * step, "cov/top_0.02pct_mean": 5.6, "cov/frac_positive": 0.55,
        "cov/seq_group_mean": 0.02,
        "clip_cov/clipped": 3, "kl_cov/penalised": 10 if run == "healthy" else 0,
        "clip/low_frac": 0.01, "clip/high_frac": 0.02, "kl/approx": 1e-3,
        "loss": -0.01, "learner/grad_norm": 0.5,
        "reward/mean": acc - 0.1, "reward/accuracy": acc - 0.1, "train/accuracy_pass": min(1.0, acc + 0.1),
        "response/length_mean": 40 - step / 2, "response/length_max": 64, "response/truncated_share": 0.05,
        "sampling/drop_share": 0.3, "sampling/refill_rounds": 1, "reward/extract_rate": 0.9,
        "no_signal/answer_format": 0, "no_signal/too_hard": 0, "no_signal/too_easy": 0,
        "queue/undelivered": 4, "queue/produced": 8, "queue/consumed": 8, "queue/dropped_stale": 1,
        "queue/staleness/0": 5, "queue/staleness/1": 3, "queue/staleness/3": 1,
        "generator/tokens_per_s": 12000, "learner/tokens_per_s": 8000,
        "generator/forking_high_share": 0.2, "generator/forking_high_entropy": 1.1,
        "sync/duration_s": 0.05, "sync/bytes": 1.6e6, "sync/failures": 1 if run == "collapsing" and step == 5 else 0,
        "time/step_s": 0.25, "time/generate_s": 0.1, "time/grade_s": 0.02, "time/queue_s": 0.01,
        "time/train_s": 0.1, "time/sync_s": 0.02,
    }
    if step % 4 == 0:
        stats.update({"eval/reward_mean": acc, "eval/accuracy_avg": acc, "eval/accuracy_pass": min(1.0, acc + 0.15)})
    return stats


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prom:
    def __init__(self, base: str, log: Path):
        self.base, self.log = base, log

    def api(self, path: str, **params) -> dict:
        url = f"{self.base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    def wait(self, what: str, ok, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while True:
            value = ok()
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; prometheus log:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.25)


@contextlib.contextmanager
def run_prometheus(tmp: Path, targets: list[str]):
    """A real Prometheus (Debian package) on a free loopback port scraping `targets` every 500 ms with the
    alert rules loaded; yields a ready `Prom`, stops the server afterwards."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: install Debian's prometheus package (`make debian`)")
    port = free_port()
    (tmp / "prometheus.yml").write_text(json.dumps({   # JSON is YAML
        "global": {"scrape_interval": "500ms", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "forkrl", "static_configs": [{"targets": targets}]}],
    }))
    log = tmp / "prometheus.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                 "--log.level=warn"], stdout=logf, stderr=subprocess.STDOUT)
    try:
        p = Prom(f"http://127.0.0.1:{port}", log)

        def ready():
            try:
                return urllib.request.urlopen(f"{p.base}/-/ready", timeout=2).status == 200
            except OSError:
                return proc.poll() is not None and pytest.fail(f"prometheus exited: {log.read_text()[-3000:]}")
        p.wait("prometheus to be ready", ready)
        yield p
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def prom(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prometheus")
    cfg = MetricsConfig(entropy_floor=0.1, fit_min_points=3, slope_window=8)
    exporters = [MetricsExporter(cfg, run, info={"model": "tiny"}) for run in RUNS]
    try:
        with run_prometheus(tmp, [f"127.0.0.1:{e.port}" for e in exporters]) as p:
            # Prometheus hands discovered targets to the scrape loop on a 5 s tick: feed only once both are scraped.
            p.wait("both exporters to be scraped", lambda: len(p.query("up == 1")) == len(RUNS))
            for step in range(STEPS):
                for ex in exporters:
                    ex.record(step, step_stats(ex.run, step))
                time.sleep(0.2)
            p.wait("the last step to be scraped",
                   lambda: {r["metric"]["run"] for r in p.query(f"forkrl_step == {STEPS - 1}")} == set(RUNS))
            yield p
    finally:
        for ex in exporters:
            ex.close()


def dashboard_queries():
    for name in DASHBOARDS:
        model = render(name)
        for panel in model["panels"]:
            for target in panel.get("targets", []):
                yield pytest.param(target["expr"], id=f"{name}/{panel['title']}/{target['refId']}")


def instantiate(expr: str) -> str:
    return expr.replace("$run", "|".join(RUNS)).replace("$__rate_interval", RATE_WINDOW)


@pytest.mark.parametrize("expr", list(dashboard_queries()))
def test_every_dashboard_query_returns_data(prom, expr):
    result = prom.query(instantiate(expr))
    assert result, f"no data for {instantiate(expr)}"
    values = [float(r["value"][1]) for r in result]
    assert any(math.isfinite(v) for v in values), (expr, values)
    runs = {r["metric"].get("run") for r in result}
    if runs != {None}:
        assert runs == set(RUNS), (expr, runs)


def test_every_alert_rule_series_has_data(prom):
    names = set(re.findall(r"\bforkrl_[a-z0-9_]+", RULES.read_text()))
    assert len(names) >= 8
    for name in sorted(names):
        runs = {r["metric"]["run"] for r in prom.query(f'{name}{{run=~"{"|".join(RUNS)}"}}')}
        assert runs == set(RUNS), (name, runs)


def test_rules_evaluate_and_collapse_alerts_go_active_for_the_collapsing_run_only(prom):
    def evaluated():
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        return rules if all(r.get("lastEvaluation", "").startswith("2") and r["evaluationTime"] > 0
                            for r in rules) else None
    rules = prom.wait("every rule to be evaluated", evaluated)
    assert len(rules) == 9
    assert all(r["health"] == "ok" and not r.get("lastError") for r in rules), rules

    expected = {  # alert -> state per run; `for:` keeps most pending within a short test
        "ForkrlEntropyCollapsingFast": {"collapsing": "pending"},
        "ForkrlEntropyBelowFloor": {"collapsing": "pending"},
        "ForkrlRemainingGainLow": {"collapsing": "pending"},
        "ForkrlWeightSyncFailing": {"collapsing": "firing"},   # no `for:`: one failure fires at once
    }

    def active():
        got: dict[str, dict[str, str]] = {}
        for a in prom.api("alerts")["alerts"]:
            got.setdefault(a["labels"]["alertname"], {})[a["labels"]["run"]] = a["state"]
        return got if got == expected else None
    prom.wait(f"alerts {expected}", active)
    # The same expressions through the query API: the collapse condition holds for the collapsing run only.
    groups = {r["name"]: r["query"] for r in rules}
    for alert in ("ForkrlEntropyCollapsingFast", "ForkrlEntropyBelowFloor", "ForkrlRemainingGainLow"):
        assert {r["metric"]["run"] for r in prom.query(groups[alert])} == {"collapsing"}, alert
    steps_left = prom.query(f'forkrl_entropy_floor_crossing_step{{run="collapsing"}} - forkrl_step')
    assert float(steps_left[0]["value"][1]) < 0      # already crossed
    assert prom.query('forkrl_entropy_floor_crossing_step{run="healthy"}')[0]["value"][1] == "+Inf"
