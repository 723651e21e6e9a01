"""Outcome-reward advantages per prompt group (docs/algorithms.md 5).

All estimators take the rewards of one group, shape [G], and return one advantage per response, [G];
`broadcast_to_tokens` spreads them over each response's tokens.
"""

from __future__ import annotations

import torch

GRPO_EPS = 1e-6  # verl compute_grpo_outcome_advantage


def compute_advantages(rewards: torch.Tensor, estimator: str, eps: float = GRPO_EPS) -> torch.Tensor:
    """rewards [G] -> advantages [G] (same dtype). A one-member group has advantage 0.

    grpo:   (R_i - mean) / (std + eps), std unbiased (N-1)          DeepSeekMath 2402.03300
    drgrpo: R_i - mean                                               Dr.GRPO 2503.20783
    rloo:   R_i - mean_{j != i} R_j = G/(G-1) (R_i - mean)           Kool et al. / Ahmadian et al.
    """
    if estimator not in ("grpo", "drgrpo", "rloo"):   # checked first: a typo must not pass on 1-member groups
        raise ValueError(f"unknown advantage estimator {estimator!r} (grpo | drgrpo | rloo)")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [G], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating tensor, got {rewards.dtype}")
    if not bool(torch.isfinite(rewards).all()):
        i = int((~torch.isfinite(rewards)).nonzero()[0])
        raise ValueError(f"rewards[{i}] is not finite ({float(rewards[i])}): it would poison the whole group")
    g = rewards.numel()
    if g <= 1:
        return torch.zeros_like(rewards)
    # float64: a float32 group of equal rewards (0.7 x 8) has a float32 mean 1 ulp off, hence a std of
    # ~6e-8 and GRPO advantages of ~0.06 instead of exactly 0; float64 sums of float32 values are exact
    r = rewards.double()
    centred = r - r.mean()
    if estimator == "grpo":
        out = centred / (r.std(unbiased=True) + eps)
    elif estimator == "drgrpo":
        out = centred
    else:
        out = centred * (g / (g - 1))
    return out.to(rewards.dtype)


def broadcast_to_tokens(advantages: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """advantages [B], lengths [B] (response tokens per sequence) -> [sum(lengths)] packed per token."""
    if advantages.dim() != 1 or lengths.shape != advantages.shape:
        raise ValueError(f"advantages and lengths must both be [B], got {tuple(advantages.shape)} and "
                         f"{tuple(lengths.shape)}")
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError(f"lengths[{int((lengths < 0).nonzero()[0])}] is negative")
    return torch.repeat_interleave(advantages, lengths.to(torch.long))
