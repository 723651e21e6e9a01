"""Policy losses: one registry keyed by `AlgorithmConfig.policy_loss`, one signature (docs/algorithms.md 1.3,
2.5, 2.6).

Every loss is `fn(inputs: PolicyLossInputs, cfg: AlgorithmConfig) -> PolicyLossOutputs`, registered with
`register_policy_loss(name)` and found with `get_policy_loss(name)` (verl's register_policy_loss, prime-rl's
LossInputs/LossOutputs). It maps the N response tokens of one packed micro-batch to per-token losses and
the flags its statistics count; the forking mask, the aggregation (token-mean, seq-mean-...), the KL and
entropy terms and the statistics are common to all and live in `learner.losses.micro_batch_loss`.
Registered: ppo (`ppo_clip`: clip-higher, dual clip), clip_cov and kl_cov (Cui et al. 2505.22617).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cluster.config import AlgorithmConfig


def _log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, clamp: float) -> torch.Tensor:
    return torch.clamp(logp - old_logp, -clamp, clamp)


@dataclass(frozen=True)
class PolicyLossInputs:
    """What every policy loss reads, for the N response tokens of one packed micro-batch."""

    logp: Tensor              # [N] float32, differentiable: log pi_theta(y_t) at the rollout temperature
    old_logp: Tensor          # [N] float32, detached: log pi_old(y_t); 0 at invalid tokens
    advantages: Tensor        # [N] float32, detached, each response's advantage on its tokens; 0 at invalid ones
    valid: Tensor             # [N] bool: the tokens that count
    num_valid: int            # valid.sum(), known on the host (the caller counts it: no device sync)
    generator: torch.Generator | None = None   # seeded, for the losses that draw tokens at random


@dataclass(frozen=True)
class PolicyLossOutputs:
    """Per-token policy loss (before the forking mask and the aggregation) and what it did to each token."""

    loss: Tensor                         # [N] float32, differentiable
    ratio: Tensor                        # [N] float32, detached: exp(clamped logp - old_logp)
    clipped_low: Tensor | None = None    # [N] bool: PPO's lower clip active (A < 0, r < 1 - eps_low)
    clipped_high: Tensor | None = None   # [N] bool: PPO's upper clip active (A > 0, r > 1 + eps_high)
    dual_clipped: Tensor | None = None   # [N] bool: the dual clip active (A < 0, r > c)
    cov_clipped: Tensor | None = None    # [N] bool: Clip-Cov detached the token
    kl_penalised: Tensor | None = None   # [N] bool: KL-Cov added its penalty to the token


PolicyLoss = Callable[[PolicyLossInputs, AlgorithmConfig], PolicyLossOutputs]
_POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLoss], PolicyLoss]:
    """Register `fn(inputs: PolicyLossInputs, cfg: AlgorithmConfig) -> PolicyLossOutputs` under the
    AlgorithmConfig.policy_loss value `name` (verl's register_policy_loss)."""
    def register(fn: PolicyLoss) -> PolicyLoss:
        if name in _POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is registered twice")
        _POLICY_LOSSES[name] = fn
        return fn
    return register


def get_policy_loss(name: str) -> PolicyLoss:
    """The policy loss registered under `name` (an AlgorithmConfig.policy_loss value)."""
    try:
        return _POLICY_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown policy_loss {name!r} (registered: {', '.join(sorted(_POLICY_LOSSES))})") from None


def policy_loss_names() -> tuple[str, ...]:
    return tuple(_POLICY_LOSSES)


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


@register_policy_loss("ppo")
def ppo(inputs: PolicyLossInputs, cfg: AlgorithmConfig) -> PolicyLossOutputs:
    """The PPO clipped surrogate with clip-higher and the optional dual clip (`ppo_clip`)."""
    loss, r, low, high, dual = ppo_clip(inputs.logp, inputs.old_logp, inputs.advantages, cfg.clip_low,
                                        cfg.clip_high, cfg.dual_clip_c, cfg.log_ratio_clamp)
    return PolicyLossOutputs(loss, r, clipped_low=low, clipped_high=high, dual_clipped=dual)


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


@register_policy_loss("clip_cov")
def clip_cov(inputs: PolicyLossInputs, cfg: AlgorithmConfig) -> PolicyLossOutputs:
    """Clip-Cov (Cui et al. 2505.22617 Eq. 11-12, verl compute_policy_loss_clip_cov). Among valid tokens
    not already clipped by PPO with lb < Cov < ub (strict), max(int(r N), 1) drawn uniformly with the
    inputs' generator get their loss and gradient detached (set to 0); the rest is max(-A r, -A clip(r))
    (no dual clip). Cov is over this micro-batch's valid tokens, the released code's scope (authors: it
    approximates the global top-Cov tokens per GPU). r uses the PPO log-ratio clamp, which verl's
    Clip-Cov/KL-Cov omit: identical unless |log r| > log_ratio_clamp, where theirs overflows.
    The one host synchronisation of any policy loss: the draw is a permutation of the candidates, whose
    number only the device knows (as in verl)."""
    generator = inputs.generator
    if generator is None:
        raise ValueError("policy_loss='clip_cov' draws its tokens at random: pass a seeded torch.Generator")
    logp, adv, valid = inputs.logp, inputs.advantages, inputs.valid
    loss, r, clipped_low, clipped_high, _ = ppo_clip(logp, inputs.old_logp, adv, cfg.clip_low, cfg.clip_high, None,
                                                     cfg.log_ratio_clamp)
    cov = token_covariance(logp, adv, valid)
    cand = valid & ~(clipped_low | clipped_high) & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
    cand_idx = cand.nonzero().squeeze(1)
    n_clip = _pick_count(cfg.clip_cov_ratio, inputs.num_valid)
    pick = cand_idx[torch.randperm(cand_idx.numel(), generator=generator, device=generator.device)[:n_clip]
                    .to(cand_idx.device)]
    cov_clipped = torch.zeros_like(valid)
    cov_clipped[pick] = True
    loss = torch.where(cov_clipped, torch.zeros((), dtype=loss.dtype, device=loss.device), loss)
    return PolicyLossOutputs(loss, r, clipped_low=clipped_low, clipped_high=clipped_high, cov_clipped=cov_clipped)


@register_policy_loss("kl_cov")
def kl_cov(inputs: PolicyLossInputs, cfg: AlgorithmConfig) -> PolicyLossOutputs:
    """KL-Cov (Cui et al. Eq. 13-14, verl compute_policy_loss_kl_cov). No PPO clipping: loss = -A r, plus
    beta |logp - old_logp| on the max(int(k N), 1) valid tokens of largest Cov (ties: earlier position
    first). Scope and clamp as in `clip_cov`."""
    logp, old_logp, adv, valid = inputs.logp, inputs.old_logp, inputs.advantages, inputs.valid
    ratio = torch.exp(_log_ratio(logp, old_logp, cfg.log_ratio_clamp))
    loss = -adv * ratio
    penalised = torch.zeros_like(valid)
    n = inputs.num_valid
    if n:
        cov = token_covariance(logp, adv, valid)
        idx = None if n == valid.numel() else valid.nonzero().squeeze(1)   # all valid: no indexing, no sync
        if idx is not None:
            cov = cov[idx]
        k = min(_pick_count(cfg.kl_cov_ratio, n), n)
        top = torch.sort(cov, descending=True, stable=True).indices[:k]
        penalised[top if idx is None else idx[top]] = True
        loss = torch.where(penalised, loss + cfg.kl_cov_coef * (logp - old_logp).abs(), loss)
    return PolicyLossOutputs(loss, ratio.detach(), kl_penalised=penalised)
