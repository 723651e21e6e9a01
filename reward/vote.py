"""Majority vote for label-free rewards (TTRL, Zuo et al. 2504.16084; docs/algorithms.md 4.1).

Answers are clustered by equivalence, not string equality: '0.5', '1/2' and '\\frac{1}{2}' are one vote.
Unextractable answers (None) do not vote. The pseudo-label is the largest cluster; ties go to the cluster
whose first answer appeared first (TTRL's Counter.most_common). Clustering is greedy: each distinct answer
joins the first earlier cluster whose first member it equals, else founds a new one.

Equivalence checks can be slow (sympy) and run isolated, so clustering is driven in rounds that batch the
checks of all groups into one call of `same_batch`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

# [(group index, cluster representative key, candidate key)] -> [equal?]
SameBatch = Callable[[list[tuple[int, str, str]]], list[bool]]


def cluster_answers(keys: Sequence[Sequence[str | None]], same_batch: SameBatch | None = None
                    ) -> list[list[int | None]]:
    """keys[g][i]: canonical answer of response i of group g (None = unextractable) ->
    cluster id of each response (0, 1, ... in order of first appearance; None for unextractable).

    Identical keys are the same answer without a check; distinct keys are compared by `same_batch`
    (None: distinct keys are different answers)."""
    distinct = [list(dict.fromkeys(k for k in ks if k is not None)) for ks in keys]
    reps: list[list[str]] = [[] for _ in keys]        # first member of each cluster
    assign: list[dict[str, int]] = [{} for _ in keys]
    for step in range(max((len(d) for d in distinct), default=0)):
        active = [g for g, d in enumerate(distinct) if step < len(d)]
        queries = [(g, rep, distinct[g][step]) for g in active for rep in reps[g]] if same_batch else []
        equal = same_batch(queries) if queries else []
        joined: dict[int, int] = {}
        for (g, rep, _), eq in zip(queries, equal):
            if eq and g not in joined:
                joined[g] = reps[g].index(rep)
        for g in active:
            key = distinct[g][step]
            if g not in joined:
                joined[g] = len(reps[g])
                reps[g].append(key)
            assign[g][key] = joined[g]
    return [[None if k is None else assign[g][k] for k in ks] for g, ks in enumerate(keys)]


def majority(clusters: Sequence[int | None]) -> tuple[int | None, np.ndarray]:
    """-> (winning cluster or None if nothing was extractable, agree [G] bool: response is in the winner).
    Cluster ids are in order of first appearance, so the smallest id wins a tie."""
    counts = Counter(c for c in clusters if c is not None)
    if not counts:
        return None, np.zeros(len(clusters), dtype=bool)
    winner = min(counts, key=lambda c: (-counts[c], c))
    return winner, np.array([c == winner for c in clusters], dtype=bool)
