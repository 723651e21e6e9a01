"""learner.attention: the shared-prompt layout attended without an [L, L] mask equals one sequence at a time
(float64 log-probs and gradients, on the tiny model) and keeps its attention memory linear."""

import numpy as np
import pytest
import torch

from cluster.types import Response, Rollout, ScoredGroup
from learner.attention import build_layout, register
from learner.batching import collate, plan_micro_batches, sequences, token_offsets
from learner.engine import Policy


def group(gid, prompt, responses):
    resps = [Response(np.array(r, np.int32), np.full(len(r), -1.0, np.float32)) for r in responses]
    ro = Rollout(gid, gid, np.array(prompt, np.int32), "", resps, 0)
    return ScoredGroup(ro, np.zeros(len(resps), np.float32), np.arange(len(resps), dtype=np.float32),
                       [None] * len(resps))


@pytest.fixture(scope="module")
def models(untrained_tiny_model_dir):
    from transformers import AutoModelForCausalLM

    packed = AutoModelForCausalLM.from_pretrained(untrained_tiny_model_dir, dtype=torch.float64,
                                                  attn_implementation=register())
    plain = AutoModelForCausalLM.from_pretrained(untrained_tiny_model_dir, dtype=torch.float64,
                                                 attn_implementation="sdpa")   # eager softmaxes in float32
    plain.load_state_dict(packed.state_dict())
    return Policy(packed).eval(), plain.eval()


def reference_logp(plain, seqs):
    """Per-token log-probs of every response, one sequence at a time with the model's own causal mask."""
    out = []
    for s in seqs:
        logits = plain(input_ids=torch.from_numpy(s.ids)[None]).logits[0, s.prompt_len - 1:-1]
        out.append(torch.log_softmax(logits, -1).gather(1, torch.from_numpy(s.ids[s.prompt_len:])[:, None])[:, 0])
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def packed_logp(policy, seqs, budget):
    offsets = token_offsets(seqs)
    total = sum(s.resp_len for s in seqs)
    out = torch.full((total,), float("nan"), dtype=torch.float64)
    plans = plan_micro_batches(seqs, list(range(len(seqs))), budget)
    for p in plans:
        mb = collate(seqs, p, offsets)
        logits = policy(mb.input_ids, mb.layout, mb.position_ids, mb.gather)
        lp = torch.log_softmax(logits, -1).gather(1, mb.targets[:, None])[:, 0]
        out = out.index_put((mb.positions,), lp)
    return out, len(plans)


CASES = {
    "mixed": [([5, 6, 7], [[1, 2, 3], [4, 5], [6, 7, 8, 9], [3]]), ([9], [[8, 9, 10, 11, 12]]),
              ([4, 4, 4, 4, 4, 4, 4], [[1], [2, 3]])],
    "prompt_of_length_1": [([3], [[1, 2], [5, 6, 7]])],
    "one_response": [([1, 2, 3, 4], [[7, 8, 9]])],
    "one_token_responses_only": [([2, 3], [[1], [4], [5]]), ([6], [[7]])],
    "with_empty_responses": [([2, 3], [[], [4, 5], []]), ([6, 7, 8], [[9, 10, 11, 12, 13, 14]])],
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("budget", [16, 4096])   # 16: several rows per group, padding across rows
def test_logprobs_equal_one_sequence_at_a_time(models, case, budget):
    policy, plain = models
    seqs = sequences([group(f"g{i}", p, r) for i, (p, r) in enumerate(CASES[case])])
    with torch.no_grad():
        got, _ = packed_logp(policy, seqs, budget)
        want = reference_logp(plain, seqs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_random_layouts_equal_one_sequence_at_a_time(models):
    policy, plain = models
    rng = np.random.default_rng(7)
    for _ in range(4):
        groups = [group(f"g{k}", rng.integers(1, 250, rng.integers(1, 9)).tolist(),
                        [rng.integers(1, 250, m).tolist() for m in rng.integers(0, 14, rng.integers(1, 6))])
                  for k in range(rng.integers(1, 5))]
        seqs = sequences(groups)
        with torch.no_grad():
            got, n = packed_logp(policy, seqs, int(rng.integers(16, 80)))
            torch.testing.assert_close(got, reference_logp(plain, seqs), rtol=0, atol=1e-10)


def test_gradients_equal_one_sequence_at_a_time(models):
    policy, plain = models
    seqs = sequences([group(f"g{i}", p, r) for i, (p, r) in enumerate(CASES["mixed"] + CASES["with_empty_responses"])])
    w = torch.randn(sum(s.resp_len for s in seqs), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    policy.zero_grad()
    plain.zero_grad()
    got, n = packed_logp(policy, seqs, 24)
    assert n > 1
    (got * w).sum().backward()
    (reference_logp(plain, seqs) * w).sum().backward()
    grads = dict(plain.named_parameters())
    for name, p in policy.lm.named_parameters():
        # the model's RMSNorm computes in float32 whatever the dtype: its backward adds float32 noise (the
        # forward is bit-identical); the attention function alone is exact to float64 noise (below)
        err = float((p.grad - grads[name].grad).norm() / grads[name].grad.norm().clamp_min(1e-30))
        assert err < 1e-6, (name, err)


def dense_reference(q, k, v, rows, width, scale):
    """Float64, written the obvious way: the [L, L] block mask of every row (each segment sees the prompt
    and its own earlier tokens; padding is zero), softmax, weighted sum."""
    b, h, length, d = q.shape
    k = k.repeat_interleave(h // k.shape[1], dim=1)
    v = v.repeat_interleave(h // v.shape[1], dim=1)
    seg = torch.full((b, length), -1)
    for r, p, segs in rows:
        seg[r, :p] = 0
        for j, (start, n) in enumerate(segs):
            seg[r, start:start + n] = j + 1
    causal = torch.arange(length)[None, :] <= torch.arange(length)[:, None]
    sq, sk = seg[:, :, None], seg[:, None, :]
    mask = causal & (sq >= 0) & ((sk == sq) | (sk == 0))
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    att = torch.nan_to_num(torch.softmax(scores, -1), nan=0.0)   # padding rows: all -inf -> 0
    return (att @ v).transpose(1, 2)


@pytest.mark.parametrize("seed", range(6))
def test_attention_function_equals_the_dense_mask_in_float64(seed):
    from learner.attention import shared_prompt_attention

    rng = np.random.default_rng(seed)
    b = int(rng.integers(1, 4))
    rows, widths = [], []
    for r in range(b):
        p = int(rng.integers(1, 7))
        at, segs = p, []
        for _ in range(int(rng.integers(0, 5))):
            n = int(rng.integers(0, 9))   # 0: a one-token response (no segment tokens)
            segs.append((at, n))
            at += n
        rows.append((r, p, segs))
        widths.append(at)
    width = max(widths) + int(rng.integers(0, 3))   # right-padding
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 4, width, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(b, 2, width, 8, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(b, 2, width, 8, dtype=torch.float64, generator=g, requires_grad=True)
    got, _ = shared_prompt_attention(None, q, k, v, None, scaling=0.3, forkrl_layout=build_layout(rows, width))
    want = dense_reference(q, k, v, rows, width, 0.3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    w = torch.randn(got.shape, dtype=torch.float64, generator=g)
    g_got = torch.autograd.grad((got * w).sum(), [q, k, v])
    g_want = torch.autograd.grad((want * w).sum(), [q, k, v])
    for a, e in zip(g_got, g_want):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)


def test_layout_is_linear_in_the_row_not_square():
    # one 512-token prompt and 15 responses of 1000 tokens: the attention calls hold the 15 [prompt ;
    # segment] sequences (15 x 1512 slots), not a 15512 x 15512 mask
    p, n, g = 512, 999, 15
    lay = build_layout([(0, p, [(p + k * n, n) for k in range(g)])], p + g * n)
    assert [tuple(x.shape) for x in lay.packs] == [(g, p + n)]
    assert lay.source.numel() == p + g * n
    # buckets bound the padding: a sequence narrower than half its bucket starts a new call
    lay = build_layout([(0, 4, [(4, 100), (104, 10), (114, 40)])], 158)
    assert [tuple(x.shape) for x in lay.packs] == [(1, 104), (1, 44), (1, 14)]


def test_the_attention_function_refuses_a_call_without_its_layout(models):
    policy, _ = models
    with pytest.raises(ValueError, match="forkrl_layout"):
        policy.lm(input_ids=torch.tensor([[1, 2, 3]]))
