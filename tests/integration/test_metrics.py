"""The exporter over real HTTP: every canonical StepStats key lands in its metric, scraped and parsed back."""

import math
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.config import MetricsConfig
from cluster.observe.metrics import (COLLAPSE_STATS, INFO_NAME, OWN, STALENESS, STALENESS_BUCKETS, STEP_STATS,
                             MetricsExporter, metric_names)

ROOT = Path(__file__).resolve().parents[2]


def scrape(exporter) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels without run): value} for the exporter's run."""
    text = urllib.request.urlopen(exporter.url, timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            assert s.labels.get("run") == exporter.run, s
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "run"))
            out[(s.name, labels)] = s.value
    return out


def sample(metric, suffix=""):
    return (metric.name + suffix, tuple(sorted(metric.labels)))


@pytest.fixture
def exporter():
    with MetricsExporter(MetricsConfig(entropy_floor=0.1, fit_min_points=3, slope_window=4), "run-a",
                         info={"model": "tiny", "policy_loss": "kl_cov"}) as ex:
        yield ex


def stats_for(step: int) -> dict[str, float]:
    """Distinct value per key (so a key mapped to the wrong series is caught)."""
    out = {key: 0.001 * (i + 1) + step for i, key in enumerate(STEP_STATS)}
    out["entropy/policy"] = 1.0 - 0.1 * step   # Cui et al. Eq. 5: the H of the fit (entropy/mean is not)
    out["eval/accuracy_avg"] = 0.2 + 0.05 * step + 0.01 * (step % 2)
    out["queue/staleness/0"] = 3
    out["queue/staleness/5"] = step
    return out


def test_serves_on_loopback_with_a_free_port(exporter):
    assert exporter.port > 0
    assert exporter.url == f"http://127.0.0.1:{exporter.port}/metrics"
    host, port = exporter._server.socket.getsockname()[:2]
    assert (host, port) == ("127.0.0.1", exporter.port)


def test_every_key_reaches_its_metric(exporter):
    t0 = time.time()
    for step in range(4):
        merged = exporter.record(step, stats_for(step))
    got = scrape(exporter)
    last = stats_for(3)
    for key, m in STEP_STATS.items():
        if m.kind == "gauge":
            assert got[sample(m)] == pytest.approx(last[key]), key
        elif m.kind == "counter":
            assert got[sample(m)] == pytest.approx(sum(stats_for(s)[key] for s in range(4))), key
        else:  # one observation per step
            assert got[sample(m, "_count")] == 4, key
            assert got[sample(m, "_sum")] == pytest.approx(sum(stats_for(s)[key] for s in range(4))), key
    # Staleness: 3 groups at 0 per step, `step` groups at 5.
    h = STALENESS
    assert got[(h.name + "_count", ())] == 12 + (0 + 1 + 2 + 3)
    assert got[(h.name + "_sum", ())] == 5 * 6
    for le in STALENESS_BUCKETS:
        assert got[(h.name + "_bucket", (("le", f"{float(le)}"),))] == (12 if le < 5 else 18), le
    # Exporter-owned series.
    assert got[sample(OWN["step"])] == 3
    assert got[sample(OWN["steps"])] == 4
    assert got[sample(OWN["floor"])] == 0.1
    assert got[sample(OWN["syncs"])] == 4
    assert t0 <= got[sample(OWN["last_sync"])] <= time.time()
    info = {k: v for (name, labels), v in got.items() if name == INFO_NAME for k, v in labels}
    assert info["model"] == "tiny" and info["policy_loss"] == "kl_cov" and info["version"]
    # Collapse outputs equal an independent float64 fit of the four (entropy, accuracy) pairs.
    h_ = np.array([stats_for(s)["entropy/policy"] for s in range(4)])
    r_ = np.array([stats_for(s)["eval/accuracy_avg"] for s in range(4)])
    design = np.stack([-np.exp(h_), np.ones(4)], 1)
    (a, b), *_ = np.linalg.lstsq(design, r_, rcond=None)
    expected = {"collapse/a": a, "collapse/b": b, "collapse/ceiling": b - a,
                "collapse/rmse": math.sqrt(np.mean((r_ - design @ [a, b]) ** 2)), "collapse/points": 4,
                "collapse/entropy_slope": -0.1, "collapse/floor_step": 9.0}
    assert set(expected) == set(COLLAPSE_STATS)
    for key, value in expected.items():
        assert got[sample(COLLAPSE_STATS[key])] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        assert merged[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert set(merged) == set(stats_for(3)) | set(COLLAPSE_STATS)
    # Every family the exporter documents is exposed, and nothing else.
    exposed = {re.sub(r"_(bucket|sum|count|total|created)$", "", n) for n, _ in got}
    documented = {re.sub(r"_total$", "", n) for n in metric_names()}
    assert exposed == documented


def test_undefined_collapse_outputs_are_absent_not_zero(exporter):
    exporter.record(0, {"entropy/mean": 1.0, "eval/accuracy_avg": 0.3})
    got = scrape(exporter)
    assert got[sample(COLLAPSE_STATS["collapse/points"])] == 1
    for key in COLLAPSE_STATS.keys() - {"collapse/points"}:
        assert sample(COLLAPSE_STATS[key]) not in got, key


def test_nan_gauge_is_recorded_and_entropy_not_falling_is_inf(exporter):
    for step, h in enumerate([0.5, 0.5, 0.6]):
        exporter.record(step, {"entropy/mean": h, "cov/mean": float("nan")})
    got = scrape(exporter)
    assert math.isnan(got[sample(STEP_STATS["cov/mean"])])
    assert got[sample(COLLAPSE_STATS["collapse/floor_step"])] == math.inf


@pytest.mark.parametrize("bad, match", [
    ({"entropy/maen": 1.0}, r"entropy/maen: unknown StepStats key \(did you mean entropy/mean\?\)"),
    ({"queue/produced": -1.0}, r"queue/produced: a counter needs a finite value >= 0"),
    ({"sync/failures": float("nan")}, r"sync/failures: a counter needs a finite value >= 0"),
    ({"time/train_s": float("inf")}, r"time/train_s: a histogram needs a finite value >= 0"),
    ({"loss": "0.3"}, r"loss: value '0.3' is not a number"),
    ({"loss": None}, r"loss: value None is not a number"),
    ({"collapse/a": 0.1}, r"collapse/a: computed by the collapse tracker"),
    ({"queue/staleness/x": 1}, r"queue/staleness/x: expected queue/staleness/<versions>"),
    ({"queue/staleness/2": 1.5}, r"queue/staleness/2: expected"),
    ({"entropy/mean": float("nan")}, r"entropy/mean: the collapse fit needs a finite entropy"),
    ({"eval/accuracy_avg": 1.2}, r"eval/accuracy_avg: the collapse fit needs an accuracy in \[0, 1\]"),
])
def test_bad_stats_raise_naming_the_key_and_record_nothing(exporter, bad, match):
    exporter.record(0, {"queue/produced": 2, "entropy/mean": 1.0, "eval/accuracy_avg": 0.3})
    before = scrape(exporter)
    good = {"queue/produced": 5, "loss": 0.7, "queue/staleness/1": 2, "entropy/mean": 0.9}
    with pytest.raises(ValueError, match=match):
        exporter.record(1, {**good, **bad})
    assert scrape(exporter) == before


def test_bad_step_and_run_and_info():
    cfg = MetricsConfig()
    with pytest.raises(ValueError, match="run must be a non-empty string"):
        MetricsExporter(cfg, "")
    with pytest.raises(ValueError, match="info label 'bad-name'"):
        MetricsExporter(cfg, "r", info={"bad-name": "x"})
    with pytest.raises(ValueError, match="info label 'run'"):
        MetricsExporter(cfg, "r", info={"run": "x"})
    with MetricsExporter(cfg, "r") as ex:
        with pytest.raises(ValueError, match="step must be an integer"):
            ex.record(-1, {})
        ex.record(5, {"entropy/mean": 1.0})
        with pytest.raises(ValueError, match="not after the last step 5"):
            ex.record(5, {"entropy/mean": 0.9})


def test_two_runs_in_one_process_do_not_collide():
    cfg = MetricsConfig()
    with MetricsExporter(cfg, "a") as a, MetricsExporter(cfg, "b") as b:
        a.record(0, {"queue/undelivered": 1})
        b.record(0, {"queue/undelivered": 2})
        assert a.port != b.port
        assert scrape(a)[sample(STEP_STATS["queue/undelivered"])] == 1
        assert scrape(b)[sample(STEP_STATS["queue/undelivered"])] == 2


def test_port_in_use_is_an_error_naming_the_setting():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=rf"cannot serve /metrics on 127.0.0.1:{port} \(metrics.host, metrics.port\)"):
            MetricsExporter(MetricsConfig(port=port), "r")


def test_close_releases_the_port():
    ex = MetricsExporter(MetricsConfig(), "r")
    port = ex.port
    urllib.request.urlopen(ex.url, timeout=5).read()
    ex.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    with socket.socket() as s:  # the port can be bound again (our client left it in TIME_WAIT)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_exposition_passes_promtool_lint(exporter):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install Debian's prometheus package (`make debian`)")
    for step in range(4):
        exporter.record(step, stats_for(step))
    text = urllib.request.urlopen(exporter.url, timeout=5).read()
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()


def test_docs_describe_every_key_and_metric():
    doc = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    for key in [*STEP_STATS, *COLLAPSE_STATS, "queue/staleness/<k>"]:
        assert f"`{key}`" in doc, f"docs/metrics.md does not document StepStats key {key}"
    for name in metric_names():
        assert f"`{name}" in doc, f"docs/metrics.md does not document metric {name}"
