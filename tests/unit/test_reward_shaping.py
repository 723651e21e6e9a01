"""Shaping terms against slow float64 references written from docs/algorithms.md."""

import math

import numpy as np
import pytest

from reward.shaping import RENT_NO_ANSWER_ENTROPY, flip, overlong_penalty, rent_reward


def ref_overlong(length, l_max, buffer, factor):
    expected = l_max - buffer
    if length <= expected:
        return 0.0
    if length <= l_max:
        return factor * (expected - length) / buffer
    return -1.0 * factor


def test_overlong_matches_reference_on_random_lengths():
    rng = np.random.default_rng(0)
    for _ in range(200):
        l_max = int(rng.integers(1, 5000))
        buffer = int(rng.integers(1, l_max + 1))
        factor = float(rng.uniform(0, 2))
        lengths = rng.integers(0, 2 * l_max + 2, size=int(rng.integers(1, 20)))
        got = overlong_penalty(lengths, l_max, buffer, factor)
        want = [ref_overlong(int(n), l_max, buffer, factor) for n in lengths]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_overlong_edges():
    # DAPO: L_max 20480, L_cache 4096
    got = overlong_penalty(np.array([0, 16384, 16385, 18432, 20480, 20481]), 20480, 4096)
    np.testing.assert_allclose(got, [0, 0, -1 / 4096, -0.5, -1, -1], atol=1e-15)
    assert not overlong_penalty(np.array([10**6]), 100, 0).any()                 # buffer 0 = off
    np.testing.assert_allclose(overlong_penalty(np.array([64]), 64, 64, 0.5), [-0.5])
    with pytest.raises(ValueError, match="overlong_buffer"):
        overlong_penalty(np.array([1]), 10, 20)


def test_rent_matches_reference():
    rng = np.random.default_rng(1)
    ents = [rng.uniform(0, 5, size=n) for n in (1, 7, 30, 0)]
    extracted = np.array([True, False, True, True])
    got = rent_reward(ents, extracted)
    want = [-math.fsum(h) / len(h) if ok and len(h) else -RENT_NO_ANSWER_ENTROPY for h, ok in zip(ents, extracted)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[1] == got[3] == -7.0


def test_flip_swaps_correct_and_incorrect():
    np.testing.assert_array_equal(flip(np.array([1.0, 0.0, 1.0]), 1.0, 0.0), [0.0, 1.0, 0.0])
    np.testing.assert_array_equal(flip(np.array([1.0, -1.0]), 1.0, -1.0), [-1.0, 1.0])
