"""Majority vote: equivalence clustering against a slow sequential reference, ties, nothing extractable."""

import random

import numpy as np
import pytest

from reward.verifiers import math_equal
from reward.vote import cluster_answers, majority


def reference_clusters(keys, same):
    """The slow obvious way: walk the responses in order; an answer joins the first cluster whose first
    member it equals (identical strings are equal without asking), else founds a new cluster."""
    reps, out = [], []
    for k in keys:
        if k is None:
            out.append(None)
            continue
        for c, rep in enumerate(reps):
            if rep == k or same(rep, k):
                out.append(c)
                break
        else:
            reps.append(k)
            out.append(len(reps) - 1)
    return out


def reference_majority(clusters):
    counts = {}
    for c in clusters:
        if c is not None:
            counts[c] = counts.get(c, 0) + 1
    if not counts:
        return None
    best = max(counts.values())
    return next(c for c in clusters if c is not None and counts[c] == best)  # first encountered


def test_batched_clustering_matches_reference_on_random_groups():
    rng = random.Random(0)
    for _ in range(50):
        mod = rng.randint(1, 4)
        same = lambda a, b, mod=mod: int(a) % mod == int(b) % mod  # noqa: E731 - a random equivalence
        groups = [[rng.choice([None, *map(str, range(rng.randint(1, 9)))]) for _ in range(rng.randint(0, 12))]
                  for _ in range(rng.randint(1, 6))]
        calls = []

        def same_batch(queries):
            calls.append(queries)
            return [same(a, b) for _, a, b in queries]

        got = cluster_answers(groups, same_batch)
        assert got == [reference_clusters(g, same) for g in groups]
        for g, cl in zip(groups, got):
            winner, agree = majority(cl)
            assert winner == reference_majority(cl)
            assert agree.tolist() == [c is not None and c == winner for c in cl]
        # one batch per round, each query a distinct answer against an earlier, different representative
        assert len(calls) <= max((len({k for k in g if k is not None}) for g in groups), default=0)
        assert all(a != b for q in calls for _, a, b in q)


def test_ties_go_to_the_first_answer():
    clusters = cluster_answers([["7", "5", "5", "7", None, "9"]])[0]
    assert clusters == [0, 1, 1, 0, None, 2]
    winner, agree = majority(clusters)
    assert winner == 0 and agree.tolist() == [True, False, False, True, False, False]
    assert majority(cluster_answers([["5", "7", "7", "5"]])[0])[1].tolist() == [True, False, False, True]


def test_nothing_extractable():
    assert cluster_answers([[None, None, None], []]) == [[None, None, None], []]
    winner, agree = majority([None, None, None])
    assert winner is None and agree.dtype == bool and not agree.any()


def test_clusters_by_math_equivalence_not_strings():
    keys = ["0.5", "\\frac{1}{3}", "1/2", "\\frac{2}{4}", "0.3333", "\\dfrac{1}{3}", None]

    def same_batch(queries):
        return [math_equal(a, b) for _, a, b in queries]

    clusters = cluster_answers([keys], same_batch)[0]
    assert clusters == [0, 1, 0, 0, 2, 1, None]
    winner, agree = majority(clusters)
    assert winner == 0 and agree.sum() == 3
    # with string equality the three halves would be three clusters and '0.5' would win only a 1-1-1 tie
    assert majority(cluster_answers([keys])[0])[1].sum() == 1


@pytest.mark.parametrize("keys", [["a"], ["a", "a"], ["b", None, "b"]])
def test_single_cluster_everyone_agrees(keys):
    winner, agree = majority(cluster_answers([keys])[0])
    assert winner == 0 and agree.tolist() == [k is not None for k in keys]
    assert np.asarray(agree).shape == (len(keys),)
