"""Reward shaping terms, one group at a time (docs/algorithms.md 4 and 5). Pure numpy, float64, shapes [G]."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RENT_NO_ANSWER_ENTROPY = 7.0  # RENT's entropy_base: a response with no extractable answer gets reward -7


def overlong_penalty(lengths: np.ndarray, l_max: int, buffer: int, factor: float = 1.0) -> np.ndarray:
    """DAPO soft overlong punishment (Yu et al. 2503.14476), lengths [G] in tokens -> [G] <= 0:
    0 if |y| <= L_max - L_cache; ((L_max - L_cache) - |y|) / L_cache inside the buffer; -1 beyond L_max;
    times `factor`. buffer = 0 switches it off."""
    lengths = np.asarray(lengths, dtype=np.float64)
    if buffer <= 0:
        return np.zeros_like(lengths)
    if buffer > l_max:
        raise ValueError(f"reward.overlong_buffer ({buffer}) must be <= the maximum length L_max ({l_max})")
    expected = l_max - buffer
    pen = np.where(lengths > l_max, -1.0, np.minimum(0.0, (expected - lengths) / buffer))
    return pen * factor


def rent_reward(entropies: Sequence[np.ndarray], extracted: np.ndarray) -> np.ndarray:
    """RENT intrinsic reward (Prabhudesai et al. 2505.22660): -mean token entropy over all response tokens
    (as the released code does), and -7 when no answer is extractable. entropies: G arrays [L_i] (nats)."""
    out = np.empty(len(entropies), dtype=np.float64)
    for i, h in enumerate(entropies):
        h = np.asarray(h, dtype=np.float64)
        out[i] = -float(h.mean()) if extracted[i] and h.size else -RENT_NO_ANSWER_ENTROPY
    return out


def flip(term: np.ndarray, correct: float, incorrect: float) -> np.ndarray:
    """Reward-noise injection (Lv et al. 2505.22653): a flipped group gets the opposite correctness reward
    (1 - r for 1/0 rewards, -r for +1/-1)."""
    return correct + incorrect - np.asarray(term, dtype=np.float64)
