"""Outcome-reward advantages per prompt group (ALGORITHMS.md 5).

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
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [G], got shape {tuple(rewards.shape)}")
    g = rewards.numel()
    if g <= 1:
        return torch.zeros_like(rewards)
    centred = rewards - rewards.mean()
    if estimator == "grpo":
        return centred / (rewards.std(unbiased=True) + eps)
    if estimator == "drgrpo":
        return centred
    if estimator == "rloo":
        return centred * (g / (g - 1))
    raise ValueError(f"unknown advantage estimator {estimator!r} (grpo | drgrpo | rloo)")


def broadcast_to_tokens(advantages: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """advantages [B], lengths [B] (response tokens per sequence) -> [sum(lengths)] packed per token."""
    return torch.repeat_interleave(advantages, lengths.to(torch.long))
