"""The run report (cluster/observe/report.py) on a synthetic metrics.jsonl: the entropy line and the collapse
fit against a constant predictor, checked against a float64 recomputation."""

from __future__ import annotations

import json
import math

import numpy as np

from cluster.observe.collapse import fit_collapse
from cluster.observe.report import write_report


def _write(run_dir, rows):
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_states_the_entropy_change_and_the_fit_against_a_constant(tmp_path):
    rng = np.random.default_rng(0)
    rows, evals = [], []
    for step in range(1, 21):
        h = 0.32 * math.exp(-step / 15) + 0.01 * rng.standard_normal()
        r = {"step": step, "time/step_s": 1.0, "entropy/policy": h, "reward/mean": 0.1 * step}
        if step % 2 == 0:
            r["eval/accuracy_avg"] = float(np.clip(-0.8 * math.exp(h) + 1.9 + 0.02 * rng.standard_normal(), 0, 1))
            evals.append((h, r["eval/accuracy_avg"]))
        rows.append(r)
    _write(tmp_path / "run", rows)
    text = write_report(tmp_path / "run").read_text()
    h0, h1 = rows[0]["entropy/policy"], rows[-1]["entropy/policy"]
    assert (f"went from {h0:.3f} nats at step 1 to {h1:.3f} at step 20 ({(h1 - h0) / h0:+.0%})") in text
    h, acc = map(np.asarray, zip(*evals))
    fit = fit_collapse(h, acc)
    const = math.sqrt(np.mean((acc - acc.mean()) ** 2))   # float64 reference of np.std
    assert f"RMSE {fit.rmse:.4f} over 10 points (a constant accuracy: RMSE {const:.4f})" in text
    assert fit.rmse < const   # the synthetic law holds, so the fit beats the constant


def test_report_without_entropy_or_evals_has_no_collapse_section(tmp_path):
    _write(tmp_path / "run", [{"step": 1, "time/step_s": 1.0, "reward/mean": 0.5}])
    text = write_report(tmp_path / "run").read_text()
    assert "Entropy collapse" not in text and "went from" not in text
