"""Policy losses for one packed micro-batch (docs/algorithms.md 1.3, 2.4-2.6, 3.1, 5).

Tensors are packed and padding-free: a micro-batch's response tokens are flat [N] vectors, `seq_ids [N]`
(int64 in [0, S)) says which response each token belongs to, and logits are [N, V] for exactly those
positions. A response lies whole in one micro-batch (seq-mean-token-mean divides by its full length).
`valid [N]` (optional, default all True) drops tokens from everything: loss, gradient, mask, statistics.

Normalisation (what `BatchCounts` must hold). Every normaliser is a GLOBAL count over the whole PPO
mini-batch: all its micro-batches on all data-parallel ranks. Then
    sum over micro-batches and ranks of micro_batch_loss(...).loss == the mini-batch loss
exactly, whatever the micro-batch split, and so do the gradients. Per `AlgorithmConfig.loss_agg`:
    token-mean (DAPO)               sum_t l_t / D,   D = counts.tokens, or counts.selected when
                                    entropy_norm = selected_tokens (the released 80/20 code);
    seq-mean-token-mean (GRPO)      sum_i (sum_{t in i} l_t / n_i) / counts.responses, n_i = the response's
                                    valid tokens, or its selected tokens under selected_tokens (a response
                                    with none selected contributes 0);
    seq-mean-token-sum (verl)       sum_t l_t / counts.responses (each response's token sum, then the mean
                                    over responses: verl core_algos.agg_loss "seq-mean-token-sum");
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

Two entropy-shaped variants (docs/algorithms.md 9.1-9.2): with `entropy_window` w > 1 the micro-scope mask
ranks tokens by `masks.window_entropy` (the mini/global masks arrive precomputed the same way), and with
`entropy_adv_alpha` > 0 every valid token's advantage becomes A + min(alpha * H.detach(), |A| / kappa)
before the policy loss (Cheng et al. 2506.14758); part["sum/adv_entropy_shaping"] sums the added term.

The policy loss (`AlgorithmConfig.policy_loss`: ppo, clip_cov, kl_cov) comes from the registry of
`learner.policy_losses` (per-token values; the forking mask, the aggregation, the KL and entropy terms
are the same for all of them, here in `micro_batch_loss`). Its statistics come from `loss_statistics` as 0-d
device tensors: the training step calls `micro_batch_loss(..., check=False, num_seqs=S)` per micro-batch
without a host synchronisation and moves the step's parts to the host once (`stats.parts_to_host`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cluster.config import AlgorithmConfig
from learner.masks import forking_mask, mask_active, select_tokens, window_entropy
from learner.policy_losses import PolicyLossInputs, PolicyLossOutputs, get_policy_loss, token_covariance
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
    if cfg.loss_agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return float(counts.responses), float(counts.responses)
    norm = float(counts.responses * counts.max_len)
    return norm, norm


def aggregate(values: torch.Tensor, include: torch.Tensor, per_seq_count: torch.Tensor, seq_ids: torch.Tensor,
              mode: str, norm: float, num_seqs: int | None = None) -> torch.Tensor:
    """values [N], include [N] bool (terms that count), per_seq_count [N] bool (tokens counted in a
    response's own denominator, seq-mean-token-mean only), seq_ids [N] -> scalar (see module doc).
    num_seqs: S = seq_ids.max() + 1 when the caller knows it (no device sync), None to read it.
    Excluded tokens contribute exactly 0 and get exactly zero gradient, even if their value is inf/NaN."""
    v = torch.where(include, values, torch.zeros((), dtype=values.dtype, device=values.device))
    norm = norm if norm > 0 else 1.0   # nothing selected anywhere: the numerator is 0 too
    if mode == "seq-mean-token-mean":
        s = num_seqs if num_seqs is not None else int(seq_ids.max()) + 1 if seq_ids.numel() else 0
        seq_sum = torch.zeros(s, dtype=v.dtype, device=v.device).index_add(0, seq_ids, v)
        seq_n = torch.zeros(s, dtype=v.dtype, device=v.device).index_add(0, seq_ids, per_seq_count.to(v.dtype))
        return (seq_sum / seq_n.clamp(min=1)).sum() / norm
    if mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        return v.sum() / norm
    raise ValueError(f"unknown loss_agg {mode!r}")


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
    """Shape and dtype of an [N] input; finite_where: None (no value check), True (all tokens) or valid [N]."""
    if t is None:
        return
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape [N]=({n},), got {tuple(t.shape)}")
    if integer and (t.dtype.is_floating_point or t.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if finite_where is not None:
        bad = ~torch.isfinite(t) if finite_where is True else finite_where & ~torch.isfinite(t)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"{name}[{i}] is not finite ({float(t[i])})")


def check_inputs(n: int, *, seq_ids: torch.Tensor | None = None, old_logp: torch.Tensor | None = None,
                 advantages: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
                 token_weight: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                 ref_required: bool = False, values: bool = True) -> None:
    """Shapes and dtypes of `micro_batch_loss`'s [N] inputs (host only), ref_logp present when
    ref_required, and with values=True the checks that read the device (each a host sync): seq_ids >= 0,
    old_logp / advantages / ref_logp / token_weight finite at the valid tokens, token_weight >= 0. The
    training step checks the values once per step over the step's [T] vectors (check=False in the loss)."""
    _check_vec("valid", valid, n)
    if valid is not None and valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor, got {valid.dtype}")
    where = (True if valid is None else valid) if values else None
    _check_vec("seq_ids", seq_ids, n, integer=True)
    if values and seq_ids is not None and n and int(seq_ids.min()) < 0:
        raise ValueError(f"seq_ids[{int((seq_ids < 0).nonzero()[0])}] is negative")
    _check_vec("old_logp", old_logp, n, finite_where=where)
    _check_vec("advantages", advantages, n, finite_where=where)
    if ref_required and ref_logp is None:
        raise ValueError("algorithm.kl_coef > 0 needs ref_logp (reference-policy log-probs)")
    _check_vec("ref_logp", ref_logp, n, finite_where=where)
    _check_vec("token_weight", token_weight, n, finite_where=where)
    if values and token_weight is not None:
        neg = token_weight < 0 if valid is None else valid & (token_weight < 0)
        if bool(neg.any()):
            raise ValueError(f"token_weight[{int(neg.nonzero()[0])}] is negative")


LossPart = dict[str, Any]
"""One micro-batch's statistics part: counts, sums, min/max and loss terms (0-d tensors on the device from
`micro_batch_loss`, python floats after `learner.stats.parts_to_host`), tau, entropy_coef, and the detached
per-token tokens/entropy and tokens/cov [n_valid] (tokens/logp [N] on-policy)."""


def compute_loss(logits: torch.Tensor, tokens: torch.Tensor, old_logp: torch.Tensor | None, advantages: torch.Tensor,
                 seq_ids: torch.Tensor, counts: BatchCounts, cfg: AlgorithmConfig, **kw) -> tuple[torch.Tensor, LossPart]:
    """`micro_batch_loss` with every check and its part on the host (python floats): one micro-batch on
    its own (tests, benchmarks). The training step calls `micro_batch_loss` and moves its parts to the
    host once per step."""
    from learner.stats import parts_to_host

    loss, part = micro_batch_loss(logits, tokens, old_logp, advantages, seq_ids, counts, cfg, **kw)
    return loss, parts_to_host([part])[0]


def micro_batch_loss(logits: torch.Tensor, tokens: torch.Tensor, old_logp: torch.Tensor | None,
                     advantages: torch.Tensor, seq_ids: torch.Tensor, counts: BatchCounts, cfg: AlgorithmConfig, *,
                     temperature: float = 1.0, chunk: int = 1024, valid: torch.Tensor | None = None,
                     ref_logp: torch.Tensor | None = None, mask: tuple[torch.Tensor, float] | None = None,
                     entropy_coef: float | None = None, generator: torch.Generator | None = None,
                     token_weight: torch.Tensor | None = None, grad_buffer: torch.Tensor | None = None,
                     stats: bool = True, num_seqs: int | None = None,
                     check: bool = True) -> tuple[torch.Tensor, LossPart]:
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
    needs it) and every statistic: the cheapest loss. num_seqs: S (seq_ids in [0, S)) if known.
    check=False skips the value checks of `check_inputs` (the caller ran them over the whole step).
    With valid=None, check=False and num_seqs given, nothing here synchronises with the device (Clip-Cov's
    draw excepted, see `clip_cov`; `token_stats` checks its own inputs).
    Returns (loss scalar, part): part holds 0-d tensors (counts, sums, min/max, the loss terms; see
    `loss_statistics`) and the detached per-token entropy and covariance of the valid tokens.
    """
    n = logits.shape[0] if logits.dim() == 2 else -1
    if n < 0:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    check_inputs(n, seq_ids=seq_ids, old_logp=old_logp, advantages=advantages, ref_logp=ref_logp,
                 token_weight=token_weight, valid=valid, ref_required=cfg.kl_coef > 0, values=check)
    all_valid = valid is None     # known on the host: no mask reads, no indexing
    valid = torch.ones(n, dtype=torch.bool, device=logits.device) if valid is None else valid
    num_valid = n if all_valid else int(valid.sum())
    on_policy = old_logp is None
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
    policy_loss = get_policy_loss(cfg.policy_loss)
    shaping = cfg.entropy_adv_alpha > 0
    need_entropy = stats or entropy_coef > 0 or shaping or (mask is None and masked)

    logp, entropy = token_stats(logits, tokens, temperature, chunk=chunk, with_entropy=need_entropy,
                                grad_buffer=grad_buffer)

    if on_policy:
        old_logp = logp.detach()

    def clean(t: torch.Tensor | None) -> torch.Tensor | None:
        # zero the inputs of invalid tokens: a NaN there would reach the gradient as 0 * NaN = NaN
        return None if t is None else torch.where(valid, t.detach().to(logp.dtype), 0.0)

    old_logp, adv, ref_logp, token_weight = map(clean, (old_logp, advantages, ref_logp, token_weight))

    rank_by = None
    if mask is None and masked:   # what the micro-scope mask ranks: H_t, or its window mean (ARES/AEPO)
        rank_by = entropy.detach() if cfg.entropy_window == 1 else \
            window_entropy(entropy, seq_ids, cfg.entropy_window, None if all_valid else valid)
    if mask is not None:
        selected, tau = mask[0] & valid, float(mask[1])
    elif masked and (check or not all_valid):
        selected, tau = forking_mask(rank_by, cfg.top_entropy_ratio, cfg.mask_variant, valid=valid,
                                     generator=generator)
    elif masked:   # the same selection, its threshold left on the device
        pick, tau = select_tokens(rank_by, cfg.top_entropy_ratio, cfg.mask_variant, generator)
        selected = torch.zeros(n, dtype=torch.bool, device=logits.device)
        selected[pick] = True
    else:
        selected, tau = valid, float("nan")

    shaping_sum = None
    if shaping:   # Cheng et al. 2506.14758: A' = A + min(alpha * H.detach(), |A| / kappa), per token
        psi = torch.minimum(cfg.entropy_adv_alpha * entropy.detach(), adv.abs() / cfg.entropy_adv_kappa)
        psi = torch.where(valid, psi, 0.0)
        adv = adv + psi
        shaping_sum = psi.double().sum()
    out = policy_loss(PolicyLossInputs(logp, old_logp, adv, valid, num_valid, generator), cfg)
    per_tok = out.loss
    if token_weight is not None:
        per_tok = per_tok * token_weight
    pg_norm, all_norm = normalizers(cfg, counts)
    per_seq = selected if cfg.entropy_norm == "selected_tokens" else valid
    pg_loss = aggregate(per_tok, selected, per_seq, seq_ids, cfg.loss_agg, pg_norm, num_seqs)
    loss = pg_loss
    kl_loss = ent_loss = None
    kl_tok = None
    if ref_logp is not None:
        kl_tok = kl_penalty(logp, ref_logp, cfg.kl_estimator, cfg.log_ratio_clamp)
        if cfg.kl_coef > 0:
            kl_loss = cfg.kl_coef * aggregate(kl_tok, valid, valid, seq_ids, cfg.loss_agg, all_norm, num_seqs)
            loss = loss + kl_loss
    if entropy_coef > 0:
        ent_loss = -entropy_coef * aggregate(entropy, valid, valid, seq_ids, cfg.loss_agg, all_norm, num_seqs)
        loss = loss + ent_loss
    if not stats:
        return loss, {"loss": loss.detach(), **({"tokens/logp": logp.detach()} if on_policy else {})}
    part = loss_statistics(out, logp=logp, old_logp=old_logp, adv=adv, valid=valid, all_valid=all_valid,
                           selected=selected, entropy=entropy, kl_tok=kl_tok,
                           terms=(loss, pg_loss, kl_loss, ent_loss), tau=tau, entropy_coef=entropy_coef)
    if shaping_sum is not None:
        part["sum/adv_entropy_shaping"] = shaping_sum
    if on_policy:
        part["tokens/logp"] = logp.detach()
    return loss, part


def loss_statistics(out: PolicyLossOutputs, *, logp: Tensor, old_logp: Tensor, adv: Tensor, valid: Tensor,
                    all_valid: bool, selected: Tensor, entropy: Tensor | None, kl_tok: Tensor | None,
                    terms: tuple[Tensor, Tensor, Tensor | None, Tensor | None], tau: float | Tensor,
                    entropy_coef: float) -> LossPart:
    """One micro-batch's statistics part, every value a 0-d tensor on the device (or a python float the
    host already had): no host synchronisation unless some token is invalid (all_valid=False, where the
    valid tokens are indexed for the min/max and the per-token vectors).

    out: the policy loss's outputs; logp [N] (this pass), old_logp [N] and adv [N] (0 at invalid tokens),
    valid / selected [N] bool; entropy [N] or None; kl_tok [N] per-token KL to the reference or None;
    terms: (loss, pg, kl or None, entropy bonus or None) scalars; tau: the mask threshold (NaN: none)."""
    loss, pg_loss, kl_loss, ent_loss = terms
    zero = torch.zeros((), dtype=torch.float64, device=logp.device)

    def count(m: Tensor | None, within: Tensor = selected) -> Tensor:
        return (m & within).sum() if m is not None else zero

    # invalid tokens hold 0 in old_logp/adv (clean): sums need no indexing, only masked min/max do
    keep = None if all_valid or bool(valid.all()) else valid.nonzero().squeeze(1)

    def valid_only(t: Tensor) -> Tensor:
        return t.detach() if keep is None else t.detach().index_select(0, keep)

    lr = valid_only(logp - old_logp)
    r = valid_only(out.ratio)
    inf = torch.full((), math.inf, device=logp.device)
    return {
        "loss": loss.detach(),
        "loss/pg": pg_loss.detach(),
        "loss/kl": kl_loss.detach() if kl_loss is not None else zero,
        "loss/entropy_bonus": ent_loss.detach() if ent_loss is not None else zero,
        "count/tokens": valid.sum(),
        "count/selected": selected.sum(),
        "count/clip_low": count(out.clipped_low),
        "count/clip_high": count(out.clipped_high),
        "count/dual_clip": count(out.dual_clipped),
        "count/clip_cov": count(out.cov_clipped, valid),
        "count/kl_cov": count(out.kl_penalised, valid),
        "sum/approx_kl": (-lr).sum(),                       # k1 of KL(pi_old || pi_theta)
        "sum/approx_kl_k3": (torch.exp(lr) - 1 - lr).sum(),
        "sum/ratio": r.double().sum(),
        "sum/ratio_sq": (r.double() ** 2).sum(),
        "min/ratio": r.min() if r.numel() else inf,
        "max/ratio": r.max() if r.numel() else -inf,
        "sum/neg_old_logp": -old_logp.double().sum(),
        "sum/ref_kl": valid_only(kl_tok).double().sum() if kl_tok is not None else zero,
        "tau": tau,
        "entropy_coef": float(entropy_coef),
        "tokens/entropy": valid_only(entropy) if entropy is not None else None,
        "tokens/cov": valid_only(token_covariance(logp, adv, valid)),
    }
