"""learner.stats against numpy / plain-python references, and exact merging over micro-batches."""

import math

import numpy as np
import pytest
import torch

from cluster.config import AlgorithmConfig
from learner.losses import BatchCounts, compute_loss
from learner.stats import covariance_stats, entropy_stats, merge, percentiles, summarize


@pytest.mark.parametrize("n", [1, 2, 5, 100, 1001])
def test_percentiles_match_numpy(n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) ** 3
    qs = (0, 1, 50, 80, 95, 99, 100)
    np.testing.assert_allclose(percentiles(x, qs), np.percentile(x.double().numpy(), qs), rtol=1e-12)
    assert all(math.isnan(v) for v in percentiles(torch.zeros(0)))


def test_entropy_and_covariance_stats_match_reference():
    g = torch.Generator().manual_seed(0)
    h = torch.rand(5000, generator=g) ** 2 * 2       # values around the 0.672 forking threshold
    s = entropy_stats(h)
    ref = h.double().numpy()
    assert s["entropy/mean"] == pytest.approx(ref.mean(), rel=1e-12)
    for q in (50, 80, 95, 99):
        assert s[f"entropy/p{q}"] == pytest.approx(np.percentile(ref, q), rel=1e-12)
    assert s["entropy/frac_above_0.672"] == sum(v > 0.672 for v in ref.tolist()) / 5000

    cov = torch.randn(12000, generator=g)
    c = covariance_stats(cov)
    vals = sorted(cov.double().tolist(), reverse=True)
    assert c["cov/top_0.02pct_mean"] == pytest.approx(sum(vals[:2]) / 2, rel=1e-12)   # int(0.0002 * 12000) = 2
    assert c["cov/max"] == vals[0] and c["cov/mean"] == pytest.approx(float(np.mean(vals)), abs=1e-12)
    assert c["cov/frac_positive"] == sum(v > 0 for v in vals) / 12000
    assert covariance_stats(torch.tensor([-1.0, 3.0]))["cov/top_0.02pct_mean"] == 3.0   # at least one token


def _batch(seed, n, v=30, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g) * 2
    tokens = torch.randint(0, v, (n,), generator=g)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    old = logp + torch.randn(n, generator=g) * spread
    seq_ids = torch.arange(n) // 6
    adv = torch.randn(int(seq_ids.max()) + 1, generator=g)[seq_ids]
    return logits, tokens, old, adv, seq_ids


def test_summary_of_one_micro_batch_matches_reference():
    logits, tokens, old, adv, seq_ids = _batch(1, 60)
    cfg = AlgorithmConfig(top_entropy_ratio=0.25, entropy_scope="micro")
    _, part = compute_loss(logits, tokens, old, adv, seq_ids, BatchCounts(60, 15, 10, 8), cfg)
    s = summarize([part])
    ls = torch.log_softmax(logits.double(), -1)
    h = -(ls.exp() * ls).sum(-1)
    logp = ls.gather(-1, tokens[:, None]).squeeze(-1)
    lr = logp - old.double()
    r = torch.exp(lr)
    sel = sorted(range(60), key=lambda i: (-float(h[i]), i))[:15]
    a = adv.tolist()
    low = sum(1 for i in sel if a[i] < 0 and r[i] < 0.8)
    high = sum(1 for i in sel if a[i] > 0 and r[i] > 1.28)
    assert (s["clip/low_frac"], s["clip/high_frac"]) == (low / 15, high / 15) and low + high > 0
    assert s["selected"] == 15 and s["selected_frac"] == 0.25
    assert s["tau"] == pytest.approx(float(sorted(h.tolist(), reverse=True)[14]), rel=1e-5)
    assert s["entropy/mean"] == pytest.approx(float(h.mean()), rel=1e-5)
    assert s["entropy/p80"] == pytest.approx(float(np.percentile(h.numpy(), 80)), rel=1e-5)
    assert s["kl/approx"] == pytest.approx(float((-lr).mean()), rel=1e-4)
    assert s["kl/approx_k3"] == pytest.approx(float((torch.exp(lr) - 1 - lr).mean()), rel=1e-4)
    assert s["ratio/mean"] == pytest.approx(float(r.mean()), rel=1e-5)
    assert s["ratio/std"] == pytest.approx(float(r.std(unbiased=False)), rel=1e-4)
    assert (s["ratio/min"], s["ratio/max"]) == pytest.approx((float(r.min()), float(r.max())), rel=1e-5)
    assert s["entropy/sampled"] == pytest.approx(float(-old.double().mean()), rel=1e-6)
    cov = (logp - logp.mean()) * (adv.double() - adv.double().mean())
    assert s["cov/mean"] == pytest.approx(float(cov.mean()), abs=1e-6)
    assert s["cov/max"] == pytest.approx(float(cov.max()), rel=1e-5)


def test_merged_micro_batches_equal_the_whole_batch():
    logits, tokens, old, adv, seq_ids = _batch(2, 90)
    cfg = AlgorithmConfig()            # no mask: the micro-batch split cannot change any token's numbers
    counts = BatchCounts(90, 90, 15, 8)
    _, whole = compute_loss(logits, tokens, old, adv, seq_ids, counts, cfg)
    parts = [compute_loss(logits[s:e], tokens[s:e], old[s:e], adv[s:e], seq_ids[s:e], counts, cfg)[1]
             for s, e in ((0, 24), (24, 66), (66, 90))]
    a, b = summarize([whole]), summarize(parts)
    for key in a:
        if key.startswith("cov/"):
            continue   # covariance is centred per micro-batch (as Clip-Cov/KL-Cov select), by design
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7, nan_ok=True), key
    assert merge(parts)["tokens/entropy"].shape == (90,)


def test_summary_without_statistics_and_of_nothing():
    assert summarize([{"loss": 1.5}, {"loss": 2.0}]) == {"loss": 3.5}
    assert summarize([]) == {}


def _ref_group_sequence_stats(h, lp, lengths, adv, groups):
    """Cui et al. Eq. 5 and the per-group sequence covariance written the obvious way, in python floats."""
    resp_h, resp_l, at = [], [], 0
    for n in lengths:
        resp_h.append(sum(h[at:at + n]) / n)
        resp_l.append(sum(lp[at:at + n]) / n)
        at += n
    by = {}
    for i, g in enumerate(groups):
        by.setdefault(g, []).append(i)
    eq5 = sum(sum(resp_h[i] for i in m) / len(m) for m in by.values()) / len(by)
    covs = []
    for m in by.values():
        if len(m) < 2:
            continue
        ml, ma = sum(resp_l[i] for i in m) / len(m), sum(adv[i] for i in m) / len(m)
        covs.append(sum((resp_l[i] - ml) * (adv[i] - ma) for i in m) / len(m))
    return eq5, (sum(covs) / len(covs) if covs else float("nan"))


@pytest.mark.parametrize("seed", range(8))
def test_group_sequence_stats_match_eq5_and_the_group_covariance_in_float64(seed):
    from learner.stats import group_sequence_stats

    rng = np.random.default_rng(seed)
    groups, lengths = [], []
    for g in range(int(rng.integers(1, 6))):
        for _ in range(int(rng.integers(1, 5))):       # a group of one response has no covariance
            groups.append(g * 7)                       # group ids need not be contiguous
            lengths.append(int(rng.integers(1, 12)))   # one-token responses included
    order = rng.permutation(len(groups))               # responses of a group need not be adjacent
    groups, lengths = [groups[i] for i in order], [lengths[i] for i in order]
    t = sum(lengths)
    h, lp = rng.random(t) * 3, -rng.random(t) * 5
    adv = rng.normal(size=len(groups))
    eq5_sum, n_p, cov_sum, n_c = group_sequence_stats(torch.tensor(h), torch.tensor(lp), torch.tensor(lengths),
                                                      torch.tensor(adv), torch.tensor(groups))
    eq5, cov = _ref_group_sequence_stats(h.tolist(), lp.tolist(), lengths, adv.tolist(), groups)
    assert n_p == len(set(groups))
    assert eq5_sum / n_p == pytest.approx(eq5, rel=1e-12, abs=1e-14)
    if n_c:
        assert cov_sum / n_c == pytest.approx(cov, rel=1e-10, abs=1e-13)
    else:
        assert math.isnan(cov) and cov_sum == 0
    # Eq. 5 is not the token mean: long responses do not weigh more
    if len(set(lengths)) > 1:
        assert eq5_sum / n_p != pytest.approx(float(np.mean(h)), rel=1e-9)


def test_group_sequence_stats_of_nothing():
    from learner.stats import group_sequence_stats

    z = torch.zeros(0)
    assert group_sequence_stats(z, z, torch.zeros(0, dtype=torch.long), z, torch.zeros(0, dtype=torch.long)) == (
        0.0, 0.0, 0.0, 0.0)
