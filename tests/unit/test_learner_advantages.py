"""learner.advantages against float64 references written from the definitions (docs/algorithms.md 5)."""

import math
import statistics

import pytest
import torch

from learner.advantages import GRPO_EPS, broadcast_to_tokens, compute_advantages


def ref_grpo(r):
    if len(r) <= 1:
        return [0.0] * len(r)
    mean, std = statistics.fmean(r), statistics.stdev(r)     # stdev: N-1, as torch.std / verl
    return [(x - mean) / (std + GRPO_EPS) for x in r]


def ref_drgrpo(r):
    return [0.0] * len(r) if len(r) <= 1 else [x - statistics.fmean(r) for x in r]


def ref_rloo(r):
    # leave-one-out baseline: R_i - mean of the other members
    if len(r) <= 1:
        return [0.0] * len(r)
    return [x - sum(r[j] for j in range(len(r)) if j != i) / (len(r) - 1) for i, x in enumerate(r)]


REFS = {"grpo": ref_grpo, "drgrpo": ref_drgrpo, "rloo": ref_rloo}


@pytest.mark.parametrize("estimator", list(REFS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference_on_random_groups(estimator, dtype):
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        size = int(torch.randint(1, 17, (1,), generator=g))
        if trial % 3 == 0:     # binary / +-1 rewards like the verifiers, plus DAPO overlong shaping
            r = torch.randint(0, 2, (size,), generator=g).double() * 2 - 1
            r -= torch.rand(size, generator=g, dtype=torch.float64) * (trial % 2)
        else:
            r = torch.randn(size, generator=g, dtype=torch.float64) * 3
        out = compute_advantages(r.to(dtype), estimator)
        assert out.dtype == dtype and out.shape == (size,)
        ref = REFS[estimator](r.to(dtype).double().tolist())
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert out.double().tolist() == pytest.approx(ref, rel=tol, abs=tol)


@pytest.mark.parametrize("estimator", list(REFS))
def test_edge_groups(estimator):
    assert compute_advantages(torch.tensor([1.0]), estimator).tolist() == [0.0]       # one member
    assert compute_advantages(torch.zeros(0), estimator).tolist() == []                 # empty
    assert compute_advantages(torch.full((8,), 0.7), estimator).abs().max() < 1e-6      # all equal: zero
    two = compute_advantages(torch.tensor([1.0, 0.0]), estimator).tolist()
    expected = {"grpo": [0.5 / (math.sqrt(0.5) + 1e-6), -0.5 / (math.sqrt(0.5) + 1e-6)],
                "drgrpo": [0.5, -0.5], "rloo": [1.0, -1.0]}[estimator]
    assert two == pytest.approx(expected, rel=1e-6)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        compute_advantages(torch.tensor([1.0]), "grpo2")          # even for a one-member group
    with pytest.raises(ValueError, match="1-D"):
        compute_advantages(torch.zeros(2, 2), "grpo")
    with pytest.raises(ValueError, match="floating"):
        compute_advantages(torch.tensor([1, 0]), "grpo")
    with pytest.raises(ValueError, match=r"rewards\[1\] is not finite"):
        compute_advantages(torch.tensor([1.0, math.nan]), "grpo")
    with pytest.raises(ValueError, match="must both be"):
        broadcast_to_tokens(torch.tensor([1.0, 2.0]), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"lengths\[1\] is negative"):
        broadcast_to_tokens(torch.tensor([1.0, 2.0]), torch.tensor([1, -2]))


def test_broadcast_to_tokens_matches_packed_layout():
    adv = torch.tensor([0.5, -1.0, 2.0, 0.0])
    lengths = torch.tensor([3, 1, 0, 2], dtype=torch.int32)
    out = broadcast_to_tokens(adv, lengths)
    ref = [a for a, n in zip(adv.tolist(), lengths.tolist()) for _ in range(n)]
    assert out.tolist() == ref and out.shape == (6,)
