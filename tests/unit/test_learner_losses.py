"""learner.losses against a slow float64 reference written token by token (docs/algorithms.md 1.3, 2.5, 2.6, 5)."""

import math

import numpy as np
import pytest
import torch

from cluster.config import AlgorithmConfig
from learner.losses import BatchCounts, aggregate, compute_loss, deepspeed_loss_scale, kl_penalty, normalizers
from learner.policy_losses import ppo_clip
from learner.masks import forking_mask, selected_count
from learner.tokenstats import token_stats

V = 40


def make_batch(seed: int, lengths: list[int], spread: float = 0.4):
    """Packed micro-batch: logits [N, V], tokens, old_logp near the current logp (ratios on both sides of
    the clip range), per-response advantages (some exactly 0) broadcast to tokens, seq_ids."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    logits = torch.randn(n, V, generator=g) * 2
    tokens = torch.randint(0, V, (n,), generator=g)
    logp = torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    old_logp = (logp + torch.randn(n, generator=g, dtype=torch.float64) * spread).float()
    adv_seq = torch.randn(len(lengths), generator=g)
    adv_seq[::4] = 0.0
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    ref_logp = (logp + torch.randn(n, generator=g, dtype=torch.float64) * 0.5).float()
    return logits, tokens, old_logp, adv_seq[seq_ids], seq_ids, ref_logp


# ------------------------------------------------------------------------------------------------------
# The reference: float64, one token at a time, the formulas of docs/algorithms.md as written.

def ref_selection(entropy: list[float], valid: list[bool], rho: float, variant: str) -> list[bool]:
    idx = [i for i in range(len(entropy)) if valid[i]]
    order = sorted(idx, key=lambda i: (-entropy[i], i))
    k = min(len(idx), max(1, math.ceil(round(rho * len(idx), 9)))) if idx else 0
    chosen = set(order[:k] if variant == "top" else order[k:])
    return [i in chosen for i in range(len(entropy))]


def ref_loss(logits, tokens, old_logp, adv, seq_ids, counts, cfg, *, temperature=1.0, valid=None,
             ref_logp=None, entropy_coef=0.0, mask=None, clip_cov_seed=None, token_weight=None):
    x = logits.double().requires_grad_()
    n = x.shape[0]
    valid = [True] * n if valid is None else valid.tolist()
    seqs = seq_ids.tolist()
    logp, ent = [], []
    for i in range(n):
        ls = torch.log_softmax(x[i] / temperature, -1)
        logp.append(ls[tokens[i]])
        ent.append(-(ls.exp() * ls).sum())
    old, a = old_logp.double().tolist(), adv.double().tolist()
    if cfg.entropy_adv_alpha > 0:   # Cheng et al. 2506.14758: A + min(alpha H, |A| / kappa), H a constant
        a = [a[i] + min(cfg.entropy_adv_alpha * float(ent[i].detach()), abs(a[i]) / cfg.entropy_adv_kappa)
             for i in range(n)]

    if mask is not None:
        sel = [bool(m) and v for m, v in zip(mask[0].tolist(), valid)]
    elif cfg.top_entropy_ratio < 1 or cfg.mask_variant == "bottom":
        rank = [float(h.detach()) for h in ent]
        if cfg.entropy_window > 1:   # ARES window t .. t+w-1 inside the response, padding left out
            w = cfg.entropy_window
            rank = [sum(win) / len(win) if valid[t] else 0.0 for t in range(n)
                    for win in [[rank[j] for j in range(t, min(t + w, n)) if seqs[j] == seqs[t] and valid[j]]]]
        sel = ref_selection(rank, valid, cfg.top_entropy_ratio, cfg.mask_variant)
    else:
        sel = list(valid)

    lo, hi, c, clamp = 1 - cfg.clip_low, 1 + cfg.clip_high, cfg.dual_clip_c, cfg.log_ratio_clamp
    per_tok, clipped = [], []
    for i in range(n):
        r = torch.exp(torch.clamp(logp[i] - old[i], -clamp, clamp))
        l1, l2 = -a[i] * r, -a[i] * torch.clamp(r, lo, hi)
        clipped.append(bool(l2 > l1))
        if cfg.policy_loss == "kl_cov":
            per_tok.append(l1)
            continue
        pg = torch.maximum(l1, l2)
        if cfg.policy_loss == "ppo" and c is not None and a[i] < 0:
            pg = torch.minimum(pg, torch.tensor(-a[i] * c, dtype=torch.float64))
        per_tok.append(pg)

    if cfg.policy_loss in ("clip_cov", "kl_cov"):
        vi = [i for i in range(n) if valid[i]]
        mean_lp = sum(float(logp[i].detach()) for i in vi) / len(vi)
        mean_a = sum(a[i] for i in vi) / len(vi)
        cov = {i: (float(logp[i].detach()) - mean_lp) * (a[i] - mean_a) for i in vi}
        if cfg.policy_loss == "clip_cov":
            cand = [i for i in vi if not clipped[i] and cfg.clip_cov_lb < cov[i] < cfg.clip_cov_ub]
            n_clip = max(int(round(cfg.clip_cov_ratio * len(vi), 9)), 1)
            perm = torch.randperm(len(cand), generator=torch.Generator().manual_seed(clip_cov_seed)).tolist()
            for j in perm[:n_clip]:
                per_tok[cand[j]] = per_tok[cand[j]].detach() * 0
        else:
            k = min(max(int(round(cfg.kl_cov_ratio * len(vi), 9)), 1), len(vi))
            for i in sorted(vi, key=lambda i: (-cov[i], i))[:k]:
                per_tok[i] = per_tok[i] + cfg.kl_cov_coef * torch.abs(logp[i] - old[i])

    if token_weight is not None:
        per_tok = [p * float(w) for p, w in zip(per_tok, token_weight)]

    def agg(values, include, denom, norm):
        if cfg.loss_agg == "seq-mean-token-mean":
            total = 0.0
            for s in sorted(set(seqs)):
                toks = [i for i in range(n) if seqs[i] == s]
                d = sum(1 for i in toks if denom[i])
                if d:
                    zero = torch.zeros((), dtype=torch.float64)
                    total = total + sum((values[i] for i in toks if include[i]), zero) / d
            return total / norm
        return sum((values[i] for i in range(n) if include[i]), torch.zeros((), dtype=torch.float64)) / norm

    if cfg.loss_agg == "token-mean":
        pg_norm = counts.selected if cfg.entropy_norm == "selected_tokens" else counts.tokens
        all_norm = counts.tokens
    elif cfg.loss_agg == "seq-mean-token-mean":
        pg_norm = all_norm = counts.responses
    elif cfg.loss_agg == "seq-mean-token-sum":   # verl: mean over responses of each response's token sum
        pg_norm = all_norm = counts.responses
    else:
        pg_norm = all_norm = counts.responses * counts.max_len
    per_seq_denominator = sel if cfg.entropy_norm == "selected_tokens" else valid
    loss = agg(per_tok, sel, per_seq_denominator, pg_norm or 1)
    if cfg.kl_coef > 0:
        kl = []
        for i in range(n):
            d = float(ref_logp[i]) - logp[i]      # log(pi_ref / pi)
            if cfg.kl_estimator == "k1":
                kl.append(-d)
            elif cfg.kl_estimator == "k2":
                kl.append(0.5 * d * d)
            else:
                d = torch.clamp(d, -clamp, clamp)
                kl.append(torch.clamp(torch.exp(d) - 1 - d, max=10.0))
        loss = loss + cfg.kl_coef * agg(kl, valid, valid, all_norm)
    if entropy_coef > 0:
        loss = loss - entropy_coef * agg(ent, valid, valid, all_norm)
    grad, = torch.autograd.grad(loss, x) if loss.requires_grad else (torch.zeros_like(x),)
    return float(loss.detach()) if torch.is_tensor(loss) else float(loss), grad, sel


def run_loss(batch, counts, cfg, **kw):
    logits, tokens, old_logp, adv, seq_ids, ref_logp = batch
    x = logits.clone().requires_grad_()
    loss, part = compute_loss(x, tokens, old_logp, adv, seq_ids, counts, cfg,
                              ref_logp=ref_logp if cfg.kl_coef > 0 else None, **kw)
    grad, = torch.autograd.grad(loss, x)
    return float(loss.detach()), grad, part


LENGTHS = [7, 1, 12, 5, 1, 9, 3, 10]       # one-token responses included; N = 48


def counts_for(n_tokens, n_sel, lengths=LENGTHS, scale=1):
    # scale > 1: this micro-batch is part of a bigger mini-batch (the normalisers are global)
    return BatchCounts(tokens=n_tokens * scale, selected=n_sel * scale, responses=len(lengths) * scale,
                       max_len=16)


def assert_matches(batch, cfg, *, scale=1, temperature=1.0, entropy_coef=0.0, seed=None, **kw):
    n = batch[0].shape[0]
    n_sel = selected_count(n, cfg.top_entropy_ratio, cfg.mask_variant) \
        if cfg.top_entropy_ratio < 1 or cfg.mask_variant == "bottom" else n
    counts = counts_for(n, n_sel, scale=scale)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    loss, grad, part = run_loss(batch, counts, cfg, temperature=temperature, entropy_coef=entropy_coef,
                                generator=gen, **kw)
    logits, tokens, old_logp, adv, seq_ids, ref_logp = batch
    ref, ref_grad, sel = ref_loss(logits, tokens, old_logp, adv, seq_ids, counts, cfg, temperature=temperature,
                                  ref_logp=ref_logp, entropy_coef=entropy_coef, clip_cov_seed=seed, **kw)
    assert loss == pytest.approx(ref, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)
    assert part["count/selected"] == sum(sel)
    return part


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("norm", ["all_tokens", "selected_tokens"])
@pytest.mark.parametrize("rho", [1.0, 0.3])
def test_ppo_loss_matches_reference(agg, norm, rho):
    for seed in range(3):
        cfg = AlgorithmConfig(loss_agg=agg, entropy_norm=norm, top_entropy_ratio=rho, entropy_scope="micro",
                              dual_clip_c=[None, 1.5, 10.0][seed])
        assert_matches(make_batch(seed, LENGTHS, spread=[0.4, 1.0, 0.2][seed]), cfg, scale=1 + seed,
                       temperature=[1.0, 0.7, 1.2][seed])


@pytest.mark.parametrize("dual_clip_c", [None, 3.0])
def test_ppo_clip_every_region_against_the_max_min_form(dual_clip_c):
    """A grid of log-ratios through every region (clip low, inside, clip high, dual clip, log-ratio clamp)
    and advantages of each sign: value and gradient equal verl's max/min form in float64."""
    log_ratio = torch.linspace(-25, 25, 201, dtype=torch.float64)
    log_ratio = torch.cat([log_ratio, torch.linspace(-0.5, 1.5, 201, dtype=torch.float64)])
    for a in (-1.3, 0.0, 0.7):
        adv = torch.full_like(log_ratio, a)
        logp = log_ratio.clone().requires_grad_()
        loss, r, low, high, dual = ppo_clip(logp, torch.zeros_like(logp), adv, 0.2, 0.28, dual_clip_c, 20.0)
        g, = torch.autograd.grad(loss.sum(), logp)
        ref_logp = log_ratio.clone().requires_grad_()
        ratio = torch.exp(torch.clamp(ref_logp, -20, 20))
        ref = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.28))
        if dual_clip_c is not None:
            ref = torch.where(adv < 0, torch.minimum(ref, -adv * dual_clip_c), ref)
        ref_g, = torch.autograd.grad(ref.sum(), ref_logp)
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(g, ref_g, rtol=1e-12, atol=0)
        assert int(low.sum()) == (int((ratio < 0.8).sum()) if a < 0 else 0)
        assert int(high.sum()) == (int((ratio > 1.28).sum()) if a > 0 else 0)
        assert int(dual.sum()) == (int((ratio > dual_clip_c).sum()) if a < 0 and dual_clip_c else 0)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_kl_and_entropy_bonus_match_reference(estimator, agg):
    cfg = AlgorithmConfig(loss_agg=agg, kl_coef=0.1, kl_estimator=estimator, top_entropy_ratio=0.25,
                          entropy_scope="micro", entropy_norm="selected_tokens", entropy_coef=3e-3)
    assert_matches(make_batch(5, LENGTHS), cfg, scale=2, entropy_coef=3e-3)


def test_kl_estimators_closed_forms():
    logp = torch.tensor([-1.0, -2.0, -0.1, -30.0], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0, -0.1, -0.5], dtype=torch.float64)
    x = (ref - logp).tolist()
    assert kl_penalty(logp, ref, "k1", 20.0).tolist() == pytest.approx([-v for v in x])
    assert kl_penalty(logp, ref, "k2", 20.0).tolist() == pytest.approx([v * v / 2 for v in x])
    k3 = [min(math.exp(v) - 1 - v, 10.0) for v in x]   # the last one, e^29.5, is capped at 10
    assert kl_penalty(logp, ref, "k3", 20.0).tolist() == pytest.approx(k3) and k3[-1] == 10.0
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(logp, ref, "k4", 20.0)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_clip_cov_matches_reference(agg):
    clipped_total = 0
    for seed in range(4):
        # r = 0.15 of 48 tokens: 7 picks among the candidates with 0.05 < Cov < 2
        cfg = AlgorithmConfig(policy_loss="clip_cov", loss_agg=agg, clip_low=0.2, clip_high=0.28,
                              clip_cov_ratio=0.15, clip_cov_lb=0.05, clip_cov_ub=2.0)
        part = assert_matches(make_batch(10 + seed, LENGTHS, spread=0.6), cfg, seed=seed)
        clipped_total += part["count/clip_cov"]
    assert clipped_total > 0   # the random pick really removed tokens


def test_kl_cov_matches_reference():
    for seed in range(3):
        cfg = AlgorithmConfig(policy_loss="kl_cov", kl_cov_ratio=0.1, kl_cov_coef=[1.0, 0.5, 2.0][seed],
                              top_entropy_ratio=[1.0, 0.5, 1.0][seed], entropy_scope="micro")
        part = assert_matches(make_batch(20 + seed, LENGTHS, spread=0.5), cfg)
        assert part["count/kl_cov"] == 4   # max(int(0.1 * 48), 1)


@pytest.mark.parametrize("policy", ["ppo", "clip_cov", "kl_cov"])
def test_token_weights_scale_the_policy_term(policy):
    batch = make_batch(25, LENGTHS, spread=0.6)
    weight = torch.rand(48, generator=torch.Generator().manual_seed(1)) * 2   # TIS weights, capped at 2
    cfg = AlgorithmConfig(policy_loss=policy, clip_cov_ratio=0.15, clip_cov_lb=0.05, clip_cov_ub=2.0,
                          kl_cov_ratio=0.1, top_entropy_ratio=0.5, entropy_scope="micro", kl_coef=0.1)
    assert_matches(batch, cfg, seed=4, token_weight=weight, entropy_coef=1e-2)


def test_precomputed_mask_is_used_as_given():
    batch = make_batch(30, LENGTHS)
    mask = torch.zeros(48, dtype=torch.bool)
    mask[[0, 5, 9, 30, 47]] = True
    cfg = AlgorithmConfig(top_entropy_ratio=0.1, entropy_scope="global")
    part = assert_matches(batch, cfg, mask=(mask, 0.42))
    assert part["tau"] == 0.42 and part["count/selected"] == 5


def test_bottom_and_random_variants():
    batch = make_batch(31, LENGTHS)
    assert_matches(batch, AlgorithmConfig(top_entropy_ratio=0.2, mask_variant="bottom", entropy_scope="micro"))
    cfg = AlgorithmConfig(top_entropy_ratio=0.2, mask_variant="random", entropy_scope="micro")
    counts = counts_for(48, 10)
    _, _, p1 = run_loss(batch, counts, cfg, generator=torch.Generator().manual_seed(3))
    _, _, p2 = run_loss(batch, counts, cfg, generator=torch.Generator().manual_seed(3))
    assert p1["count/selected"] == 10 and p1["loss"] == p2["loss"]


# ------------------------------------------------------------------------------------------------------
# Gradient properties and exact decomposition over micro-batches.

def test_masked_tokens_get_exactly_zero_gradient_and_selected_equal_unmasked():
    batch = make_batch(40, LENGTHS, spread=0.5)
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        masked_cfg = AlgorithmConfig(loss_agg=agg, top_entropy_ratio=0.3, entropy_scope="micro")
        _, grad_masked, part = run_loss(batch, counts_for(48, 15), masked_cfg)
        _, grad_full, _ = run_loss(batch, counts_for(48, 15), AlgorithmConfig(loss_agg=agg))
        _, entropy = token_stats(batch[0], batch[1])
        sel, _ = forking_mask(entropy, 0.3)
        assert part["count/selected"] == 15 == int(sel.sum())
        assert (grad_masked[~sel] == 0).all()
        # all_tokens: same normaliser, so each selected token's gradient is the unmasked loss's
        torch.testing.assert_close(grad_masked[sel], grad_full[sel], rtol=1e-6, atol=0)
        assert grad_full[~sel].abs().sum() > 0


def test_rho_one_equals_unmasked_and_tiny_rho_selects_one():
    batch = make_batch(41, LENGTHS)
    l1, g1, _ = run_loss(batch, counts_for(48, 48), AlgorithmConfig(top_entropy_ratio=1.0, entropy_scope="micro"))
    l2, g2, _ = run_loss(batch, counts_for(48, 48), AlgorithmConfig(top_entropy_ratio=1.0, mask_variant="random",
                                                                     entropy_scope="micro"),
                         generator=torch.Generator().manual_seed(0))
    assert l1 == l2 and torch.equal(g1, g2)
    _, g, part = run_loss(batch, counts_for(48, 1), AlgorithmConfig(top_entropy_ratio=1e-6, entropy_scope="micro"))
    assert part["count/selected"] == 1 and int((g.abs().sum(-1) > 0).sum()) <= 1


def test_all_masked_gives_zero_loss_and_gradient():
    batch = make_batch(42, LENGTHS)
    for norm in ("all_tokens", "selected_tokens"):
        cfg = AlgorithmConfig(top_entropy_ratio=1.0, mask_variant="bottom", entropy_norm=norm, entropy_scope="micro")
        loss, grad, part = run_loss(batch, counts_for(48, 0), cfg)
        assert loss == 0.0 and (grad == 0).all() and part["count/selected"] == 0


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("scope", ["micro", "mini"])
@pytest.mark.parametrize("window,alpha", [(1, 0.0), (4, 0.4)])
def test_micro_batch_losses_sum_to_the_mini_batch_loss(agg, scope, window, alpha):
    """Summing micro-batch losses (global normalisers) reproduces the one-shot mini-batch loss and gradient,
    also with the window-entropy mask and the entropy-shaped advantages."""
    from learner.masks import window_entropy

    batch = make_batch(43, LENGTHS, spread=0.5)
    logits, tokens, old_logp, adv, seq_ids, _ = batch
    cfg = AlgorithmConfig(loss_agg=agg, top_entropy_ratio=0.25, entropy_scope=scope, entropy_norm="selected_tokens",
                          entropy_coef=1e-2, entropy_window=window, entropy_adv_alpha=alpha)
    splits = [(0, 20), (20, 35), (35, 48)]           # response boundaries of LENGTHS (cumsum 7 8 20 25 26 35 38 48)
    if scope == "mini":
        _, entropy = token_stats(logits, tokens)
        mini_mask, tau = forking_mask(window_entropy(entropy, seq_ids, window), 0.25)
        masks = [(mini_mask[s:e], tau) for s, e in splits]
        n_sel = int(mini_mask.sum())
        full_mask = (mini_mask, tau)
    else:
        masks = [None] * len(splits)
        n_sel = sum(selected_count(e - s, 0.25) for s, e in splits)
        full_mask = None
    counts = counts_for(48, n_sel)
    x = logits.clone().requires_grad_()
    total = 0.0
    for (s, e), m in zip(splits, masks):
        loss, _ = compute_loss(x[s:e], tokens[s:e], old_logp[s:e], adv[s:e], seq_ids[s:e] - seq_ids[s], counts,
                               cfg, mask=m, entropy_coef=1e-2)
        loss.backward()
        total += float(loss.detach())
    if scope == "mini":
        x2 = logits.clone().requires_grad_()
        loss, _ = compute_loss(x2, tokens, old_logp, adv, seq_ids, counts, cfg, mask=full_mask, entropy_coef=1e-2)
        loss.backward()
        assert total == pytest.approx(float(loss.detach()), rel=1e-5)
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-9)
    else:   # micro scope: each micro-batch masked on its own; compare with the reference per micro-batch
        ref_total, ref_grads = 0.0, []
        for s, e in splits:
            r, g, _ = ref_loss(logits[s:e], tokens[s:e], old_logp[s:e], adv[s:e], seq_ids[s:e], counts, cfg,
                               entropy_coef=1e-2)
            ref_total += r
            ref_grads.append(g)
        assert total == pytest.approx(ref_total, rel=1e-5)
        torch.testing.assert_close(x.grad.double(), torch.cat(ref_grads), rtol=1e-4, atol=1e-7)


def test_heavy_padding_changes_nothing():
    """Invalid tokens (with garbage logits, NaN old logprobs) contribute nothing, get zero gradient and are
    left out of every statistic: the result equals the compact micro-batch's."""
    batch = make_batch(44, LENGTHS, spread=0.5)
    logits, tokens, old_logp, adv, seq_ids, ref_logp = batch
    g = torch.Generator().manual_seed(1)
    pad = 100
    n = 48 + pad
    perm = torch.randperm(n, generator=g)
    valid = torch.zeros(n, dtype=torch.bool)
    valid[perm[:48]] = True
    pos = valid.nonzero().flatten()

    def spread(t, fill):
        out = torch.full((n,) + t.shape[1:], fill, dtype=t.dtype)
        out[pos] = t
        return out

    p_logits = spread(logits, 0.0)
    p_logits[~valid] = torch.randn(pad, V, generator=g) * 50
    # finite garbage old logprobs (so no clamp hides a NaN), NaN advantages, reference and weights
    p_batch = (p_logits, spread(tokens, 0), spread(old_logp, -3.0), spread(adv, float("nan")),
               spread(seq_ids, 0), spread(ref_logp, float("nan")))
    weight = torch.rand(48, generator=g) * 2
    cfg = AlgorithmConfig(loss_agg="seq-mean-token-mean", top_entropy_ratio=0.3, entropy_scope="micro",
                          kl_coef=0.05, entropy_coef=1e-2)
    counts = counts_for(48, 15)
    loss, grad, part = run_loss(batch, counts, cfg, entropy_coef=1e-2, token_weight=weight)
    p_loss, p_grad, p_part = run_loss(p_batch, counts, cfg, valid=valid, entropy_coef=1e-2,
                                      token_weight=spread(weight, float("nan")))
    assert p_loss == pytest.approx(loss, rel=1e-6)
    assert (p_grad[~valid] == 0).all()
    torch.testing.assert_close(p_grad[valid], grad, rtol=1e-6, atol=1e-9)
    from learner.stats import summarize
    s, p = summarize([part]), summarize([p_part])
    for key in s:
        assert p[key] == pytest.approx(s[key], rel=1e-6, abs=1e-9, nan_ok=True), key


def test_normalizers_and_deepspeed_scale():
    counts = BatchCounts(tokens=1000, selected=200, responses=16, max_len=128)
    assert normalizers(AlgorithmConfig(), counts) == (1000.0, 1000.0)
    assert normalizers(AlgorithmConfig(entropy_norm="selected_tokens"), counts) == (200.0, 1000.0)
    assert normalizers(AlgorithmConfig(loss_agg="seq-mean-token-mean"), counts) == (16.0, 16.0)
    assert normalizers(AlgorithmConfig(loss_agg="seq-mean-token-sum"), counts) == (16.0, 16.0)
    assert normalizers(AlgorithmConfig(loss_agg="seq-mean-token-sum-norm"), counts) == (2048.0, 2048.0)
    assert deepspeed_loss_scale(4) == 4.0 and deepspeed_loss_scale(2, 8) == 16.0


def test_aggregate_ignores_nan_in_excluded_tokens():
    v = torch.tensor([1.0, float("nan"), 3.0, float("inf")], requires_grad=True)
    inc = torch.tensor([True, False, True, False])
    out = aggregate(v, inc, inc, torch.tensor([0, 0, 1, 1]), "seq-mean-token-mean", 2.0)
    out.backward()
    assert float(out.detach()) == 2.0 and v.grad.tolist() == [0.5, 0.0, 0.5, 0.0]


@pytest.mark.parametrize("change,match", [
    (dict(cfg=AlgorithmConfig(top_entropy_ratio=0.2, entropy_scope="mini")), "precomputed mask"),
    (dict(cfg=AlgorithmConfig(policy_loss="clip_cov")), "Generator"),
    (dict(cfg=AlgorithmConfig(adaptive_entropy=True)), "adaptive_entropy"),
    (dict(cfg=AlgorithmConfig(kl_coef=0.1)), "ref_logp"),
    (dict(advantages="nan3"), r"advantages\[3\] is not finite"),
    (dict(old_logp="nan3"), r"old_logp\[3\] is not finite"),
    (dict(seq_ids="short"), "seq_ids must have shape"),
    (dict(seq_ids="float"), "seq_ids must be an integer"),
    (dict(valid="int"), "valid must be a bool"),
    (dict(mask=(torch.ones(3, dtype=torch.bool), 0.0)), "mask must be a bool tensor of shape"),
    (dict(token_weight="neg2"), r"token_weight\[2\] is negative"),
])
def test_bad_input_is_a_clear_error(change, match):
    logits, tokens, old_logp, adv, seq_ids, _ = make_batch(50, [4, 4])
    args = dict(cfg=AlgorithmConfig(), advantages=adv, old_logp=old_logp, seq_ids=seq_ids, valid=None, mask=None,
                token_weight=None)
    for k, v in change.items():
        if v == "neg2":
            v = torch.ones(8)
            v[2] = -0.5
        elif v == "nan3":
            v = args[k].clone()
            v[3] = float("nan")
        elif v == "short":
            v = args[k][:5]
        elif v == "float":
            v = args[k].float()
        elif v == "int":
            v = torch.ones(8, dtype=torch.int64)
        args[k] = v
    with pytest.raises(ValueError, match=match):
        compute_loss(logits, tokens, args["old_logp"], args["advantages"], args["seq_ids"],
                     counts_for(8, 8, [4, 4]), args["cfg"], valid=args["valid"], mask=args["mask"],
                     token_weight=args["token_weight"])


def test_stats_false_is_the_cheap_path_with_the_same_loss():
    batch = make_batch(51, LENGTHS)
    cfg = AlgorithmConfig()
    l1, g1, part = run_loss(batch, counts_for(48, 48), cfg)
    l2, g2, small = run_loss(batch, counts_for(48, 48), cfg, stats=False)
    assert l1 == pytest.approx(l2, rel=1e-6) and set(small) == {"loss"} and "tokens/entropy" in part
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=0)


@pytest.mark.parametrize("policy", ["ppo", "clip_cov", "kl_cov"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_on_policy_old_logp_none_is_the_detached_logp_of_this_pass(policy, temperature):
    """old_logp=None (one update per step: pi_old is the policy of these logits) equals passing that
    policy's log-probs computed beforehand, in loss, gradient and statistics, against the float64
    reference; the pass's log-probs come back in part["tokens/logp"]. KL-Cov's penalty |logp - old_logp|
    is exactly 0 on-policy with subgradient 0 (torch.abs at 0, as in verl when its recomputed old
    log-probs equal the current ones bit for bit), so its gradient is the unclipped -A r one, which at
    r = 1 is PPO's: it is checked against the PPO reference."""
    logits, tokens, _, adv, seq_ids, ref_logp = make_batch(11, LENGTHS)
    cfg = AlgorithmConfig(policy_loss=policy, clip_cov_ratio=0.2, kl_cov_ratio=0.2, kl_coef=0.01)
    exact = torch.log_softmax(logits.double() / temperature, -1).gather(-1, tokens[:, None]).squeeze(-1).float()
    n = logits.shape[0]
    counts = counts_for(n, n)
    on = run_loss((logits, tokens, None, adv, seq_ids, ref_logp), counts, cfg, temperature=temperature,
                  generator=torch.Generator().manual_seed(3))
    given = run_loss((logits, tokens, exact, adv, seq_ids, ref_logp), counts, cfg, temperature=temperature,
                     generator=torch.Generator().manual_seed(3))
    ref_cfg = AlgorithmConfig(policy_loss="ppo", kl_coef=0.01) if policy == "kl_cov" else cfg
    ref, ref_grad, _ = ref_loss(logits, tokens, exact, adv, seq_ids, counts, ref_cfg, temperature=temperature,
                                ref_logp=ref_logp, clip_cov_seed=3)
    assert on[0] == pytest.approx(ref, rel=1e-5, abs=1e-6) and on[0] == pytest.approx(given[0], rel=1e-5)
    torch.testing.assert_close(on[1].double(), ref_grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(on[2].pop("tokens/logp"), exact, rtol=0, atol=1e-5)
    assert on[2]["max/ratio"] == on[2]["min/ratio"] == 1.0 and "tokens/logp" not in given[2]
    for key in ("count/clip_low", "count/clip_high", "count/clip_cov", "count/kl_cov", "sum/neg_old_logp"):
        assert on[2][key] == pytest.approx(given[2][key], rel=1e-5), key


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
def test_threshold_mask_in_the_loss_trains_every_token_at_or_above_tau(agg):
    """mask_variant=threshold inside the loss (micro scope) = the same loss with TRL's mask given explicitly;
    masked tokens get exactly zero gradient."""
    batch = make_batch(44, LENGTHS, spread=0.5)
    logits, tokens = batch[0], batch[1]
    _, entropy = token_stats(logits, tokens)
    entropy = entropy.double()
    tau = float(np.quantile(entropy.numpy(), 0.7))   # TRL: the (1 - rho) quantile, then H >= tau
    want = entropy >= tau
    cfg = AlgorithmConfig(loss_agg=agg, top_entropy_ratio=0.3, mask_variant="threshold", entropy_scope="micro")
    counts = counts_for(48, int(want.sum()))
    loss, grad, part = run_loss(batch, counts, cfg)
    given, g_given, _ = run_loss(batch, counts, AlgorithmConfig(loss_agg=agg), mask=(want, tau))
    assert part["count/selected"] == int(want.sum())
    assert loss == pytest.approx(given, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(grad, g_given, rtol=0, atol=0)
    assert (grad[~want] == 0).all()


@pytest.mark.parametrize("policy", ["ppo", "clip_cov", "kl_cov"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_entropy_advantage_shaping_matches_reference(policy, agg):
    """A' = A + min(alpha * H.detach(), |A| / kappa) (Cheng et al. 2506.14758) against the float64
    reference: value and gradient (no gradient through H: the reference uses H as a constant), with and
    without a window mask; the statistic adv/entropy_shaping is the mean of the added term."""
    for seed, (alpha, kappa, window, rho) in enumerate([(0.4, 2.0, 1, 1.0), (5.0, 2.0, 3, 0.3),
                                                        (0.05, 1.0, 8, 0.5)]):
        extra = {"clip_cov_ratio": 0.1, "clip_cov_lb": -10.0, "clip_cov_ub": 10.0} if policy == "clip_cov" else {}
        cfg = AlgorithmConfig(policy_loss=policy, loss_agg=agg, entropy_adv_alpha=alpha, entropy_adv_kappa=kappa,
                              entropy_window=window, top_entropy_ratio=rho, entropy_scope="micro", **extra)
        batch = make_batch(60 + seed, LENGTHS, spread=0.5)
        part = assert_matches(batch, cfg, seed=7 if policy == "clip_cov" else None)
        logits, tokens, _, adv, _, _ = batch
        _, h = token_stats(logits.double(), tokens)
        psi = torch.minimum(alpha * h, adv.double().abs() / kappa)
        assert part["sum/adv_entropy_shaping"] == pytest.approx(float(psi.sum()), rel=1e-5)
        shaped = adv.double() + psi
        assert ((shaped == 0) == (adv == 0)).all()                   # a zero advantage stays zero
        assert (torch.sign(shaped) == torch.sign(adv.double())).all()   # kappa >= 1: no sign flips


def test_entropy_advantage_shaping_needs_no_stats_and_is_off_at_zero():
    from learner.stats import summarize

    batch = make_batch(70, LENGTHS)
    counts = counts_for(48, 48)
    on = AlgorithmConfig(entropy_adv_alpha=0.4)
    l_stats, g_stats, part = run_loss(batch, counts, on)
    l_cheap, g_cheap, _ = run_loss(batch, counts, on, stats=False)
    assert l_stats == pytest.approx(l_cheap, rel=1e-12) and torch.equal(g_stats, g_cheap)
    assert summarize([part])["adv/entropy_shaping"] == pytest.approx(part["sum/adv_entropy_shaping"] / 48)
    l_off, _, part_off = run_loss(batch, counts, AlgorithmConfig())
    assert "sum/adv_entropy_shaping" not in part_off and "adv/entropy_shaping" not in summarize([part_off])
    assert l_off != pytest.approx(l_stats)
    with pytest.raises(ValueError):
        AlgorithmConfig(entropy_adv_kappa=0.5)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_window_mask_in_the_loss_matches_reference_with_padding(agg):
    """entropy_window inside the loss (micro scope), with padding tokens: the float64 reference's window over
    the valid tokens of each response."""
    batch = make_batch(71, LENGTHS, spread=0.5)
    n = batch[0].shape[0]
    valid = torch.arange(n) % 5 != 2
    for w, variant in [(2, "top"), (5, "bottom"), (40, "top")]:
        cfg = AlgorithmConfig(loss_agg=agg, top_entropy_ratio=0.3, mask_variant=variant, entropy_window=w,
                              entropy_scope="micro")
        n_valid = int(valid.sum())
        counts = counts_for(n_valid, selected_count(n_valid, 0.3, variant))
        loss, grad, part = run_loss(batch, counts, cfg, valid=valid)
        logits, tokens, old_logp, adv, seq_ids, _ = batch
        ref, ref_grad, sel = ref_loss(logits, tokens, old_logp, adv, seq_ids, counts, cfg, valid=valid)
        assert part["count/selected"] == sum(sel)
        assert loss == pytest.approx(ref, rel=1e-5, abs=1e-6)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)
