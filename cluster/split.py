"""The one list splitter: prompts over generators, groups over learner ranks and mini-batches, rollouts over
graders."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def split_even(items: Sequence[T], parts: int) -> list[list[T]]:
    """`items` in `parts` contiguous slices, in order, whose lengths differ by at most one, the longer ones
    first (numpy.array_split's sizes); some are empty when parts > len(items)."""
    if parts < 1:
        raise ValueError(f"split_even: parts must be >= 1, got {parts}")
    q, r = divmod(len(items), parts)
    bounds = [i * q + min(i, r) for i in range(parts + 1)]
    return [list(items[bounds[i]:bounds[i + 1]]) for i in range(parts)]
