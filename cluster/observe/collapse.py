"""Entropy-collapse tracker: pure math, no I/O (Cui et al. 2505.22617; docs/algorithms.md 2.2).

Two estimates, both updated online, once per RL step:

- The empirical law R = -a * exp(H) + b between policy entropy H (nats) and eval accuracy R (a ratio),
  fitted by ordinary least squares of R on x = exp(H) over every (H, R) pair seen so far. The model is
  linear in (a, b) given x, so OLS is exact; the paper does not publish its fitting routine. `b - a` is the
  predicted accuracy ceiling, reached when entropy is exhausted (H = 0).
- The entropy trend: the least-squares slope of H against the step number over the last `window` steps,
  and the step at which that line reaches `floor` ("at the current rate, entropy hits the floor at step
  t*"). Collapse is fastest early (Cui et al.: 73% of the entropy drop in the first ~200 steps), so a
  whole-run slope would lag: the window keeps the estimate current.

Both use centred co-moments (Welford) rather than raw power sums: exp(H) is up to ~V for a uniform policy
and raw sums of squares lose every significant digit of the small differences the slope depends on.
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# A slope is undefined when the abscissae do not vary: below this relative spread we call them equal.
_REL_EPS = 1e-12


class _CoMoments:
    """Running means and centred second moments of (x, y): Welford's update, exact for any order."""

    __slots__ = ("n", "mx", "my", "cxx", "cxy", "cyy")

    def __init__(self) -> None:
        self.n = 0
        self.mx = self.my = self.cxx = self.cxy = self.cyy = 0.0

    def add(self, x: float, y: float) -> None:
        self.n += 1
        dx = x - self.mx
        self.mx += dx / self.n
        dy = y - self.my
        self.my += dy / self.n
        # (x - old mean) * (y - new mean): the standard one-pass co-moment update.
        self.cxx += dx * (x - self.mx)
        self.cxy += dx * (y - self.my)
        self.cyy += dy * (y - self.my)

    def line(self) -> tuple[float, float, float] | None:
        """(slope, intercept, sum of squared residuals) of y on x, or None when x does not vary."""
        if self.n < 2 or self.cxx <= (_REL_EPS * max(abs(self.mx), 1.0)) ** 2 * self.n:
            return None
        slope = self.cxy / self.cxx
        sse = max(self.cyy - slope * self.cxy, 0.0)   # rounding can push an exact fit slightly below 0
        return slope, self.my - slope * self.mx, sse


@dataclass(frozen=True)
class CollapseFit:
    """R = -a * exp(H) + b fitted over `points` (H, R) pairs; `rmse` in accuracy units."""

    a: float
    b: float
    rmse: float
    points: int

    @property
    def ceiling(self) -> float:
        """Predicted accuracy at H = 0: b - a."""
        return self.b - self.a

    def predict(self, entropy: float) -> float:
        return -self.a * math.exp(entropy) + self.b


@dataclass(frozen=True)
class EntropyTrend:
    """Least-squares line H = intercept + slope * step over the last `points` steps."""

    slope: float          # nats per step; negative while entropy falls
    floor_step: float     # step at which the line reaches the floor; +inf when entropy is not falling
    points: int


def _check_entropy(h: float, what: str) -> float:
    h = float(h)
    if not math.isfinite(h) or h < 0:
        raise ValueError(f"{what} must be a finite entropy >= 0 nats, got {h!r}")
    return h


def _check_accuracy(r: float, what: str) -> float:
    r = float(r)
    if not math.isfinite(r) or not 0.0 <= r <= 1.0:
        raise ValueError(f"{what} must be an accuracy in [0, 1], got {r!r}")
    return r


def _check_exp(h: float, what: str) -> float:
    try:
        return math.exp(h)
    except OverflowError:
        raise ValueError(f"{what} = {h!r} nats is too large for exp(H); entropies are below log(vocab)") from None


def fit_collapse(entropy: Sequence[float], accuracy: Sequence[float]) -> CollapseFit:
    """OLS fit of R = -a exp(H) + b. entropy [n] nats, accuracy [n] ratios; needs two distinct entropies."""
    if len(entropy) != len(accuracy):
        raise ValueError(f"entropy has {len(entropy)} values but accuracy has {len(accuracy)}")
    m = _CoMoments()
    for i, (h, r) in enumerate(zip(entropy, accuracy)):
        x = _check_exp(_check_entropy(h, f"entropy[{i}]"), f"entropy[{i}]")
        m.add(x, _check_accuracy(r, f"accuracy[{i}]"))
    fit = _fit_from(m)
    if fit is None:
        raise ValueError(f"cannot fit R = -a exp(H) + b: need at least two distinct entropies, got {len(entropy)} "
                         "points")
    return fit


def _fit_from(m: _CoMoments) -> CollapseFit | None:
    line = m.line()
    if line is None:
        return None
    slope, intercept, sse = line
    return CollapseFit(a=-slope, b=intercept, rmse=math.sqrt(sse / m.n), points=m.n)


def entropy_trend(steps: Sequence[float], entropy: Sequence[float], floor: float) -> EntropyTrend | None:
    """Least-squares slope of entropy [n] on steps [n] and the step where the line reaches `floor`.

    None when fewer than two distinct steps are given.
    """
    if len(steps) != len(entropy):
        raise ValueError(f"steps has {len(steps)} values but entropy has {len(entropy)}")
    m = _CoMoments()
    for i, (s, h) in enumerate(zip(steps, entropy)):
        if not math.isfinite(float(s)):
            raise ValueError(f"steps[{i}] must be finite, got {s!r}")
        m.add(float(s), _check_entropy(h, f"entropy[{i}]"))
    line = m.line()
    if line is None:
        return None
    slope, intercept, _ = line
    floor_step = (floor - intercept) / slope if slope < 0 else math.inf
    return EntropyTrend(slope=slope, floor_step=floor_step, points=m.n)


class CollapseTracker:
    """Online collapse tracker fed once per RL step; `stats()` gives its canonical StepStats keys.

    Pairs for the R-H fit are added only when a step carries both an entropy and an eval accuracy (eval
    steps); entropies alone feed the trend. Invalid input raises ValueError naming the field and leaves the
    tracker unchanged.
    """

    def __init__(self, floor: float, min_points: int = 3, window: int = 20) -> None:
        if min_points < 2:
            raise ValueError(f"min_points must be >= 2, got {min_points}")
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        self.floor = _check_entropy(floor, "floor")
        self.min_points = min_points
        self._fit = _CoMoments()
        self._recent: deque[tuple[int, float]] = deque(maxlen=window)

    def add(self, step: int, entropy: float | None, accuracy: float | None = None) -> None:
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        step = int(step)
        if entropy is None:
            if accuracy is not None:
                _check_accuracy(accuracy, "accuracy")
            return
        h = _check_entropy(entropy, "entropy")
        x = _check_exp(h, "entropy")
        r = None if accuracy is None else _check_accuracy(accuracy, "accuracy")
        if self._recent and step <= self._recent[-1][0]:
            raise ValueError(f"step {step} is not after the last step {self._recent[-1][0]} the tracker saw")
        self._recent.append((step, h))
        if r is not None:
            self._fit.add(x, r)

    def extend(self, rows: Iterable[tuple[int, float | None, float | None]]) -> None:
        """Replay (step, entropy, accuracy) rows, e.g. a resumed run's metrics history."""
        for step, h, r in rows:
            self.add(step, h, r)

    @property
    def fit(self) -> CollapseFit | None:
        """The R-H fit, or None before `min_points` pairs with two distinct entropies."""
        return _fit_from(self._fit) if self._fit.n >= self.min_points else None

    @property
    def trend(self) -> EntropyTrend | None:
        """The entropy trend over the window, or None before min(`min_points`, window) steps."""
        if len(self._recent) < min(self.min_points, self._recent.maxlen):
            return None
        steps, hs = zip(*self._recent)
        return entropy_trend(steps, hs, self.floor)

    def stats(self) -> dict[str, float]:
        """Canonical `collapse/*` StepStats keys (cluster.observe.metrics); a key is absent while undefined."""
        out = {"collapse/points": float(self._fit.n)}
        fit = self.fit
        if fit is not None:
            out.update({"collapse/a": fit.a, "collapse/b": fit.b, "collapse/ceiling": fit.ceiling,
                        "collapse/rmse": fit.rmse})
        trend = self.trend
        if trend is not None:
            out.update({"collapse/entropy_slope": trend.slope, "collapse/floor_step": trend.floor_step})
        return out
