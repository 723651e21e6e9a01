"""Majority vote: order-free clustering against a slow reference, hypothesis permutation invariance with the
real math verifier, non-transitive equivalences, ties, nothing extractable."""

import itertools
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reward.math_answers import math_equal
from reward.verifiers import run_inline, same_batch_via, score_response
from reward.vote import cluster_answers, majority


def reference_clusters(keys, same):
    """The slow obvious way, stated differently from the implementation: two distinct keys are one answer when
    each is equal to the other; a key's cluster is its neighbourhood N[k] if every member of N[k] has the
    same neighbourhood (a clique), else the key alone. Clusters are numbered by their smallest key."""
    distinct = sorted({k for k in keys if k is not None})
    near = {a: frozenset(b for b in distinct if b == a or (same(a, b) and same(b, a))) for a in distinct}
    cluster_of = {a: near[a] if all(near[b] == near[a] for b in near[a]) else frozenset([a]) for a in distinct}
    order = sorted(set(cluster_of.values()), key=min)
    return [None if k is None else order.index(cluster_of[k]) for k in keys]


def reference_majority(clusters):
    counts = {}
    for c in clusters:
        if c is not None:
            counts[c] = counts.get(c, 0) + 1
    if not counts:
        return None
    best = max(counts.values())
    winners = [c for c, n in counts.items() if n == best]
    return winners[0] if len(winners) == 1 else None   # a tie has no label


def test_batched_clustering_matches_reference_on_random_groups():
    rng = random.Random(0)
    for _ in range(200):
        # a random relation: not always symmetric, not always transitive
        table = {(a, b): rng.random() < 0.4 for a in map(str, range(9)) for b in map(str, range(9))}
        same = lambda a, b, table=table: table[a, b]  # noqa: E731
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
        # at most two batched calls: every unordered pair once (smaller key first), then the reverse of those held
        assert len(calls) <= 2
        if calls:
            assert all(a < b for _, a, b in calls[0])
            assert len(calls[0]) == sum(len(set(g) - {None}) * (len(set(g) - {None}) - 1) // 2 for g in groups)
        if len(calls) == 2:
            assert calls[1] == [(g, b, a) for (g, a, b) in calls[0] if same(a, b)]


def test_non_transitive_equivalence_merges_nothing():
    near = {("a", "b"), ("b", "c")}                       # a ~ b, b ~ c, a !~ c (both ways each)
    same = lambda x, y: (x, y) in near or (y, x) in near  # noqa: E731
    batch = lambda qs: [same(a, b) for _, a, b in qs]     # noqa: E731
    assert cluster_answers([["a", "b", "c", "c"]], batch) == [[0, 1, 2, 2]]
    assert cluster_answers([["a", "b", "b"]], batch) == [[0, 0, 0]]          # without c, a ~ b is a clique
    one_way = lambda qs: [(a, b) == ("a", "b") for _, a, b in qs]           # noqa: E731 - a pays b, b not a
    assert cluster_answers([["a", "b"]], one_way) == [[0, 1]]


def test_ties_have_no_label():
    clusters = cluster_answers([["7", "5", "5", "7", None, "9"]])[0]
    assert clusters == [1, 0, 0, 1, None, 2]                                 # numbered by sorted key
    winner, agree = majority(clusters)
    assert winner is None and not agree.any() and agree.shape == (6,)
    winner, agree = majority(cluster_answers([["5", "7", "7", "5", "7"]])[0])
    assert winner == 1 and agree.tolist() == [False, True, True, False, True]


def test_nothing_extractable():
    assert cluster_answers([[None, None, None], []]) == [[None, None, None], []]
    winner, agree = majority([None, None, None])
    assert winner is None and agree.dtype == bool and not agree.any()


def math_batch(queries):
    return [math_equal(a, b) for _, a, b in queries]


def test_clusters_by_math_equivalence_not_strings():
    keys = ["0.5", "\\frac{1}{3}", "1/2", "\\frac{2}{4}", "0.3333", "\\dfrac{1}{3}", None]
    clusters = cluster_answers([keys], math_batch)[0]
    assert clusters == [1, 2, 1, 1, 0, 2, None]
    winner, agree = majority(clusters)
    assert winner == 1 and agree.sum() == 3
    # with string equality the three halves would be three clusters: a 1-1-1-1-1-1 tie, no label
    assert majority(cluster_answers([keys])[0])[0] is None


def math_keys(answers):
    return [score_response("math", f"so \\boxed{{{a}}}", None, {})["key"] if a else None for a in answers]


def test_percent_vote_of_the_issue_in_every_order():
    for order in itertools.permutations(["50\\%", "0.5", "50"]):
        keys = math_keys(order)
        clusters = cluster_answers([keys], same_batch_via(run_inline, lambda g: "math"))[0]
        _, agree = majority(clusters)
        assert agree.tolist() == [a != "50" for a in order]                  # 50% = 0.5 = 1/2, never 50


POOL = ["0.5", "\\frac{1}{2}", "50\\%", "1/2", "50", "x+1", "1+x", "\\sqrt{4}", "2", "2.0", "\\frac{1}{3}", "0.333",
        "\\{1,2\\}", "1, 2", "(1,2)", "2^{10}", "1024", "1,024", "5 \\text{ cm}", "5", "\\text{(A)}", "A", None]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers=st.lists(st.sampled_from(POOL), min_size=0, max_size=10), data=st.data())
def test_vote_is_the_same_for_every_order(answers, data):
    perm = data.draw(st.permutations(range(len(answers))))
    same_batch = same_batch_via(run_inline, lambda g: "math")
    keys = math_keys(answers)
    clusters = cluster_answers([keys], same_batch)[0]
    shuffled = cluster_answers([[keys[i] for i in perm]], same_batch)[0]
    assert shuffled == [clusters[i] for i in perm]                            # identical clusters (and ids)
    winner, agree = majority(clusters)
    winner2, agree2 = majority(shuffled)
    assert winner2 == winner and agree2.tolist() == [bool(agree[i]) for i in perm]


@pytest.mark.parametrize("keys", [["a"], ["a", "a"], ["b", None, "b"]])
def test_single_cluster_everyone_agrees(keys):
    winner, agree = majority(cluster_answers([keys])[0])
    assert winner == 0 and agree.tolist() == [k is not None for k in keys]
    assert np.asarray(agree).shape == (len(keys),)
