"""Majority vote for label-free rewards (TTRL, Zuo et al. 2504.16084; docs/algorithms.md 4.1; docs/rewards.md).

The vote is a function of the multiset of answers, never of their order:
- Each response's answer has a canonical key (reward.verifiers: the exact value of a number, so '0.5',
  '1/2', '\\frac{1}{2}' and '50\\%' are one key; otherwise the answer text). Identical keys are one answer.
- Distinct keys are merged only where the equivalence check holds both ways, and a set of keys connected
  by such checks is merged only if every pair in it holds (a clique): an equivalence that is not
  transitive (a ~ b, b ~ c, a !~ c) merges nothing, so no answer is counted with one it differs from.
- Clusters are numbered in the sorted order of their smallest key; the label is the cluster with the most
  votes, and a tie has no label (no response agrees with it), since any tie-break would be arbitrary.
Unextractable answers (None) do not vote.

Equivalence checks can be slow (sympy) and run isolated, so all groups' checks go in two batched calls of
`same_batch`: every unordered pair once (smaller key first), then the reverse of the pairs that held.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

# [(group index, key a, key b)] -> [is b the same answer as a? (a plays the gold: checks need not be symmetric)]
SameBatch = Callable[[list[tuple[int, str, str]]], list[bool]]


def cluster_answers(keys: Sequence[Sequence[str | None]], same_batch: SameBatch | None = None
                    ) -> list[list[int | None]]:
    """keys[g][i]: canonical answer of response i of group g (None = unextractable) -> cluster id of each
    response (None for unextractable), the same for every order of a group's responses.

    same_batch: equivalence of two distinct keys, asked in both directions (None: distinct keys differ)."""
    distinct = [sorted({k for k in ks if k is not None}) for ks in keys]
    pairs = [(g, a, b) for g, d in enumerate(distinct) for i, a in enumerate(d) for b in d[i + 1:]]
    forward = same_batch(pairs) if same_batch and pairs else [False] * len(pairs)
    held = [p for p, eq in zip(pairs, forward) if eq]
    backward = same_batch([(g, b, a) for g, a, b in held]) if held else []
    edges: list[set[tuple[str, str]]] = [set() for _ in keys]
    for (g, a, b), eq in zip(held, backward):
        if eq:
            edges[g].add((a, b))
    out = []
    for g, ks in enumerate(keys):
        clusters = _cliques(distinct[g], edges[g])
        ids = {k: c for c, members in enumerate(clusters) for k in members}
        out.append([None if k is None else ids[k] for k in ks])
    return out


def _cliques(keys: list[str], edges: set[tuple[str, str]]) -> list[list[str]]:
    """Connected components of the equivalence graph that are cliques, and singletons for the keys of any
    component that is not; sorted by their smallest key."""
    root = {k: k for k in keys}

    def find(k: str) -> str:
        while root[k] != k:
            root[k] = root[root[k]]
            k = root[k]
        return k

    for a, b in edges:
        root[find(a)] = find(b)
    components: dict[str, list[str]] = {}
    for k in keys:  # sorted, so each component's members are sorted
        components.setdefault(find(k), []).append(k)
    clusters = []
    for members in components.values():
        n, member = len(members), set(members)
        inside = sum(1 for a, _ in edges if a in member)
        clusters += [members] if inside == n * (n - 1) // 2 else [[k] for k in members]
    return sorted(clusters)


def majority(clusters: Sequence[int | None]) -> tuple[int | None, np.ndarray]:
    """-> (winning cluster, agree [G] bool: response is in the winner). The winner is None when nothing was
    extractable or when the largest clusters tie."""
    counts = Counter(c for c in clusters if c is not None)
    top = counts.most_common(2)
    if not top or (len(top) == 2 and top[1][1] == top[0][1]):
        return None, np.zeros(len(clusters), dtype=bool)
    winner = top[0][0]
    return winner, np.array([c == winner for c in clusters], dtype=bool)
