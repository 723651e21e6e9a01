"""cluster/tools/experiments/stats.py against float64 references written from the formulas: means and variances
by math.fsum loops, Welch-Satterthwaite and paired degrees of freedom by hand, and the Student-t tail from the
power series of the regularized incomplete beta function (no scipy), plus the defined edge cases.

Tolerances are bounds on float64 rounding, not fitted numbers:
- a mean or variance of n values carries at most ~n ulps of its terms' magnitude, and t, df, g combine a handful
  of such sums: |error| <= 8 n eps relative to the magnitudes that enter (the means' size for a difference);
- a t tail evaluated in log space (by the reference here and by scipy alike) rounds each log-space term, whose
  magnitude L is (nu+1)/2 log(1 + t^2/nu) plus the log-gammas; each evaluation is within 2 (8 + L) eps
  relative, times the cancellation factor of the 1 - I complement branch (measured <= 1.6 (8 + L) eps for
  both against 40-digit arithmetic when this was written);
- an error dt in t moves a two-sided p by 2 f(t) dt (f the t density).
"""

import math

import numpy as np
import pytest

from cluster.tools.experiments.stats import Comparison, compare, hedges_g, mean_ci, paired, verdict, welch

EPS = float(np.finfo(np.float64).eps)


# ------------------------------------------------------------------------------------------- reference

def _ibeta_series(x: float, one_minus_x: float, a: float, b: float) -> float:
    """I_x(a, b) = x^a (1-x)^b / (a B(a, b)) * sum_n (a+b)_n / (a+1)_n x^n: positive terms, summed exactly."""
    terms, term, n = [], 1.0, 0
    while not terms or term > 1e-17 * terms[0]:
        terms.append(term)
        term *= (a + b + n) / (a + 1 + n) * x
        n += 1
    log_pre = (a * math.log(x) + b * math.log(one_minus_x) - math.log(a)
               - math.lgamma(a) - math.lgamma(b) + math.lgamma(a + b))
    return math.exp(log_pre) * math.fsum(terms)


def t_two_sided(t: float, nu: float) -> tuple[float, float]:
    """(P(|T| > |t|) for T ~ Student t with nu degrees of freedom, its rounding bound): I_z(nu/2, 1/2) with
    z = nu / (nu + t^2), the series taken on whichever side of the mean of Beta it converges fast, the other
    side as the complement."""
    t = abs(t)
    if t == 0:
        return 1.0, 0.0
    z, w = nu / (nu + t * t), t * t / (nu + t * t)      # z and 1 - z, each without cancellation
    a, b = nu / 2, 0.5
    if z <= (a + 1) / (a + b + 2):
        p, amplification = _ibeta_series(z, w, a, b), 1.0
    else:
        q = _ibeta_series(w, z, b, a)
        p, amplification = 1 - q, 1 + q / (1 - q)
    L = (nu + 1) / 2 * math.log1p(t * t / nu) + abs(math.lgamma(a)) + abs(math.lgamma(a + b))
    return p, 4 * (8 + L) * EPS * amplification * p   # two evaluations (this one and the code's), 2 (8 + L) each


def t_density(x: float, nu: float) -> float:
    return math.exp(math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
                    - (nu + 1) / 2 * math.log1p(x * x / nu))


def moments(v: list[float]) -> tuple[float, float]:
    m = math.fsum(v) / len(v)
    return m, math.fsum((x - m) ** 2 for x in v) / (len(v) - 1)


def check_p(p: float, t: float, nu: float):
    ref, tol = t_two_sided(t, nu)
    assert abs(p - ref) <= tol, (p, ref, tol, t, nu)


def check_ci(low: float, high: float, centre: float, se: float, nu: float, level: float, n: int, scale: float):
    """The interval is centre +- q se where q is the t quantile of `level`: the two-sided p at q is 1 - level."""
    assert abs((low + high) / 2 - centre) <= 8 * n * EPS * scale + 4 * EPS * (high - low)
    q = (high - low) / 2 / se
    ref, tol = t_two_sided(q, nu)
    assert abs(ref - (1 - level)) <= tol + 2 * t_density(q, nu) * q * 8 * n * EPS, (q, nu, ref)


def samples(rng, n: int) -> list[float]:
    return list(rng.normal(rng.uniform(-1, 1), 10 ** rng.uniform(-2, 0.5), n))


# ------------------------------------------------------------------------------------------- vs reference

def test_mean_ci_matches_the_student_t_interval():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, level = int(rng.integers(2, 16)), float(rng.choice([0.9, 0.95, 0.99]))
        v = samples(rng, n)
        m, lo, hi, k = mean_ci(v, level)
        ref_m, var = moments(v)
        scale = max(abs(x) for x in v)
        assert k == n and abs(m - ref_m) <= n * EPS * scale
        check_ci(lo, hi, ref_m, math.sqrt(var / n), n - 1, level, n, scale)


def test_welch_matches_the_formulas():
    rng = np.random.default_rng(1)
    for _ in range(300):
        a, b = samples(rng, int(rng.integers(2, 13))), samples(rng, int(rng.integers(2, 13)))
        r = welch(a, b)
        (ma, va), (mb, vb) = moments(a), moments(b)
        sa, sb = va / len(a), vb / len(b)
        se, n = math.sqrt(sa + sb), len(a) + len(b)
        df = (sa + sb) ** 2 / (sa ** 2 / (len(a) - 1) + sb ** 2 / (len(b) - 1))
        scale = abs(ma) + abs(mb)
        assert abs(r.diff - (ma - mb)) <= 8 * n * EPS * scale
        assert abs(r.t - (ma - mb) / se) <= 8 * n * EPS * (abs(r.t) + scale / se)
        assert abs(r.df - df) <= 8 * n * EPS * df
        assert min(len(a), len(b)) - 1 <= r.df <= n - 2        # Welch-Satterthwaite's range
        check_p(r.p, r.t, r.df)
        check_ci(r.low, r.high, ma - mb, se, df, 0.95, n, scale)


def test_paired_matches_the_formulas_and_beats_welch_on_shared_seed_noise():
    rng = np.random.default_rng(2)
    wins = 0
    for _ in range(200):
        n = int(rng.integers(2, 13))
        shared = rng.normal(0, 0.1, n)                       # what one seed does to both arms
        a = list(shared + 0.02 + rng.normal(0, 0.01, n))
        b = list(shared + rng.normal(0, 0.01, n))
        r = paired(a, b)
        d = [x - y for x, y in zip(a, b)]
        md, vd = moments(d)
        se, scale = math.sqrt(vd / n), max(abs(x) for x in a + b)
        assert abs(r.diff - md) <= 8 * n * EPS * scale
        assert abs(r.t - md / se) <= 8 * n * EPS * (abs(r.t) + scale / se)
        assert r.df == n - 1
        check_p(r.p, r.t, n - 1)
        check_ci(r.low, r.high, md, se, n - 1, 0.95, n, scale)
        wins += r.p < welch(a, b).p
    assert wins >= 190       # pairing removes the shared noise: it must be the more sensitive test here


def test_hedges_g_matches_the_formula():
    rng = np.random.default_rng(3)
    for _ in range(200):
        a, b = samples(rng, int(rng.integers(2, 13))), samples(rng, int(rng.integers(2, 13)))
        (ma, va), (mb, vb) = moments(a), moments(b)
        df = len(a) + len(b) - 2
        sp = math.sqrt(((len(a) - 1) * va + (len(b) - 1) * vb) / df)
        j = math.gamma(df / 2) / (math.sqrt(df / 2) * math.gamma((df - 1) / 2))
        ref = j * (ma - mb) / sp
        n = len(a) + len(b)
        tol = 8 * EPS * (n * (abs(ref) + (abs(ma) + abs(mb)) / sp) + abs(ref) * abs(math.lgamma(df / 2)))
        assert abs(hedges_g(a, b) - ref) <= tol


# ------------------------------------------------------------------------------------------- compare

def test_compare_pairs_by_seed_when_both_arms_ran_the_same_seeds():
    a = {0: 0.50, 1: 0.40, 2: 0.61, 3: 0.47}
    b = {3: 0.44, 1: 0.39, 0: 0.45, 2: 0.58}                 # other order: matched by seed, not by position
    c = compare(a, b)
    ref = paired([a[s] for s in range(4)], [b[s] for s in range(4)])
    assert c.test == "paired t" and (c.n_a, c.n_b) == (4, 4)
    d = [a[s] - b[s] for s in range(4)]
    md, vd = moments(d)
    check_p(c.p, md / math.sqrt(vd / 4), 3)
    assert c.diff == ref.diff and c.ci == (ref.low, ref.high) and c.g == hedges_g(list(a.values()), list(b.values()))


def test_compare_falls_back_to_welch_and_drops_non_finite_values():
    a, b = {0: 0.5, 1: 0.4, 2: 0.6}, {0: 0.45, 1: 0.35, 3: 0.5}
    c = compare(a, b)
    assert c.test == "Welch t" and c.p == welch([0.5, 0.4, 0.6], [0.45, 0.35, 0.5]).p
    c = compare({0: 0.5, 1: math.nan, 2: 0.6}, {0: 0.45, 1: 0.35, 2: 0.5})   # seed 1 failed in arm a
    w = welch([0.5, 0.6], [0.45, 0.35, 0.5])
    assert (c.test, c.n_a, c.n_b, c.p, c.diff) == ("Welch t", 2, 3, w.p, w.diff)
    assert compare({0: 0.5, 1: 0.4}, {1: 0.3, 2: 0.2}).test == "Welch t"     # one common seed: no pairing


# ------------------------------------------------------------------------------------------- edge cases

def test_too_few_seeds_give_nan_and_an_inconclusive_verdict():
    m, lo, hi, n = mean_ci([])
    assert n == 0 and all(math.isnan(x) for x in (m, lo, hi))
    m, lo, hi, n = mean_ci([0.3, math.nan, math.inf])
    assert (m, n) == (0.3, 1) and math.isnan(lo) and math.isnan(hi)
    assert mean_ci([1.0, math.nan, 3.0, -math.inf]) == mean_ci([1.0, 3.0])
    r = welch([0.5], [0.4, 0.6])
    assert r.diff == pytest.approx(0.0) and all(math.isnan(x) for x in (r.low, r.high, r.t, r.df, r.p))
    assert math.isnan(paired([0.5, math.nan], [0.4, 0.3]).p) and math.isnan(hedges_g([0.5], [0.4, 0.6]))
    with pytest.raises(ValueError, match="same length"):
        paired([0.5, 0.4], [0.4])
    c = compare({0: 0.5}, {0: 0.1})
    assert math.isnan(c.p) and c.test == "Welch t"
    for expect in ("higher", "lower", "equal"):
        assert verdict(c, expect).startswith("inconclusive")


def test_zero_variance_is_exact():
    for test in (welch, paired):
        r = test([0.1] * 3, [0.1] * 3)
        assert (r.diff, r.low, r.high, r.t, r.p) == (0.0, 0.0, 0.0, 0.0, 1.0)
    r = welch([0.1] * 3, [0.1] * 5)      # equal constants: equal means although fsum-free means could differ
    assert (r.diff, r.p) == (0.0, 1.0) and math.isnan(r.df)
    r = welch([0.3] * 3, [0.1] * 4)
    assert r.p == 0.0 and r.t == math.inf and r.low == r.high == r.diff == 0.3 - 0.1
    r = paired([0.5, 0.75, 1.0], [0.25, 0.5, 0.75])   # the same difference on every seed, exactly
    assert (r.diff, r.p, r.t, r.df) == (0.25, 0.0, math.inf, 2.0)
    assert hedges_g([0.2] * 3, [0.2] * 3) == 0.0 and hedges_g([0.1] * 3, [0.2] * 3) == -math.inf
    r = welch([0.2] * 4, [0.1, 0.2, 0.3])             # one arm constant: df is the other arm's n - 1
    assert r.df == pytest.approx(2.0, rel=1e-14) and r.diff == pytest.approx(0.0, abs=1e-16)
    c = compare({0: 0.3, 1: 0.3}, {0: 0.3, 1: 0.3})
    assert c.p == 1.0 and verdict(c, "equal") == "agrees"


# ------------------------------------------------------------------------------------------- verdict

def cmp(diff: float, lo: float, hi: float, p: float) -> Comparison:
    return Comparison("Welch t", diff, (lo, hi), p, 0.0, 3, 3)


@pytest.mark.parametrize("c, expect, want", [
    (cmp(0.1, 0.02, 0.18, 0.01), "higher", "agrees"),
    (cmp(0.1, 0.02, 0.18, 0.01), "lower", "does not agree"),
    (cmp(-0.1, -0.18, -0.02, 0.01), "lower", "agrees"),
    (cmp(-0.1, -0.18, -0.02, 0.01), "higher", "does not agree"),
    (cmp(0.1, -0.01, 0.21, 0.07), "higher", "inconclusive"),
    (cmp(0.1, 0.0, 0.2, 0.05), "higher", "inconclusive"),             # p < 0.05 is strict
    (cmp(0.1, 0.02, 0.18, 0.01), "equal", "does not agree"),
    (cmp(0.001, 0.0001, 0.002, 0.01), "equal", "does not agree"),     # significant, however small
    (cmp(0.01, -0.04, 0.05, 0.5), "equal", "agrees"),                 # CI within +-0.05
    (cmp(0.01, -0.06, 0.08, 0.7), "equal", "inconclusive (no difference detected; CI [-0.060, +0.080])"),
    (cmp(0.1, math.nan, math.nan, math.nan), "equal", "inconclusive (fewer than two seeds in an arm)"),
])
def test_verdict_rule(c, expect, want):
    assert verdict(c, expect) == want


def test_verdict_refuses_an_unknown_expectation():
    with pytest.raises(ValueError, match="higher, lower or equal"):
        verdict(cmp(0.1, 0.0, 0.2, 0.01), "bigger")
