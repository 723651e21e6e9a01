"""Policy losses for one packed micro-batch (docs/algorithms.md 1.3, 2.4-2.6, 3.1, 5).

Tensors are packed and padding-free: a micro-batch's response tokens are flat [N] vectors, `seq_ids [N]`
(int64 in [0, S)) says which response each token belongs to, and logits are [N, V] for exactly those
positions. A response lies whole in one micro-batch (seq-mean-token-mean divides by its full length).
`valid [N]` (optional, default all True) drops tokens from everything: loss, gradient, mask, statistics.

Normalisation (what `BatchCounts` must hold). Every normaliser is a GLOBAL count over the whole PPO
mini-batch: all its micro-batches on all data-parallel ranks. Then
    sum over micro-batches and ranks of compute_loss(...).loss == the mini-batch loss
exactly, whatever the micro-batch split, and so do the gradients. Per `AlgorithmConfig.loss_agg`:
    token-mean (DAPO)               sum_t l_t / D,   D = counts.tokens, or counts.selected when
                                    entropy_norm = selected_tokens (the released 80/20 code);
    seq-mean-token-mean (GRPO)      sum_i (sum_{t in i} l_t / n_i) / counts.responses, n_i = the response's
                                    valid tokens, or its selected tokens under selected_tokens (a response
                                    with none selected contributes 0);
    seq-mean-token-sum-norm (Dr.GRPO)  sum_t l_t / (counts.responses * counts.max_len).
The KL-to-reference and entropy-bonus terms run over all valid tokens with the all-token normaliser.
`learner.masks.scope_selected_count` gives a rank's share of counts.selected (from token counts alone for the
micro scope, from the precomputed mask for mini and global), and `learner.distributed.all_reduce_floats`
sums counts across ranks.

DeepSpeed averages gradients over data-parallel ranks and, with engine.backward's default
scale_wrt_gas=True, divides the loss by gradient_accumulation_steps. To keep the exact mini-batch loss call
`engine.backward(loss * deepspeed_loss_scale(world_size), scale_wrt_gas=False)` (micro-batch counts may
then differ between ranks and steps), or multiply by deepspeed_loss_scale(world_size, gas) with the
default scaling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from cluster.config import AlgorithmConfig
from learner.masks import forking_mask, mask_active
from learner.tokenstats import token_stats


@dataclass(frozen=True)
class BatchCounts:
    """Global counts over the whole mini-batch (all micro-batches, all ranks): the loss normalisers."""

    tokens: int      # valid response tokens
    selected: int    # tokens selected by the forking mask (= tokens when no mask is in use)
    responses: int   # responses (sequences)
    max_len: int     # L_max, rollout.max_new_tokens (seq-mean-token-sum-norm only)


def deepspeed_loss_scale(world_size: int, grad_accum_steps: int = 1) -> float:
    """Factor undoing DeepSpeed's mean over ranks (and over gradient_accumulation_steps when
    engine.backward keeps scale_wrt_gas=True) so that summed micro-batch losses stay the exact loss."""
    return float(world_size * grad_accum_steps)


def normalizers(cfg: AlgorithmConfig, counts: BatchCounts) -> tuple[float, float]:
    """(policy-term normaliser, all-valid-token normaliser) for cfg.loss_agg; see the module doc."""
    if cfg.loss_agg == "token-mean":
        pg = counts.selected if cfg.entropy_norm == "selected_tokens" else counts.tokens
        return float(pg), float(counts.tokens)
    if cfg.loss_agg == "seq-mean-token-mean":
        return float(counts.responses), float(counts.responses)
    norm = float(counts.responses * counts.max_len)
    return norm, norm


def aggregate(values: torch.Tensor, include: torch.Tensor, per_seq_count: torch.Tensor, seq_ids: torch.Tensor,
              mode: str, norm: float) -> torch.Tensor:
    """values [N], include [N] bool (terms that count), per_seq_count [N] bool (tokens counted in a
    response's own denominator, seq-mean-token-mean only), seq_ids [N] -> scalar (see module doc).
    Excluded tokens contribute exactly 0 and get exactly zero gradient, even if their value is inf/NaN."""
    v = torch.where(include, values, torch.zeros((), dtype=values.dtype, device=values.device))
    norm = norm if norm > 0 else 1.0   # nothing selected anywhere: the numerator is 0 too
    if mode == "seq-mean-token-mean":
        s = int(seq_ids.max()) + 1 if seq_ids.numel() else 0
        seq_sum = torch.zeros(s, dtype=v.dtype, device=v.device).index_add(0, seq_ids, v)
        seq_n = torch.zeros(s, dtype=v.dtype, device=v.device).index_add(0, seq_ids, per_seq_count.to(v.dtype))
        return (seq_sum / seq_n.clamp(min=1)).sum() / norm
    if mode in ("token-mean", "seq-mean-token-sum-norm"):
        return v.sum() / norm
    raise ValueError(f"unknown loss_agg {mode!r}")


def _log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, clamp: float) -> torch.Tensor:
    return torch.clamp(logp - old_logp, -clamp, clamp)


def ppo_clip(logp, old_logp, adv, clip_low: float, clip_high: float, dual_clip_c: float | None,
             log_ratio_clamp: float):
    """[N] each -> (loss [N], ratio [N] detached, clipped_low, clipped_high, dual_clipped [N] bool).

    loss = max(-A r, -A clip(r, 1-eps_low, 1+eps_high)), and for A < 0 also min(., -A c) (dual clip),
    r = exp(clamp(logp - old_logp, +-log_ratio_clamp)) (verl compute_policy_loss_vanilla). Written with
    explicit conditions so a clipped token's gradient is exactly 0 and an active one's is -A r."""
    ratio = torch.exp(_log_ratio(logp, old_logp, log_ratio_clamp))
    r = ratio.detach()
    clipped_high = (adv > 0) & (r > 1 + clip_high)
    clipped_low = (adv < 0) & (r < 1 - clip_low)
    bound = torch.where(clipped_high, r.new_tensor(1 + clip_high), r.new_tensor(1 - clip_low))
    loss = torch.where(clipped_high | clipped_low, -adv * bound, -adv * ratio)
    dual = torch.zeros_like(clipped_low)
    if dual_clip_c is not None:
        dual = (adv < 0) & (r > dual_clip_c)
        loss = torch.where(dual, -adv * dual_clip_c, loss)
    return loss, r, clipped_low, clipped_high, dual


def token_covariance(logp: torch.Tensor, adv: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cov(y_i) = (logp_i - mean logp)(A_i - mean A), means over the valid tokens (Cui et al. Eq. 10),
    detached; 0 at invalid tokens. [N] -> [N]."""
    lp, a = logp.detach(), adv.detach()
    n = valid.sum().clamp(min=1)
    mean_lp = torch.where(valid, lp, 0).sum() / n
    mean_a = torch.where(valid, a, 0).sum() / n
    return torch.where(valid, (lp - mean_lp) * (a - mean_a), 0)


def _pick_count(ratio: float, n: int) -> int:
    # max(int(r * N), 1) as in verl; rounding first keeps 2e-4 * 15000 at 3, not 2.9999 -> 2
    return max(int(round(ratio * n, 9)), 1)


def clip_cov(logp, old_logp, adv, valid, cfg: AlgorithmConfig, generator: torch.Generator | None):
    """Clip-Cov (Cui et al. 2505.22617 Eq. 11-12, verl compute_policy_loss_clip_cov) -> (loss [N],
    ratio, clipped_low, clipped_high, cov_clipped [N] bool). Among valid tokens not already clipped by PPO
    with lb < Cov < ub (strict), max(int(r N), 1) drawn uniformly with `generator` get their loss and
    gradient detached (set to 0); the rest is max(-A r, -A clip(r)) (no dual clip).
    Cov is over this micro-batch's valid tokens, the released code's scope (authors: it approximates the
    global top-Cov tokens per GPU). r uses the PPO log-ratio clamp, which verl's Clip-Cov/KL-Cov omit:
    identical unless |log r| > log_ratio_clamp, where theirs overflows."""
    if generator is None:
        raise ValueError("policy_loss='clip_cov' draws its tokens at random: pass a seeded torch.Generator")
    loss, r, clipped_low, clipped_high, _ = ppo_clip(logp, old_logp, adv, cfg.clip_low, cfg.clip_high, None,
                                                     cfg.log_ratio_clamp)
    cov = token_covariance(logp, adv, valid)
    cand = valid & ~(clipped_low | clipped_high) & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
    cand_idx = cand.nonzero().squeeze(1)
    n_clip = _pick_count(cfg.clip_cov_ratio, int(valid.sum()))
    pick = cand_idx[torch.randperm(cand_idx.numel(), generator=generator, device=generator.device)[:n_clip]
                    .to(cand_idx.device)]
    cov_clipped = torch.zeros_like(valid)
    cov_clipped[pick] = True
    loss = torch.where(cov_clipped, torch.zeros((), dtype=loss.dtype, device=loss.device), loss)
    return loss, r, clipped_low, clipped_high, cov_clipped


def kl_cov(logp, old_logp, adv, valid, cfg: AlgorithmConfig):
    """KL-Cov (Cui et al. Eq. 13-14, verl compute_policy_loss_kl_cov) -> (loss [N], ratio, penalised [N]
    bool). No PPO clipping: loss = -A r, plus beta |logp - old_logp| on the max(int(k N), 1) valid tokens
    of largest Cov (ties: earlier position first). Scope and clamp as in `clip_cov`."""
    ratio = torch.exp(_log_ratio(logp, old_logp, cfg.log_ratio_clamp))
    loss = -adv * ratio
    penalised = torch.zeros_like(valid)
    n = int(valid.sum())
    if n:
        idx = valid.nonzero().squeeze(1)
        cov = token_covariance(logp, adv, valid)[idx]
        k = min(_pick_count(cfg.kl_cov_ratio, n), n)
        penalised[idx[torch.sort(cov, descending=True, stable=True).indices[:k]]] = True
        loss = torch.where(penalised, loss + cfg.kl_cov_coef * (logp - old_logp).abs(), loss)
    return loss, ratio.detach(), penalised


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str, log_ratio_clamp: float) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) (Schulman's estimators, verl kl_penalty), [N] -> [N],
    with x = log(pi_ref / pi_theta): k1 = -x, k2 = x^2 / 2, k3 = e^x - 1 - x with x clamped to
    +-log_ratio_clamp and k3 capped at 10 (verl low_var_kl)."""
    x = ref_logp - logp
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x * x
    if estimator == "k3":
        x = torch.clamp(x, -log_ratio_clamp, log_ratio_clamp)
        return torch.clamp(torch.exp(x) - 1 - x, max=10.0)
    raise ValueError(f"unknown kl_estimator {estimator!r} (k1 | k2 | k3)")


def _check_vec(name: str, t: torch.Tensor | None, n: int, *, integer: bool = False, finite_where=None) -> None:
    if t is None:
        return
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape [N]=({n},), got {tuple(t.shape)}")
    if integer and (t.dtype.is_floating_point or t.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if finite_where is not None:
        bad = finite_where & ~torch.isfinite(t)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"{name}[{i}] is not finite ({float(t[i])})")


def compute_loss(logits: torch.Tensor, tokens: torch.Tensor, old_logp: torch.Tensor | None, advantages: torch.Tensor,
                 seq_ids: torch.Tensor, counts: BatchCounts, cfg: AlgorithmConfig, *,
                 temperature: float = 1.0, chunk: int = 1024, valid: torch.Tensor | None = None,
                 ref_logp: torch.Tensor | None = None, mask: tuple[torch.Tensor, float] | None = None,
                 entropy_coef: float | None = None, generator: torch.Generator | None = None,
                 token_weight: torch.Tensor | None = None, grad_buffer: torch.Tensor | None = None,
                 stats: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
    """The loss of one micro-batch and its statistics part (`learner.stats.summarize` merges parts).

    logits [N, V] at the response positions (float32/bf16, differentiable); tokens [N] sampled ids;
    old_logp [N] pi_old log-probs at `temperature`, or None when pi_old is the policy of these logits (one
      update per step): the detached log-probs of this pass, returned in part["tokens/logp"];
    advantages [N] (broadcast per response); seq_ids [N];
    counts: GLOBAL mini-batch counts (module doc); valid [N] bool or None (all).
    ref_logp [N]: reference-policy log-probs, required when cfg.kl_coef > 0.
    mask: (selected [N] bool, tau), this micro-batch's slice of the mask the caller computed over the
      mini-batch (`forking_mask`) or all ranks (`global_forking_mask`); required for entropy_scope
      mini/global when a mask is in use. None with entropy_scope=micro: computed here from this
      micro-batch's entropies. No mask is in use when rho = 1 and mask_variant is top or random.
    entropy_coef: the entropy-bonus coefficient alpha; None = cfg.entropy_coef (with adaptive_entropy the
      caller must pass `EntropyControl.alpha`).
    generator: seeded torch.Generator for mask_variant=random and Clip-Cov's random pick.
    token_weight [N]: optional non-negative weight on each token's policy term, treated as a constant
      (truncated importance sampling min(pi_old / pi_sampler, algorithm.tis_cap), Yao et al. 2025; verl
      rollout_correction multiplies pg_losses the same way). The KL and entropy terms are not weighted.
    grad_buffer, chunk: see `token_stats`. stats=False skips the entropy (unless the mask or the bonus
    needs it) and every statistic: the cheapest loss.
    Returns (loss scalar, part): part holds python floats (counts, sums, min/max, the loss terms) and the
    detached per-token entropy and covariance of the valid tokens.
    """
    n = logits.shape[0] if logits.dim() == 2 else -1
    if n < 0:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    _check_vec("valid", valid, n)
    if valid is not None and valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor, got {valid.dtype}")
    valid = torch.ones(n, dtype=torch.bool, device=logits.device) if valid is None else valid
    _check_vec("seq_ids", seq_ids, n, integer=True)
    if n and int(seq_ids.min()) < 0:
        raise ValueError(f"seq_ids[{int((seq_ids < 0).nonzero()[0])}] is negative")
    on_policy = old_logp is None
    if not on_policy:
        _check_vec("old_logp", old_logp, n, finite_where=valid)
    _check_vec("advantages", advantages, n, finite_where=valid)
    if cfg.kl_coef > 0 and ref_logp is None:
        raise ValueError("algorithm.kl_coef > 0 needs ref_logp (reference-policy log-probs)")
    _check_vec("ref_logp", ref_logp, n, finite_where=valid)
    _check_vec("token_weight", token_weight, n, finite_where=valid)
    if token_weight is not None and bool((valid & (token_weight < 0)).any()):
        raise ValueError(f"token_weight[{int((valid & (token_weight < 0)).nonzero()[0])}] is negative")
    if entropy_coef is None:
        if cfg.adaptive_entropy:
            raise ValueError("adaptive_entropy: pass entropy_coef=EntropyControl.alpha from the controller")
        entropy_coef = cfg.entropy_coef
    masked = mask_active(cfg.top_entropy_ratio, cfg.mask_variant)
    if mask is not None:
        if mask[0].shape != (n,) or mask[0].dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape ({n},), got {tuple(mask[0].shape)}")
    elif masked and cfg.entropy_scope != "micro":
        raise ValueError(f"entropy_scope={cfg.entropy_scope!r} needs the precomputed mask of the whole "
                         "mini-batch (masks.forking_mask / distributed.global_forking_mask)")
    need_entropy = stats or entropy_coef > 0 or (mask is None and masked)

    logp, entropy = token_stats(logits, tokens, temperature, chunk=chunk, with_entropy=need_entropy,
                                grad_buffer=grad_buffer)

    if on_policy:
        old_logp = logp.detach()

    def clean(t: torch.Tensor | None) -> torch.Tensor | None:
        # zero the inputs of invalid tokens: a NaN there would reach the gradient as 0 * NaN = NaN
        return None if t is None else torch.where(valid, t.detach().to(logp.dtype), 0.0)

    old_logp, adv, ref_logp, token_weight = map(clean, (old_logp, advantages, ref_logp, token_weight))

    if mask is not None:
        selected, tau = mask[0] & valid, float(mask[1])
    elif masked:
        selected, tau = forking_mask(entropy.detach(), cfg.top_entropy_ratio, cfg.mask_variant, valid=valid,
                                     generator=generator)
    else:
        selected, tau = valid, float("nan")

    cov_clipped = penalised = dual = None
    if cfg.policy_loss == "ppo":
        per_tok, ratio, clipped_low, clipped_high, dual = ppo_clip(
            logp, old_logp, adv, cfg.clip_low, cfg.clip_high, cfg.dual_clip_c, cfg.log_ratio_clamp)
    elif cfg.policy_loss == "clip_cov":
        per_tok, ratio, clipped_low, clipped_high, cov_clipped = clip_cov(logp, old_logp, adv, valid, cfg, generator)
    else:
        per_tok, ratio, penalised = kl_cov(logp, old_logp, adv, valid, cfg)
        clipped_low = clipped_high = None

    if token_weight is not None:
        per_tok = per_tok * token_weight
    pg_norm, all_norm = normalizers(cfg, counts)
    per_seq = selected if cfg.entropy_norm == "selected_tokens" else valid
    pg_loss = aggregate(per_tok, selected, per_seq, seq_ids, cfg.loss_agg, pg_norm)
    loss = pg_loss
    kl_loss = ent_loss = None
    kl_tok = None
    if ref_logp is not None:
        kl_tok = kl_penalty(logp, ref_logp, cfg.kl_estimator, cfg.log_ratio_clamp)
        if cfg.kl_coef > 0:
            kl_loss = cfg.kl_coef * aggregate(kl_tok, valid, valid, seq_ids, cfg.loss_agg, all_norm)
            loss = loss + kl_loss
    if entropy_coef > 0:
        ent_loss = -entropy_coef * aggregate(entropy, valid, valid, seq_ids, cfg.loss_agg, all_norm)
        loss = loss + ent_loss
    if not stats:
        return loss, {"loss": float(loss.detach()), **({"tokens/logp": logp.detach()} if on_policy else {})}

    def count(m: torch.Tensor | None, within: torch.Tensor = selected) -> float:
        return float((m & within).sum()) if m is not None else 0.0

    # invalid tokens hold 0 in old_logp/adv (clean): sums need no indexing, only masked min/max do
    keep = None if bool(valid.all()) else valid.nonzero().squeeze(1)

    def valid_only(t: torch.Tensor) -> torch.Tensor:
        return t.detach() if keep is None else t.detach().index_select(0, keep)

    lr = valid_only(logp - old_logp)
    r = valid_only(ratio)
    part: dict[str, Any] = {
        "loss": float(loss.detach()),
        "loss/pg": float(pg_loss.detach()),
        "loss/kl": float(kl_loss.detach()) if kl_loss is not None else 0.0,
        "loss/entropy_bonus": float(ent_loss.detach()) if ent_loss is not None else 0.0,
        "count/tokens": float(valid.sum()),
        "count/selected": float(selected.sum()),
        "count/clip_low": count(clipped_low),
        "count/clip_high": count(clipped_high),
        "count/dual_clip": count(dual),
        "count/clip_cov": count(cov_clipped, valid),
        "count/kl_cov": count(penalised, valid),
        "sum/approx_kl": float((-lr).sum()),                       # k1 of KL(pi_old || pi_theta)
        "sum/approx_kl_k3": float((torch.exp(lr) - 1 - lr).sum()),
        "sum/ratio": float(r.double().sum()),
        "sum/ratio_sq": float((r.double() ** 2).sum()),
        "min/ratio": float(r.min()) if r.numel() else math.inf,
        "max/ratio": float(r.max()) if r.numel() else -math.inf,
        "sum/neg_old_logp": float(-old_logp.double().sum()),
        "sum/ref_kl": float(valid_only(kl_tok).double().sum()) if kl_tok is not None else 0.0,
        "tau": tau,
        "entropy_coef": float(entropy_coef),
        "tokens/entropy": valid_only(entropy) if entropy is not None else None,
        "tokens/cov": valid_only(token_covariance(logp, adv, valid)),
    }
    if on_policy:
        part["tokens/logp"] = logp.detach()
    return loss, part
