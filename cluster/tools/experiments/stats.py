"""Statistics across seeds: the seed mean's confidence interval, Welch's and the paired t-test of a difference
of means, Hedges' g, `compare` (which test applies to two arms' per-seed values) and `verdict` (a paper's
claim against that comparison). Pure functions of lists of floats; non-finite values are dropped first.

Degenerate cases, defined rather than left to 0/0:
- fewer than two values in an arm (or fewer than two pairs): CI, t, df and p are NaN, and every verdict is
  inconclusive;
- no spread (every value of both arms the same constant, or for the paired test every difference the same):
  the difference is known exactly, so its CI is [diff, diff] and p = 1 if diff == 0 (t = 0) else p = 0
  (t = +-inf); df is NaN for Welch (Welch-Satterthwaite is 0/0), n - 1 for the paired test. An arm whose values
  are all equal has mean exactly that value and variance exactly 0, so equal constants compare equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, NamedTuple

import numpy as np
from scipy import stats as st

ALPHA = 0.05


def _finite(vals: Iterable[float]) -> np.ndarray:
    v = np.asarray([float(x) for x in vals], dtype=np.float64)
    return v[np.isfinite(v)]


def _mean_var(v: np.ndarray) -> tuple[float, float]:
    """Mean and unbiased variance (n >= 2); exactly (v[0], 0) for a constant array, free of rounding."""
    if np.ptp(v) == 0:
        return float(v[0]), 0.0
    return float(v.mean()), float(v.var(ddof=1))


def mean_ci(vals: Iterable[float], level: float = 0.95) -> tuple[float, float, float, int]:
    """(mean, low, high, n): Student-t interval of the mean of the finite values; NaN bounds for n < 2."""
    v = _finite(vals)
    n = int(v.size)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    if n == 1:
        return float(v[0]), math.nan, math.nan, 1
    m, var = _mean_var(v)
    h = float(st.t.ppf(0.5 + level / 2, n - 1)) * math.sqrt(var / n)
    return m, m - h, m + h, n


class TTest(NamedTuple):
    diff: float   # mean(a) - mean(b) (Welch) or mean(a_i - b_i) (paired)
    low: float    # the difference's confidence interval
    high: float
    t: float
    df: float
    p: float      # two-sided


def _t_test(diff: float, se: float, df: float, level: float) -> TTest:
    if se == 0:
        return TTest(diff, diff, diff, 0.0 if diff == 0 else math.copysign(math.inf, diff), df,
                     1.0 if diff == 0 else 0.0)
    t = diff / se
    h = float(st.t.ppf(0.5 + level / 2, df)) * se
    return TTest(diff, diff - h, diff + h, t, df, float(2 * st.t.sf(abs(t), df)))


def welch(a: Iterable[float], b: Iterable[float], level: float = 0.95) -> TTest:
    """Welch's unequal-variance t-test of mean(a) - mean(b), Welch-Satterthwaite degrees of freedom."""
    a, b = _finite(a), _finite(b)
    if a.size == 0 or b.size == 0:
        return TTest(*[math.nan] * 6)
    if a.size < 2 or b.size < 2:
        return TTest(float(a.mean() - b.mean()), *[math.nan] * 5)
    (ma, va), (mb, vb) = _mean_var(a), _mean_var(b)
    sa, sb = va / a.size, vb / b.size
    df = (sa + sb) ** 2 / (sa ** 2 / (a.size - 1) + sb ** 2 / (b.size - 1)) if sa + sb > 0 else math.nan
    return _t_test(ma - mb, math.sqrt(sa + sb), df, level)


def paired(a: Iterable[float], b: Iterable[float], level: float = 0.95) -> TTest:
    """Paired t-test of mean(a_i - b_i), a_i and b_i from the same seed; a pair with a non-finite value is
    dropped."""
    a, b = np.asarray(list(a), dtype=np.float64), np.asarray(list(b), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need the same length, got {a.size} and {b.size}")
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    if d.size < 2:
        return TTest(float(d.mean()) if d.size else math.nan, *[math.nan] * 5)
    m, var = _mean_var(d)
    return _t_test(m, math.sqrt(var / d.size), float(d.size - 1), level)


def hedges_g(a: Iterable[float], b: Iterable[float]) -> float:
    """(mean(a) - mean(b)) / pooled SD, times Hedges' exact small-sample correction
    J(df) = Gamma(df/2) / (sqrt(df/2) Gamma((df-1)/2)), df = n_a + n_b - 2. NaN if an arm has < 2 values;
    0 / +-inf when the pooled SD is 0 and the means are equal / differ."""
    a, b = _finite(a), _finite(b)
    if a.size < 2 or b.size < 2:
        return math.nan
    (ma, va), (mb, vb) = _mean_var(a), _mean_var(b)
    df = a.size + b.size - 2
    sp = math.sqrt(((a.size - 1) * va + (b.size - 1) * vb) / df)
    if sp == 0:
        return 0.0 if ma == mb else math.copysign(math.inf, ma - mb)
    j = math.exp(math.lgamma(df / 2) - math.lgamma((df - 1) / 2)) / math.sqrt(df / 2)
    return j * (ma - mb) / sp


@dataclass(frozen=True)
class Comparison:
    test: str                  # "paired t" or "Welch t"
    diff: float                # arm a minus arm b
    ci: tuple[float, float]    # 95% CI of diff
    p: float                   # two-sided; NaN when an arm has < 2 seeds
    g: float                   # Hedges' g
    n_a: int
    n_b: int


def compare(a_by_seed: dict[int, float], b_by_seed: dict[int, float]) -> Comparison:
    """Arm a against arm b from their per-seed values: the paired t-test when, after dropping non-finite
    values, both arms have the same seeds (at least two: the same seed gives both arms the same start and data
    order, so pairing removes that shared noise), else Welch's t-test on all values."""
    a = {s: float(v) for s, v in a_by_seed.items() if math.isfinite(v)}
    b = {s: float(v) for s, v in b_by_seed.items() if math.isfinite(v)}
    if set(a) == set(b) and len(a) >= 2:
        seeds = sorted(a)
        r, test = paired([a[s] for s in seeds], [b[s] for s in seeds]), "paired t"
    else:
        r, test = welch(list(a.values()), list(b.values())), "Welch t"
    return Comparison(test, r.diff, (r.low, r.high), r.p, hedges_g(list(a.values()), list(b.values())),
                      len(a), len(b))


def verdict(c: Comparison, expect: str, tol: float = 0.05) -> str:
    """A claim's verdict from the comparison of its arm against its base (p two-sided, alpha = 0.05).

    expect higher / lower: "agrees" if p < 0.05 with the difference in the expected direction, "does not agree"
    if p < 0.05 the other way, else "inconclusive".
    expect equal: "does not agree" if p < 0.05; otherwise "agrees" if the difference's 95% CI lies within
    +-tol (absolute, in the metric's units), else "inconclusive (no difference detected; CI [lo, hi])": not
    finding a difference is not evidence of none unless the interval excludes any difference larger than tol.
    p NaN (an arm with fewer than two seeds): "inconclusive (fewer than two seeds in an arm)".
    """
    if expect not in ("higher", "lower", "equal"):
        raise ValueError(f"expect must be higher, lower or equal, got {expect!r}")
    if not math.isfinite(c.p):
        return "inconclusive (fewer than two seeds in an arm)"
    significant = c.p < ALPHA
    if expect == "equal":
        if significant:
            return "does not agree"
        lo, hi = c.ci
        if -tol <= lo and hi <= tol:
            return "agrees"
        return f"inconclusive (no difference detected; CI [{lo:+.3f}, {hi:+.3f}])"
    if not significant:
        return "inconclusive"
    return "agrees" if (c.diff > 0) == (expect == "higher") else "does not agree"
