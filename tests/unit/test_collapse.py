"""Collapse tracker against float64 references written the slow obvious way (numpy lstsq / polyfit)."""

import math

import numpy as np
import pytest

from cluster.observe.collapse import CollapseTracker, entropy_trend, fit_collapse
from cluster.observe.metrics import COLLAPSE_STATS


def ref_fit(h, r):
    """OLS of R on [-exp(H), 1] by lstsq: returns a, b, rmse."""
    h, r = np.asarray(h, np.float64), np.asarray(r, np.float64)
    design = np.stack([-np.exp(h), np.ones_like(h)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, r, rcond=None)
    resid = r - design @ np.array([a, b])
    return a, b, math.sqrt(float(np.mean(resid ** 2)))


def ref_trend(steps, h, floor):
    slope, intercept = np.polyfit(np.asarray(steps, np.float64), np.asarray(h, np.float64), 1)
    return slope, ((floor - intercept) / slope if slope < 0 else math.inf)


@pytest.mark.parametrize("seed", range(6))
def test_fit_matches_lstsq_on_random_runs(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 200))
    # Entropies anywhere from near-deterministic to ~9 nats (exp(H) ~ 8000: the conditioning trap).
    h = rng.uniform(0, rng.uniform(0.05, 9.0), n)
    r = np.clip(-rng.uniform(0, 0.5) * np.exp(h) / np.exp(h).max() + 0.8 + rng.normal(0, 0.05, n), 0, 1)
    fit = fit_collapse(h.tolist(), r.tolist())
    a, b, rmse = ref_fit(h, r)
    scale = max(abs(a), abs(b), 1e-12)
    assert fit.points == n
    assert fit.a == pytest.approx(a, rel=1e-7, abs=1e-9 * scale)
    assert fit.b == pytest.approx(b, rel=1e-7, abs=1e-9 * scale)
    assert fit.rmse == pytest.approx(rmse, rel=1e-6, abs=1e-10)
    assert fit.ceiling == pytest.approx(b - a, rel=1e-7, abs=1e-9 * scale)


def test_online_fit_is_order_independent_and_equals_batch():
    rng = np.random.default_rng(7)
    h = rng.uniform(0.1, 2.0, 40)
    r = rng.uniform(0.2, 0.7, 40)
    batch = fit_collapse(h, r)
    for perm in (np.arange(40), rng.permutation(40), np.arange(40)[::-1]):
        t = CollapseTracker(floor=0.05, min_points=3)
        for step, i in enumerate(perm):
            t.add(step, h[i], r[i])
        assert t.fit.a == pytest.approx(batch.a, rel=1e-10)
        assert t.fit.b == pytest.approx(batch.b, rel=1e-10)
        assert t.fit.rmse == pytest.approx(batch.rmse, rel=1e-8)


def test_exact_law_is_recovered_with_zero_residual():
    # Cui et al.'s law with a = 0.1, b = 0.9: ceiling 0.8 at H = 0.
    h = np.linspace(0.05, 1.5, 12)
    r = -0.1 * np.exp(h) + 0.9
    fit = fit_collapse(h, r)
    assert fit.a == pytest.approx(0.1, rel=1e-10)
    assert fit.b == pytest.approx(0.9, rel=1e-10)
    assert fit.ceiling == pytest.approx(0.8, rel=1e-10)
    # SSE comes from co-moments (cyy - slope*cxy): an exact fit leaves ~1e-17 of cancellation, whose square
    # root is ~1e-9 -- far below any accuracy that matters.
    assert fit.rmse == pytest.approx(0.0, abs=1e-7)
    assert fit.predict(0.0) == pytest.approx(0.8)
    assert fit.predict(1.0) == pytest.approx(0.9 - 0.1 * math.e)


def test_fit_needs_two_distinct_entropies():
    with pytest.raises(ValueError, match="two distinct entropies"):
        fit_collapse([0.5, 0.5, 0.5], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="two distinct entropies"):
        fit_collapse([0.5], [0.1])
    with pytest.raises(ValueError, match="two distinct entropies"):
        fit_collapse([], [])
    t = CollapseTracker(floor=0.05, min_points=2)
    t.add(0, 0.5, 0.1)
    t.add(1, 0.5, 0.3)
    assert t.fit is None and "collapse/a" not in t.stats()


@pytest.mark.parametrize("h, r, match", [
    ([0.5, float("nan")], [0.1, 0.2], r"entropy\[1\]"),
    ([0.5, -0.1], [0.1, 0.2], r"entropy\[1\]"),
    ([0.5, 0.7], [0.1, 1.5], r"accuracy\[1\]"),
    ([0.5, 0.7], [float("inf"), 0.2], r"accuracy\[0\]"),
    ([0.5, 800.0], [0.1, 0.2], r"entropy\[1\]"),
    ([0.5, 0.7], [0.1], "2 values but accuracy has 1"),
])
def test_fit_rejects_bad_input_naming_the_row(h, r, match):
    with pytest.raises(ValueError, match=match):
        fit_collapse(h, r)


@pytest.mark.parametrize("seed", range(4))
def test_trend_matches_polyfit_over_the_window(seed):
    rng = np.random.default_rng(100 + seed)
    window = int(rng.integers(3, 12))
    steps = np.cumsum(rng.integers(1, 4, 30))
    h = 1.5 * np.exp(-steps / 25.0) + rng.normal(0, 0.01, 30).clip(-0.01, 0.01) + 0.02
    t = CollapseTracker(floor=0.1, min_points=3, window=window)
    for i, (s, e) in enumerate(zip(steps, h)):
        t.add(int(s), float(e))
        if i + 1 < 3:
            assert t.trend is None
            continue
        # Only the last `window` steps count.
        lo = max(0, i + 1 - window)
        slope, floor_step = ref_trend(steps[lo:i + 1], h[lo:i + 1], 0.1)
        assert t.trend.points == i + 1 - lo
        assert t.trend.slope == pytest.approx(slope, rel=1e-9, abs=1e-12)
        assert t.trend.floor_step == pytest.approx(floor_step, rel=1e-9)


def test_trend_crossing_step_and_non_falling_entropy():
    # H = 1 - 0.01 * step reaches 0.2 at step 80.
    tr = entropy_trend([10, 11, 12, 13], [0.9, 0.89, 0.88, 0.87], floor=0.2)
    assert tr.slope == pytest.approx(-0.01)
    assert tr.floor_step == pytest.approx(80.0)
    # Already below the floor: the crossing lies in the past.
    tr = entropy_trend([10, 11], [0.1, 0.09], floor=0.2)
    assert tr.floor_step == pytest.approx(0.0)
    assert entropy_trend([0, 1, 2], [0.5, 0.6, 0.7], floor=0.1).floor_step == math.inf
    assert entropy_trend([0, 1, 2], [0.5, 0.5, 0.5], floor=0.1).floor_step == math.inf
    assert entropy_trend([3, 3], [0.5, 0.4], floor=0.1) is None
    assert entropy_trend([], [], floor=0.1) is None
    with pytest.raises(ValueError, match="2 values but entropy has 1"):
        entropy_trend([0, 1], [0.5], floor=0.1)


def test_tracker_stats_keys_and_thresholds():
    t = CollapseTracker(floor=0.05, min_points=3, window=5)
    assert t.stats() == {"collapse/points": 0.0}
    t.add(0, 1.0, 0.2)
    t.add(1, 0.9)                       # entropy only: trend, not fit
    assert t.stats() == {"collapse/points": 1.0}
    t.add(2, 0.8, 0.3)
    stats = t.stats()
    assert set(stats) == {"collapse/points", "collapse/entropy_slope", "collapse/floor_step"}
    assert stats["collapse/entropy_slope"] == pytest.approx(-0.1)
    assert stats["collapse/floor_step"] == pytest.approx(9.5)
    t.add(3, 0.6, 0.4)
    assert set(t.stats()) == set(COLLAPSE_STATS)
    assert t.stats()["collapse/points"] == 3.0
    a, b, rmse = ref_fit([1.0, 0.8, 0.6], [0.2, 0.3, 0.4])
    assert t.stats()["collapse/ceiling"] == pytest.approx(b - a)
    assert t.stats()["collapse/rmse"] == pytest.approx(rmse, abs=1e-12)


def test_window_smaller_than_min_points_still_reports_a_trend():
    t = CollapseTracker(floor=0.1, min_points=5, window=2)
    t.add(0, 1.0)
    assert t.trend is None
    t.add(1, 0.9)
    assert t.trend.slope == pytest.approx(-0.1) and t.trend.floor_step == pytest.approx(9.0)


def test_tracker_rejects_bad_input_and_loses_nothing():
    t = CollapseTracker(floor=0.05, min_points=2)
    t.add(0, 1.0, 0.2)
    t.add(1, 0.8, 0.3)
    t.add(2, 0.7, 0.35)
    before = t.stats()
    for args, match in [((3, float("nan"), 0.4), "entropy"), ((3, -1.0, 0.4), "entropy"),
                        ((3, 0.6, 1.2), "accuracy"), ((3, 0.6, float("nan")), "accuracy"),
                        ((2, 0.6, 0.4), "not after the last step 2"), ((-1, 0.6, 0.4), "step"),
                        ((3.5, 0.6, 0.4), "step"), ((3, None, 2.0), "accuracy")]:
        with pytest.raises(ValueError, match=match):
            t.add(*args)
        assert t.stats() == before
    with pytest.raises(ValueError, match="min_points"):
        CollapseTracker(floor=0.05, min_points=1)
    with pytest.raises(ValueError, match="floor"):
        CollapseTracker(floor=-1.0)


def test_replay_equals_live_tracking():
    rows = [(s, 1.2 * math.exp(-s / 10), (0.3 + 0.02 * s) if s % 3 == 0 else None) for s in range(30)]
    live = CollapseTracker(floor=0.05)
    for row in rows:
        live.add(*row)
    replayed = CollapseTracker(floor=0.05)
    replayed.extend(rows)
    assert replayed.stats() == live.stats()
    assert live.stats()["collapse/points"] == 10.0
