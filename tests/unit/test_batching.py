"""learner.batching: groups -> sequences -> packed, right-padded micro-batches and their flat index."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.types import Response, Rollout, ScoredGroup
from learner.batching import (check_group, collate, flat_positions, plan_micro_batches, row_width, sequences,
                              split_groups, token_offsets)


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


def test_collate_lays_out_shared_prompt_rows_and_gathers_the_predicting_positions():
    seqs = sequences([group("a", [5, 6], [[1, 2, 3], [4]]), group("b", [7], [[8, 9]])])
    offsets = token_offsets(seqs)
    mb = collate(seqs, [[2], [0, 1]], offsets, pad_id=0)
    # row 0: prompt [7], response [8, 9] without its last token; row 1: prompt [5, 6] once, then [1, 2]
    # ([1, 2, 3] without 3) and nothing for the one-token response [4]
    assert mb.input_ids.tolist() == [[7, 8, 0, 0], [5, 6, 1, 2]]
    assert mb.position_ids.tolist() == [[0, 1, 0, 0], [0, 1, 2, 3]]
    # the hidden state at a gathered index predicts the target: a response's first token from the
    # prompt's last position (shared by every response of the row), the next ones from its own segment
    assert mb.gather.tolist() == [0, 1, 5, 6, 7, 5]
    assert mb.targets.tolist() == [8, 9, 1, 2, 3, 4]
    assert mb.seq_ids.tolist() == [0, 0, 1, 1, 1, 2]
    assert mb.positions.tolist() == [4, 5, 0, 1, 2, 3] and mb.seqs == [2, 0, 1] and mb.num_tokens == 6
    m = dense_mask(mb).int().tolist()
    assert m[1] == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert m[0] == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]   # padding sees nothing (output 0)


def test_collate_segments_attend_to_the_prompt_and_themselves_only():
    seqs = sequences([group("a", [5, 6, 7], [[1, 2, 3], [4, 5], [6, 7, 8, 9]])])
    mb = collate(seqs, [[0, 1, 2]], token_offsets(seqs))
    seg = [0, 0, 0, 1, 1, 2, 3, 3, 3]                       # prompt, [1, 2], [4], [6, 7, 8]
    assert mb.input_ids.tolist() == [[5, 6, 7, 1, 2, 4, 6, 7, 8]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 3, 4, 5]]
    want = [[k <= q and (seg[k] == 0 or seg[k] == seg[q]) for k in range(9)] for q in range(9)]
    assert dense_mask(mb)[0].tolist() == want
    # one fused causal call per bucket: each segment is [prompt ; segment], never the row's [L, L] square
    assert [tuple(p.shape) for p in mb.layout.packs] == [(3, 6)]


def test_collate_layout_of_one_token_responses_and_prompt_of_length_one():
    # every response one token long: the row is the prompt alone, its last position predicts them all
    seqs = sequences([group("a", [5], [[1], [2]]), group("b", [7, 8, 9], [[3, 4, 6]])])
    mb = collate(seqs, [[2], [0, 1]], token_offsets(seqs))
    assert mb.input_ids.tolist() == [[7, 8, 9, 3, 4], [5, 0, 0, 0, 0]]
    m = dense_mask(mb).int().tolist()
    assert m[1] == [[1, 0, 0, 0, 0]] + [[0] * 5] * 4
    assert m[0] == [[int(k <= q) for k in range(5)] for q in range(5)]
    assert mb.gather.tolist() == [2, 3, 4, 5, 5]


def dense_mask(mb) -> torch.Tensor:
    """[B, L, L] bool: which keys each query of the block sees under mb.layout (the dense mask the layout
    replaces), read back from its packs: query slot j of a packed sequence sees the sequence's slots <= j."""
    b, length = mb.input_ids.shape
    lay = mb.layout
    seqs, base = [], 0
    for pack in lay.packs:
        for row in pack.tolist():
            seqs.append((base, row))
            base += len(row)
    out = torch.zeros(b * length, b * length, dtype=torch.bool)
    for q, src in enumerate(lay.source.tolist()):
        if src == base:
            continue   # padding: zero output
        start, row = next((st, r) for st, r in seqs if st <= src < st + len(r))
        assert row[src - start] == q   # the slot holding q's output is q's own query
        out[q, row[:src - start + 1]] = True
    blocks = out.view(b, length, b, length)
    assert not any(blocks[i, :, j].any() for i in range(b) for j in range(b) if i != j)   # rows independent
    return torch.stack([blocks[i, :, i] for i in range(b)])


def test_collate_refuses_a_row_whose_sequences_do_not_share_the_prompt():
    seqs = sequences([group("a", [5, 6], [[1]]), group("b", [5, 7], [[2]])])
    with pytest.raises(ValueError, match="do not share one prompt"):
        collate(seqs, [[0, 1]], token_offsets(seqs))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 12), st.integers(4, 64))
def test_micro_batch_plans_partition_within_budget(seed, n, budget):
    rng = np.random.default_rng(seed)
    _, seqs = random_seqs(rng, n)
    idx = sorted(rng.choice(len(seqs), size=rng.integers(0, len(seqs) + 1), replace=False).tolist()) if seqs else []
    plans = plan_micro_batches(seqs, idx, budget)
    rows = [r for p in plans for r in p]
    assert sorted(i for r in rows for i in r) == idx
    for r in rows:
        assert len({seqs[i].group for i in r}) == 1                # one prompt per row
        assert row_width(seqs, r) <= budget or len(r) == 1          # an over-wide sequence alone
    for p in plans:
        width = max(row_width(seqs, r) for r in p)
        assert len(p) * width <= budget or len(p) == 1              # an over-wide row alone
    widths = [row_width(seqs, r) for r in rows]
    assert widths == sorted(widths, reverse=True)                  # widest first: rows of similar width
    # every response token appears once across the micro-batches, at its own flat position, and the
    # gathered position holds the token before it (the prompt's last token for a response's first)
    offsets = token_offsets(seqs)
    pos = []
    for p in plans:
        mb = collate(seqs, p, offsets)
        pos += mb.positions.tolist()
        prev = np.concatenate([[seqs[i].ids[seqs[i].prompt_len - 1 + j] for j in range(seqs[i].resp_len)]
                               for i in mb.seqs])
        assert mb.input_ids.flatten()[mb.gather].tolist() == prev.tolist()
    assert sorted(pos) == flat_positions(seqs, idx, offsets).sort().values.tolist()


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


def test_micro_batches_are_collated_one_at_a_time_and_padded_with_empty_passes():
    from learner.batching import MicroBatches

    rng = np.random.default_rng(3)
    _, seqs = random_seqs(rng, 6)
    offsets = token_offsets(seqs)
    plans = plan_micro_batches(seqs, list(range(len(seqs))), 24)
    mbs = MicroBatches(seqs, plans, offsets, 0, "cpu", len(plans) + 2)
    it = iter(mbs)
    first = next(it)   # a generator: the others are not built yet
    assert first.positions.tolist() == collate(seqs, plans[0], offsets).positions.tolist()
    rest = list(it)
    assert len(mbs) == len(rest) + 1 == len(plans) + 2 and rest[-2:] == [None, None]
    assert mbs.token_counts == [mb.num_tokens for mb in [first] + rest[:-2]]
    assert [mb.seqs for mb in mbs if mb is not None] == [first.seqs] + [mb.seqs for mb in rest[:-2]]  # again
    with pytest.raises(ValueError):
        MicroBatches(seqs, plans, offsets, 0, "cpu", len(plans) - 1)
