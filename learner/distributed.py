"""Cross-rank helpers for the learner's global quantities (the step and weight publishing also run the
collectives DeepSpeed does inside forward, backward, step and the ZeRO-3 gathers).

`global_forking_mask` gives every rank its slice of the mask that `masks.forking_mask` would compute over
the concatenation of all ranks' tokens in rank order (rank 0's tokens first), ties included: the
entropies are all-gathered and every rank runs the same deterministic selection on the same vector.
That costs one all-gather of 4 bytes per token (4 MB for a million tokens), no more than TRL's
all-gather + quantile, and, unlike a threshold, it selects exactly k = ceil(rho * N_global) tokens.
`all_reduce_floats` sums (or maxes, mins) a few numbers across ranks: the normalising counts
(`losses.BatchCounts`), the ranks' agreement that a step may go on.

All functions are collectives: every rank of `group` (None = the default process group, the one DeepSpeed
initialises) must call them in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from learner.masks import forking_mask


def all_gather_1d(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, list[int]]:
    """Each rank's 1-D tensor (lengths may differ) -> (their concatenation in rank order, the lengths)."""
    if x.dim() != 1:
        raise ValueError(f"all_gather_1d takes a 1-D tensor, got shape {tuple(x.shape)}")
    world = dist.get_world_size(group)
    n = torch.tensor([x.numel()], dtype=torch.int64, device=x.device)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    lengths = [int(s) for s in sizes]
    padded = x.new_zeros(max(lengths))
    padded[: x.numel()] = x
    bufs = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(bufs, padded, group=group)
    return torch.cat([b[:m] for b, m in zip(bufs, lengths)]), lengths


def global_forking_mask(entropy: torch.Tensor, rho: float, variant: str = "top", *,
                        valid: torch.Tensor | None = None, generator: torch.Generator | None = None,
                        group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, float]:
    """This rank's entropy [n_r] (its whole mini-batch, micro-batches concatenated in order) -> (its slice
    [n_r] bool of the mask over all ranks' tokens, the global threshold tau). For variant='random' every
    rank must pass a generator in the same state (same seed): all draw the same global permutation."""
    ent, lengths = all_gather_1d(entropy.detach().float(), group)
    all_valid = None
    if valid is not None:
        if valid.shape != entropy.shape or valid.dtype != torch.bool:
            raise ValueError(f"valid must be a bool tensor of shape {tuple(entropy.shape)}")
        all_valid = all_gather_1d(valid.to(torch.uint8), group)[0].bool()
    mask, tau = forking_mask(ent, rho, variant, valid=all_valid, generator=generator)
    start = sum(lengths[: dist.get_rank(group)])
    return mask[start: start + entropy.numel()].clone(), tau


def all_reduce_floats(values: Sequence[float], op: str = "sum", group: dist.ProcessGroup | None = None,
                      device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum / max / min over ranks of a few numbers, in float64 so counts stay exact up to
    2**53. device: where the collective runs (cuda for NCCL groups). A group of one rank runs no collective."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op],
                        group=group)
    return t.tolist()
