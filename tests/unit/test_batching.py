"""learner.batching: groups -> sequences -> packed, right-padded micro-batches and their flat index."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.types import Response, Rollout, ScoredGroup
from learner.batching import (check_group, collate, flat_positions, plan_micro_batches, sequences, split_groups,
                              token_offsets)


def group(gid: str, prompt: list[int], responses: list[list[int]], adv=None, logprobs=None) -> ScoredGroup:
    resps = [Response(np.array(r, np.int32), np.array(logprobs[i] if logprobs else [-1.0] * len(r), np.float32))
             for i, r in enumerate(responses)]
    adv = np.array(adv if adv is not None else np.arange(len(responses)), np.float32)
    rollout = Rollout(gid, gid, np.array(prompt, np.int32), "", resps, 0)
    return ScoredGroup(rollout, np.zeros(len(responses), np.float32), adv, [None] * len(responses))


def random_seqs(rng: np.random.Generator, n: int):
    groups = [group(f"g{k}", rng.integers(1, 50, rng.integers(1, 6)).tolist(),
                    [rng.integers(1, 50, m).tolist() for m in rng.integers(0, 9, 3)]) for k in range(n)]
    return groups, sequences(groups)


def test_sequences_skip_empty_responses_and_keep_group_and_advantage():
    seqs = sequences([group("a", [5, 6], [[1, 2, 3], [], [4]], adv=[0.5, 9.0, -1.0]),
                      group("b", [7], [[8, 9]], adv=[2.0])])
    assert [(s.ids.tolist(), s.prompt_len, s.advantage, s.group) for s in seqs] == [
        ([5, 6, 1, 2, 3], 2, 0.5, 0), ([5, 6, 4], 2, -1.0, 0), ([7, 8, 9], 1, 2.0, 1)]
    assert [s.resp_len for s in seqs] == [3, 1, 2]
    assert token_offsets(seqs) == [0, 3, 4] and token_offsets([]) == []
    assert flat_positions(seqs, [2, 0], token_offsets(seqs)).tolist() == [4, 5, 0, 1, 2]


def test_collate_gathers_exactly_the_positions_that_predict_response_tokens():
    seqs = sequences([group("a", [5, 6], [[1, 2, 3], [4]]), group("b", [7], [[8, 9]])])
    offsets = token_offsets(seqs)
    mb = collate(seqs, [0, 2, 1], offsets, pad_id=0)
    assert mb.input_ids.tolist() == [[5, 6, 1, 2, 3], [7, 8, 9, 0, 0], [5, 6, 4, 0, 0]]
    assert mb.attention_mask.tolist() == [[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    # the hidden state at flat index i predicts the token at i + 1 of the same row
    assert mb.gather.tolist() == [1, 2, 3, 5, 6, 11]
    assert mb.input_ids.flatten()[mb.gather + 1].tolist() == mb.targets.tolist() == [1, 2, 3, 8, 9, 4]
    assert mb.seq_ids.tolist() == [0, 0, 0, 1, 1, 2]
    assert mb.positions.tolist() == [0, 1, 2, 4, 5, 3] and mb.rows == [0, 2, 1] and mb.num_tokens == 6
    # (that right-padded rows give each sequence's own logits is checked against an unpadded reference in
    # tests/integration/test_learner_zero.py)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 12), st.integers(4, 64))
def test_micro_batch_plans_partition_within_budget(seed, n, budget):
    rng = np.random.default_rng(seed)
    _, seqs = random_seqs(rng, n)
    idx = sorted(rng.choice(len(seqs), size=rng.integers(0, len(seqs) + 1), replace=False).tolist()) if seqs else []
    plans = plan_micro_batches(seqs, idx, budget)
    assert sorted(i for p in plans for i in p) == idx
    for p in plans:
        width = max(len(seqs[i].ids) for i in p)
        assert len(p) * width <= budget or len(p) == 1          # an over-long sequence alone
    lengths = [len(seqs[i].ids) for p in plans for i in p]
    assert lengths == sorted(lengths, reverse=True)              # longest first: rows of similar length
    # every response token appears once across the micro-batches, at its own flat position
    offsets = token_offsets(seqs)
    pos = torch.cat([collate(seqs, p, offsets).positions for p in plans]) if plans else torch.zeros(0, dtype=torch.long)
    assert sorted(pos.tolist()) == flat_positions(seqs, idx, offsets).sort().values.tolist()


@pytest.mark.parametrize("n,parts", [(7, 3), (2, 4), (0, 2), (8, 8), (5, 1)])
def test_split_groups_contiguous_and_even(n, parts):
    split = split_groups(n, parts)
    assert len(split) == parts and sum(split, []) == list(range(n))
    sizes = [len(s) for s in split]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("make,field", [
    (lambda: group("x", [], [[1]]), "prompt_ids is empty"),
    (lambda: group("x", [1, 300], [[1]]), "rollout.prompt_ids[1] = 300"),
    (lambda: group("x", [1], [[1], [2, -1]]), "responses[1].token_ids[1] = -1"),
    (lambda: group("x", [1], [[1], [2]], adv=[0.0, math.nan]), "advantages[1]"),
    (lambda: group("x", [1], [[1, 2]], logprobs=[[-1.0, math.inf]]), "responses[0].logprobs[1]"),
])
def test_check_group_names_the_bad_field(make, field):
    assert field in check_group(make(), vocab_size=101)


def test_check_group_accepts_a_good_group_and_catches_length_mismatches():
    g = group("x", [1, 2], [[3, 100], []])
    assert check_group(g, vocab_size=101) is None
    g.rollout.responses[0].logprobs = np.zeros(1, np.float32)
    assert "2 token_ids but 1 logprobs" in check_group(g, 101)
    g = group("x", [1], [[3], [4]], adv=[1.0])
    assert "advantages has 1 values for 2 responses" in check_group(g, 101)
