"""learner.masks against a slow reference: python sort by (-entropy, position) over the valid tokens."""

import math
from decimal import Decimal

import pytest
import torch

from learner.masks import forking_mask, selected_count, top_count


def ref_k(n: int, rho: float) -> int:
    # decimal arithmetic on the rho the user wrote: 0.7 * 10 is exactly 7
    return 0 if n == 0 else min(n, max(1, math.ceil(Decimal(repr(rho)) * n)))


def ref_mask(entropy: list[float], valid: list[bool], rho: float, variant: str) -> tuple[list[bool], float]:
    idx = [i for i in range(len(entropy)) if valid[i]]
    order = sorted(idx, key=lambda i: (-entropy[i], i))
    k = ref_k(len(idx), rho)
    chosen = set(order[:k] if variant == "top" else order[k:])
    tau = entropy[order[k - 1]] if k else math.nan
    return [i in chosen for i in range(len(entropy))], tau


@pytest.mark.parametrize("rho,n,k", [(0.7, 10, 7), (0.07, 100, 7), (0.28, 100, 28), (0.14, 50, 7), (0.2, 10, 2),
                                     (0.2, 11, 3), (0.2, 5, 1), (1e-9, 1000, 1), (1.0, 37, 37), (0.5, 1, 1),
                                     (0.3, 0, 0), (0.1, 30, 3), (0.35, 20, 7)])
def test_top_count(rho, n, k):
    assert top_count(n, rho) == k == ref_k(n, rho)


@pytest.mark.parametrize("rho", [0.0, -0.1, 1.5, float("nan")])
def test_rho_out_of_range(rho):
    with pytest.raises(ValueError, match="top_entropy_ratio"):
        top_count(10, rho)


@pytest.mark.parametrize("variant", ["top", "bottom"])
def test_matches_reference_with_ties_and_padding(variant):
    g = torch.Generator().manual_seed(0)
    for trial in range(150):
        n = int(torch.randint(1, 60, (1,), generator=g))
        # few distinct values: many ties, including ties across the threshold
        levels = int(torch.randint(1, 6, (1,), generator=g))
        entropy = torch.randint(0, levels, (n,), generator=g).float() * 0.25
        valid = torch.rand(n, generator=g) < (0.3 if trial % 3 == 0 else 1.0)   # heavy padding
        rho = [0.2, 0.5, 0.01, 1.0, 0.33][trial % 5]
        mask, tau = forking_mask(entropy, rho, variant, valid=valid)
        ref, ref_tau = ref_mask(entropy.tolist(), valid.tolist(), rho, variant)
        assert mask.tolist() == ref
        assert (math.isnan(tau) and math.isnan(ref_tau)) or tau == ref_tau
        assert int(mask.sum()) == selected_count(int(valid.sum()), rho, variant)


def test_rho_one_selects_every_valid_token_and_tiny_rho_one():
    entropy = torch.rand(40)
    valid = torch.arange(40) % 4 != 0
    assert forking_mask(entropy, 1.0, valid=valid)[0].tolist() == valid.tolist()
    mask, tau = forking_mask(entropy, 1e-6, valid=valid)
    best = int(torch.where(valid, entropy, -1.0).argmax())
    assert mask.nonzero().flatten().tolist() == [best] and tau == float(entropy[best])


def test_equal_entropies_pick_earliest_positions():
    mask, tau = forking_mask(torch.full((10,), 0.5), 0.3)
    assert mask.nonzero().flatten().tolist() == [0, 1, 2] and tau == 0.5
    assert forking_mask(torch.full((10,), 0.5), 0.3, "bottom")[0].nonzero().flatten().tolist() == list(range(3, 10))


def test_bottom_is_exact_complement_of_top():
    entropy = torch.randint(0, 3, (101,)).float()
    top, tau_top = forking_mask(entropy, 0.2)
    bottom, tau_bottom = forking_mask(entropy, 0.2, "bottom")
    assert not (top & bottom).any() and (top | bottom).all() and tau_top == tau_bottom


def test_random_variant_is_seeded_exact_and_uniform():
    entropy = torch.rand(200)
    valid = torch.arange(200) % 5 != 0
    m1, _ = forking_mask(entropy, 0.2, "random", valid=valid, generator=torch.Generator().manual_seed(7))
    m2, _ = forking_mask(entropy, 0.2, "random", valid=valid, generator=torch.Generator().manual_seed(7))
    m3, _ = forking_mask(entropy, 0.2, "random", valid=valid, generator=torch.Generator().manual_seed(8))
    assert m1.tolist() == m2.tolist() and m1.tolist() != m3.tolist()
    assert int(m1.sum()) == ref_k(160, 0.2) and not (m1 & ~valid).any()
    # reference: the first k of the generator's permutation of the valid positions
    perm = torch.randperm(160, generator=torch.Generator().manual_seed(7))[:32]
    assert sorted(valid.nonzero().flatten()[perm].tolist()) == m1.nonzero().flatten().tolist()
    # uniform: over many seeds every valid position is picked about rho of the time
    hits = sum(forking_mask(entropy, 0.2, "random", valid=valid, generator=torch.Generator().manual_seed(s))[0]
               .double() for s in range(400))
    assert float(hits[~valid].sum()) == 0
    assert 0.13 < float(hits[valid].min()) / 400 and float(hits[valid].max()) / 400 < 0.28


def test_edge_cases_and_errors():
    mask, tau = forking_mask(torch.rand(5), 0.5, valid=torch.zeros(5, dtype=torch.bool))
    assert not mask.any() and math.isnan(tau)
    mask, tau = forking_mask(torch.zeros(0), 0.2)
    assert mask.shape == (0,) and math.isnan(tau)
    with pytest.raises(ValueError, match="token 3 is NaN"):
        forking_mask(torch.tensor([0.1, 0.2, 0.3, float("nan")]), 0.5)
    # a NaN on a padding token is ignored
    forking_mask(torch.tensor([0.1, float("nan")]), 0.5, valid=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="Generator"):
        forking_mask(torch.rand(5), 0.5, "random")
    with pytest.raises(ValueError, match="mask_variant"):
        forking_mask(torch.rand(5), 0.5, "middle")
    with pytest.raises(ValueError, match="valid"):
        forking_mask(torch.rand(5), 0.5, valid=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="1-D"):
        forking_mask(torch.rand(5, 2), 0.5)



def ref_threshold(entropy: list[float], valid: list[bool], rho: float) -> tuple[list[bool], float]:
    """TRL's get_high_entropy_mask written the obvious way in float64: tau = the (1 - rho) quantile of the
    valid entropies (numpy's linear interpolation), every valid token with H >= tau."""
    import numpy as np

    h = np.array([e for e, v in zip(entropy, valid) if v], dtype=np.float64)
    if h.size == 0:
        return [False] * len(entropy), math.nan
    tau = float(np.quantile(h, 1.0 - rho))
    return [bool(v and e >= tau) for e, v in zip(entropy, valid)], tau


def test_threshold_variant_is_trls_quantile_form_taking_every_tie():
    g = torch.Generator().manual_seed(1)
    for trial in range(200):
        n = int(torch.randint(1, 60, (1,), generator=g))
        levels = int(torch.randint(1, 6, (1,), generator=g))
        entropy = (torch.randint(0, levels, (n,), generator=g).double() * 0.25 if trial % 2 == 0
                   else torch.rand(n, generator=g, dtype=torch.float64))   # many ties, or none
        valid = torch.rand(n, generator=g) < (0.3 if trial % 3 == 0 else 1.0)
        rho = [0.2, 0.5, 0.01, 1.0, 0.33][trial % 5]
        mask, tau = forking_mask(entropy, rho, "threshold", valid=valid)
        ref, ref_tau = ref_threshold(entropy.tolist(), valid.tolist(), rho)
        assert mask.tolist() == ref, (trial, rho)
        assert (math.isnan(tau) and math.isnan(ref_tau)) or tau == pytest.approx(ref_tau, rel=1e-12, abs=1e-15)
    # ties at the threshold: top takes exactly k (earliest first), threshold takes all of them
    h = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.9, 0.2], dtype=torch.float64)
    assert forking_mask(h, 0.2, "top")[0].tolist() == [False, True, False, True, False, False]   # k = 2
    assert forking_mask(h, 0.2, "threshold")[0].tolist() == [False, True, False, True, True, False]
    # one token, rho = 1 and all-equal entropies: everything
    assert forking_mask(torch.tensor([0.3]), 0.2, "threshold")[0].tolist() == [True]
    assert forking_mask(torch.rand(9, generator=g), 1.0, "threshold")[0].all()
    assert forking_mask(torch.full((7,), 0.4), 0.3, "threshold")[0].all()


def test_threshold_with_the_selected_normaliser_needs_a_precomputed_mask():
    from cluster.config import AlgorithmConfig

    with pytest.raises(ValueError, match="threshold"):
        AlgorithmConfig(mask_variant="threshold", entropy_norm="selected_tokens", entropy_scope="micro",
                        top_entropy_ratio=0.2)
    AlgorithmConfig(mask_variant="threshold", entropy_norm="selected_tokens", entropy_scope="global",
                    top_entropy_ratio=0.2)


# ------------------------------------------------------------------------------------------------------
# Window entropy (ARES/AEPO): the mask ranks tokens by the mean entropy of the window t .. t+w-1 inside
# the token's own response (truncated at its end, padding left out of the mean).

def ref_window(entropy: list[float], seq_ids: list[int], valid: list[bool], w: int) -> list[float]:
    out = []
    for t in range(len(entropy)):
        if not valid[t]:
            out.append(0.0)
            continue
        window = [entropy[j] for j in range(t, min(t + w, len(entropy)))
                  if seq_ids[j] == seq_ids[t] and valid[j]]
        out.append(sum(window) / len(window))
    return out


def _packed(g: torch.Generator, max_resp: int = 6, max_len: int = 9):
    lengths = torch.randint(1, max_len + 1, (int(torch.randint(1, max_resp + 1, (1,), generator=g)),),
                            generator=g)
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths), lengths


@pytest.mark.parametrize("variant", ["top", "bottom", "threshold"])
def test_window_mask_matches_a_float64_reference_with_ties_padding_and_edges(variant):
    from learner.masks import window_entropy

    g = torch.Generator().manual_seed(1)
    for trial in range(200):
        seq_ids, _ = _packed(g)
        n = seq_ids.numel()
        w = [2, 3, 5, 50, 1][trial % 5]                       # 50: longer than any response
        if trial % 2:    # few levels (sums and means exact in binary: ties resolved as the reference does)
            entropy = torch.randint(0, 4, (n,), generator=g).double() * 0.25
        else:
            entropy = torch.rand(n, generator=g, dtype=torch.float64) * 3
        valid = torch.rand(n, generator=g) < (0.4 if trial % 3 == 0 else 1.0)
        hw = window_entropy(entropy.float() if trial % 7 == 0 else entropy, seq_ids, w, valid)
        ref = ref_window(entropy.tolist(), seq_ids.tolist(), valid.tolist(), w)
        if trial % 7 == 0:    # float32 entropies are widened first: the reference of the rounded values
            ref = ref_window(entropy.float().double().tolist(), seq_ids.tolist(), valid.tolist(), w)
        assert hw.dtype == torch.float64
        if trial % 2:
            assert hw.tolist() == ref
        else:
            torch.testing.assert_close(hw, torch.tensor(ref, dtype=torch.float64), rtol=1e-13, atol=0)
        if variant == "threshold":
            continue
        rho = [0.2, 0.5, 0.01, 1.0, 0.33][trial % 5]
        mask, tau = forking_mask(hw, rho, variant, valid=valid)
        if trial % 2:
            ref_m, ref_tau = ref_mask(ref, valid.tolist(), rho, variant)
            assert mask.tolist() == ref_m
            assert (math.isnan(tau) and math.isnan(ref_tau)) or tau == ref_tau
        assert int(mask.sum()) == selected_count(int(valid.sum()), rho, variant)


def test_window_edges_stay_inside_each_response():
    from learner.masks import window_entropy

    h = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 5.0])
    sid = torch.tensor([0, 0, 0, 1, 1, 2])
    # w = 2: [mean(1,2), mean(2,3), 3 (response end: truncated), mean(10,20), 20, 5]
    assert window_entropy(h, sid, 2).tolist() == [1.5, 2.5, 3.0, 15.0, 20.0, 5.0]
    # w = 3 with the middle token of response 0 padding: left out of the mean, gets 0 itself
    valid = torch.tensor([True, False, True, True, True, True])
    assert window_entropy(h, sid, 3, valid).tolist() == [2.0, 0.0, 3.0, 15.0, 20.0, 5.0]
    # w = 1: the single-token entropies
    assert window_entropy(h, sid, 1).tolist() == h.tolist()
    # the window starts at the token: the highest window is the one that LEADS into high entropy
    mask, tau = forking_mask(window_entropy(h, sid, 2), 1 / 6)
    assert mask.tolist() == [False, False, False, False, True, False] and tau == 20.0


def test_window_is_the_same_wherever_a_response_sits_and_all_masked_selects_nothing():
    """A response's window means do not depend on its neighbours or its offset (bitwise: the mini and
    global scopes concatenate responses); an all-padding batch selects nothing (tau NaN)."""
    from learner.masks import window_entropy

    g = torch.Generator().manual_seed(5)
    a, b = torch.rand(13, generator=g) * 4, torch.rand(7, generator=g) * 4
    alone = window_entropy(b, torch.zeros(7, dtype=torch.long), 4)
    both = window_entropy(torch.cat([a, b]), torch.tensor([0] * 13 + [1] * 7), 4)
    assert torch.equal(both[13:], alone)
    none = torch.zeros(20, dtype=torch.bool)
    hw = window_entropy(torch.cat([a, b]), torch.tensor([0] * 13 + [1] * 7), 4, none)
    assert (hw == 0).all()
    mask, tau = forking_mask(hw, 0.2, valid=none)
    assert not mask.any() and math.isnan(tau)
    assert window_entropy(torch.zeros(0), torch.zeros(0, dtype=torch.long), 3).numel() == 0
    with pytest.raises(ValueError, match="entropy_window"):
        window_entropy(a, torch.zeros(13, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="seq_ids"):
        window_entropy(a, torch.zeros(12, dtype=torch.long), 2)
