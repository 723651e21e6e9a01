"""Skywork-OR1 adaptive entropy controller against a hand-rolled loop of the published rule."""

import math

import pytest

from cluster.config import AlgorithmConfig
from learner.entropy_control import EntropyControl, controller_entropy, initial_control, update_control


def reference(entropies, c0, target, delta, lo, hi):
    """alpha used at each step k = 0..len: alpha_0 = c_0; alpha_{k+1} = c_{k+1} * 1[e_k < target]."""
    c, alphas = c0, [c0]
    for e in entropies:
        c = min(max(c + delta if e < target else c - delta, lo), hi)
        alphas.append(c if e < target else 0.0)
    return alphas


def test_follows_the_rule_with_clipping_at_both_bounds():
    cfg = AlgorithmConfig(adaptive_entropy=True, entropy_target=0.2, entropy_delta=1e-3, entropy_coef_min=0.0,
                          entropy_coef_max=3.5e-3, entropy_coef=0.0)
    # below target for long enough to hit c_max, then above it long enough to hit c_min, then oscillate
    entropies = [0.1] * 6 + [0.5] * 6 + [0.19, 0.21, 0.2, 0.05]
    state = initial_control(cfg)
    alphas = [state.alpha]
    for e in entropies:
        state = update_control(state, e, cfg)
        alphas.append(state.alpha)
    ref = reference(entropies, 0.0, 0.2, 1e-3, 0.0, 3.5e-3)
    assert alphas == pytest.approx(ref, abs=1e-15)
    assert max(alphas) == 3.5e-3 and alphas[12] == 0.0
    assert update_control(EntropyControl(0.0, True), 0.2, cfg) == EntropyControl(0.0, False)   # e == target: off


def test_initial_state_and_estimator_choice():
    cfg = AlgorithmConfig(entropy_coef=2e-3, adaptive_entropy=True)
    assert initial_control(cfg) == EntropyControl(2e-3, True) and initial_control(cfg).alpha == 2e-3
    assert EntropyControl(2e-3, False).alpha == 0.0
    summary = {"entropy/sampled": 0.31, "entropy/mean": 0.55}
    assert controller_entropy(summary, cfg) == 0.31      # released Skywork code: -mean(old logprob)
    assert controller_entropy(summary, AlgorithmConfig(entropy_estimator="full")) == 0.55
    with pytest.raises(ValueError, match="entropy/mean"):
        controller_entropy({"entropy/sampled": 0.3}, AlgorithmConfig(entropy_estimator="full"))


def test_non_finite_entropy_is_rejected():
    cfg = AlgorithmConfig(adaptive_entropy=True)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="not finite"):
            update_control(initial_control(cfg), bad, cfg)
