"""The linearity classification of `forkrl bench scaling` (cluster/tools/bench/scaling.py) against a float64
reference, and its edge cases. Nothing here is timed."""

import math

import numpy as np
import pytest

from cluster.tools.bench.scaling import TOLERANCE, growth, linear_prediction, linearity, tree_broadcast_model


def reference(xs, ys):
    """float64: the line through the origin and the smallest point, and measured / that line."""
    x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    k = int(np.argmin(x))
    line = y[k] / x[k] * x
    return line, y / line


@pytest.mark.parametrize("seed", range(20))
def test_prediction_and_ratio_match_a_float64_reference(seed):
    rng = np.random.default_rng(seed)
    xs = rng.permutation([1, 2, 4, 8, 16, 32, 64])[: rng.integers(2, 8)].tolist()   # any order
    ys = rng.uniform(1e-4, 1e3, len(xs)).tolist()
    line, ratio = reference(xs, ys)
    np.testing.assert_allclose(linear_prediction(xs, ys), line, rtol=1e-12)
    np.testing.assert_allclose(linearity(xs, ys), ratio, rtol=1e-12)
    assert linearity(xs, ys)[int(np.argmin(xs))] == 1.0


@pytest.mark.parametrize("seed", range(20))
def test_growth_agrees_with_the_reference_ratios(seed):
    """The label follows the reference: the largest x decides the side, the bend is the first x from which
    every larger x is off the line on that side."""
    rng = np.random.default_rng(100 + seed)
    xs = [1, 4, 16, 64]
    ys = (np.asarray(xs) * rng.uniform(0.3, 3.0, 4)).tolist()
    _, r = reference(xs, ys)
    label = growth(xs, ys)
    off = (r - 1) * np.sign(r[-1] - 1) > TOLERANCE
    if not off[-1]:
        assert label == "linear"
    else:
        k = len(xs) - 1
        while k > 1 and off[k - 1]:
            k -= 1
        side = "super" if r[-1] > 1 else "sub"
        assert label == f"{side}-linear, bends at {xs[k]}"


def test_growth_labels():
    xs = [1, 4, 16, 64]
    assert growth(xs, [2.0 * x for x in xs]) == "linear"
    assert growth(xs, [1.0, 4.2, 15.0, 66.0]) == "linear"                      # within the tolerance
    assert growth(xs, [1.0, 2.0, 16.0, 64.0]) == "linear"                      # off in the middle and back
    assert growth(xs, [100.0, 400.0, 800.0, 900.0]) == "sub-linear, bends at 16"   # throughput saturating
    assert growth(xs, [1.0, 4.0, 16.0, 200.0]) == "super-linear, bends at 64"
    assert growth(xs, [1.0, 16.0, 256.0, 4096.0]) == "super-linear, bends at 4"    # quadratic
    assert growth([64, 1, 16, 4], [900.0, 100.0, 800.0, 400.0]) == "sub-linear, bends at 16"   # any order
    assert growth([0.5, 1.5], [1.0, 2.0]) == "sub-linear, bends at 1.5"


def test_one_point():
    assert growth([8], [3.0]) == "one point"
    assert linear_prediction([8], [3.0]) == [3.0]
    assert linearity([8], [3.0]) == [1.0]


def test_equal_points():
    """Equal values: a flat cost is sub-linear from the second point; the same x twice is refused."""
    assert growth([1, 2, 4], [5.0, 5.0, 5.0]) == "sub-linear, bends at 2"
    assert linearity([1, 2, 4], [5.0, 5.0, 5.0]) == [1.0, 0.5, 0.25]
    with pytest.raises(ValueError, match="distinct"):
        growth([4, 4], [1.0, 1.0])


def test_zero_times():
    assert growth([1, 2, 4], [0.0, 0.0, 0.0]) == "linear"                      # 0 is on the line through 0
    assert linear_prediction([1, 2, 4], [0.0, 0.0, 0.0]) == [0.0, 0.0, 0.0]
    assert linearity([1, 2, 4], [0.0, 0.0, 3.0]) == [1.0, 1.0, math.inf]
    assert growth([1, 2, 4], [0.0, 0.0, 3.0]) == "super-linear, bends at 4"
    assert growth([1, 2, 4], [0.0, 1.0, 3.0]) == "super-linear, bends at 2"
    assert growth([1, 2, 4], [1.0, 0.0, 0.0]) == "sub-linear, bends at 2"


@pytest.mark.parametrize("xs, ys", [([], []), ([1, 2], [1.0]), ([0, 1], [1.0, 2.0]), ([-1, 1], [1.0, 2.0]),
                                    ([1, 2], [1.0, -1.0]), ([1, 2], [1.0, math.nan]), ([1, 2], [1.0, math.inf])])
def test_bad_input_is_refused(xs, ys):
    with pytest.raises(ValueError):
        growth(xs, ys)


def test_tree_broadcast_model():
    """gloo's binomial tree over n + 1 ranks takes ceil(log2(n + 1)) rounds."""
    ns = list(range(1, 40))
    assert tree_broadcast_model(ns, 1.0) == [float(math.ceil(math.log2(n + 1))) for n in ns]
    assert tree_broadcast_model([1, 2, 4], 0.25) == [0.25, 0.5, 0.75]
    assert tree_broadcast_model([1, 4], 0.0) == [0.0, 0.0]
