"""Forking-token masks: which response tokens the policy gradient trains on (docs/algorithms.md 1.2-1.3).

Wang et al. 2506.01939 ("Beyond the 80/20 Rule") train only on the top-rho share of tokens by entropy,
k = ceil(rho * N) of the N valid response tokens (verl `get_global_entropy_top_mask`: max(1, ceil)).
Selection is exact and deterministic: exactly k tokens, ties in entropy broken by position (the earlier
token wins), so the same entropies always give the same mask, and a mask over a concatenation (rank-major
order, `learner.distributed.global_forking_mask`) is the mask of the concatenated batch.

Scopes (AlgorithmConfig.entropy_scope) are the caller's choice of what `entropy` covers: one micro-batch
(`micro`, the released 80/20 code; the loss does it), the rank's mini-batch (`mini`: the step concatenates
its micro-batches' entropies in order, calls `forking_mask`, slices the result per micro-batch) or the whole
mini-batch across ranks (`global`). `mask_active` and `scope_selected_count` are the one place the step and
the loss learn whether a mask is in use and how many tokens it selects.

The `threshold` variant is TRL's form (GRPOTrainer top_entropy_quantile, `get_high_entropy_mask`): tau is
the (1 - rho) quantile of the valid entropies with linear interpolation (torch.quantile's default) and the
mask is H >= tau, so it takes EVERY token tied at the threshold: its count depends on the entropies (>= the
top-k count when tau falls on a tie, the k of ceil or floor otherwise), not on counts alone.

Window entropy (AlgorithmConfig.entropy_window = w > 1; ARES/AEPO, Chen et al. arXiv 2510.08457): the mask
ranks tokens by `window_entropy`, the mean of the single-token entropies over the window of w positions that
starts at the token (H_bar_{t:w} = mean of H_t .. H_{t+w-1}), inside the token's own response only; the
caller replaces `entropy` by it before `forking_mask`, whatever the variant and scope (a response lies whole
on one rank and in one micro-batch, so the windows are the same at every scope).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

VARIANTS = ("top", "bottom", "random", "threshold")


def top_count(n: int, rho: float) -> int:
    """k = ceil(rho * n), at least 1 when n > 0. rho*n is rounded to 9 decimal places first so that
    binary floating point does not turn 0.07 * 100 = 7.000000000000001 into 8."""
    if not 0 < rho <= 1:
        raise ValueError(f"top_entropy_ratio must be in (0, 1], got {rho!r}")
    if n <= 0:
        return 0
    return min(n, max(1, math.ceil(round(rho * n, 9))))


def selected_count(n: int, rho: float, variant: str = "top") -> int:
    """How many of n valid tokens the mask selects: k for top/random, n - k for bottom. Known from counts
    alone, so the caller can compute the `selected_tokens` normaliser before any forward pass. The
    threshold variant's count depends on ties: k here is its nominal count (config forbids the
    selected_tokens normaliser with threshold at the micro scope, where only this count is known)."""
    _check_variant(variant)
    k = top_count(n, rho)
    return n - k if variant == "bottom" else k


def mask_active(rho: float, variant: str) -> bool:
    """Whether a forking mask selects fewer than all tokens: rho < 1, or the bottom variant (which keeps the
    n - k low-entropy tokens). rho = 1 with top or random selects every token: no mask is in use."""
    return rho < 1 or variant == "bottom"


def scope_selected_count(micro_tokens: Sequence[int], rho: float, variant: str,
                         mask: torch.Tensor | None) -> int:
    """The tokens of one rank's mini-batch that the mask selects (before the sum over ranks that makes
    `BatchCounts.selected`): `mask` [total] bool, the precomputed mini/global mask, counts itself; without it
    the micro scope selects `selected_count` of each micro-batch's tokens (`micro_tokens`); with no mask in
    use every token counts."""
    if mask is not None:
        return int(mask.sum())
    if mask_active(rho, variant):
        return sum(selected_count(n, rho, variant) for n in micro_tokens)
    return sum(micro_tokens)


def forking_mask(entropy: torch.Tensor, rho: float, variant: str = "top", *,
                 valid: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """entropy [N] (detached) -> (mask [N] bool, tau).

    Among the valid tokens (valid [N] bool, None = all):
      top:    the k = top_count(n_valid, rho) highest-entropy tokens (ties: earlier position first);
      bottom: the other n_valid - k tokens (the paper's "bottom 80%" ablation: exact complement of top);
      random: k tokens drawn uniformly with `generator` (required, so runs are reproducible).
    Invalid tokens are never selected. tau is the top-rho entropy threshold (the k-th highest valid
    entropy) whatever the variant, NaN when there is no valid token.
    """
    _check_variant(variant)
    if entropy.dim() != 1:
        raise ValueError(f"entropy must be 1-D [N], got shape {tuple(entropy.shape)}")
    n = entropy.numel()
    if valid is not None and (valid.shape != (n,) or valid.dtype != torch.bool):
        raise ValueError(f"valid must be a bool tensor of shape ({n},), got {tuple(valid.shape)} {valid.dtype}")
    # positions of the valid tokens (None: all of them, the padding-free case, without indexing)
    idx = None if valid is None or bool(valid.all()) else valid.nonzero().squeeze(1)
    h = entropy.detach() if idx is None else entropy.detach()[idx]
    if bool(torch.isnan(h).any()):
        first = int(torch.isnan(h).nonzero()[0])
        raise ValueError(f"entropy of token {first if idx is None else int(idx[first])} is NaN")
    mask = torch.zeros(n, dtype=torch.bool, device=entropy.device)
    pick, tau = select_tokens(h, rho, variant, generator)
    mask[pick if idx is None else idx[pick]] = True
    return mask, float(tau)


def select_tokens(h: torch.Tensor, rho: float, variant: str = "top",
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection of `forking_mask` over the valid tokens' entropies h [n] (detached, none NaN: not
    checked here) -> (pick [k or n - k] int64 indices into h, tau as a 0-d tensor, NaN when n = 0).
    No host synchronisation: the loss calls it once per micro-batch (entropy_scope=micro)."""
    k = top_count(h.numel(), rho)
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=h.device), torch.full((), math.nan, device=h.device)
    if variant == "threshold":   # TRL: tau = quantile(H, 1 - rho), every token with H >= tau (ties included)
        tau = quantile(h, 1.0 - rho)
        return (h.double() >= tau).nonzero().squeeze(1), tau.to(h.dtype)
    # stable descending sort: equal entropies keep their position order
    order = torch.sort(h, descending=True, stable=True).indices
    tau = h[order[k - 1]]
    if variant == "top":
        pick = order[:k]
    elif variant == "bottom":
        pick = order[k:]
    else:
        if generator is None:
            raise ValueError("mask_variant='random' needs a seeded torch.Generator")
        pick = torch.randperm(h.numel(), generator=generator, device=generator.device)[:k].to(h.device)
    return pick, tau


def quantile(h: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile (0 <= q <= 1) of a non-empty 1-D tensor with linear interpolation between order
    statistics (torch.quantile's and numpy's default), in float64, as a 0-d tensor; no input-size limit."""
    s = torch.sort(h.detach().double()).values
    pos = (s.numel() - 1) * q
    lo = min(int(math.floor(round(pos, 9))), s.numel() - 1)
    hi = min(lo + 1, s.numel() - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def window_entropy(entropy: torch.Tensor, seq_ids: torch.Tensor, w: int,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """Sliding-window mean entropy [N] float64 (detached): for token t of response s, the mean of the valid
    entropies at the positions t, t+1, ..., t+w-1 that belong to s (ARES's forward window H_bar_{t:w}).

    Edges: a window never crosses into the next response; near a response's end it is truncated to the
    positions that exist (the last token's value is its own entropy), and invalid (padding) positions
    inside a window are left out of the mean, not counted as 0. Invalid tokens get 0 (no mask selects them).
    Precondition: the tokens of each response are contiguous and in order in the flat vector (the packed
    micro-batch and the step's [T] order both are); w = 1 returns the entropies unchanged (as float64).
    Cost O(N * w), no host synchronisation: the loss calls it per micro-batch."""
    if w < 1:
        raise ValueError(f"entropy_window must be >= 1, got {w}")
    h = entropy.detach().double()
    n = h.numel()
    if seq_ids.shape != (n,):
        raise ValueError(f"seq_ids must have shape ({n},), got {tuple(seq_ids.shape)}")
    if w == 1 or n == 0:
        return h if valid is None else torch.where(valid, h, 0.0)
    v = torch.ones(n, dtype=torch.bool, device=h.device) if valid is None else valid
    hv = torch.where(v, h, 0.0)
    total, count = hv.clone(), v.double()
    # summed offset by offset (k = 1 .. w-1), in a fixed order: a response's window means are the same
    # numbers wherever it sits in the flat vector (micro, mini and global scopes agree exactly)
    for k in range(1, min(w, n)):
        same = (seq_ids[k:] == seq_ids[:-k]) & v[k:]
        total[:-k] += torch.where(same, hv[k:], 0.0)
        count[:-k] += same.double()
    mean = total / count.clamp(min=1)
    return torch.where(v, mean, 0.0)


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"mask_variant must be one of {VARIANTS}, got {variant!r}")
