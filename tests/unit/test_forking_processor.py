"""actors/forking.py, the forking-aware sampling logits processor, driven the way vLLM's sampler drives it
(update_state with BatchUpdates, then apply on the batch's logits), against a float64 reference."""

import math

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from actors.forking import ForkingTemperature, entropy_t1, request_args

V = 50


def params(key, high=1.5, low=0.7, threshold=2.0, **kw):
    return SamplingParams(temperature=1.0, extra_args=request_args(key, high, low, threshold), **kw)


def ref_step(z: torch.Tensor, high: float, low: float, threshold: float) -> tuple[torch.Tensor, bool, float]:
    p = torch.softmax(z.double(), -1)
    h = float(-(torch.where(p > 0, p * p.log(), 0.0)).sum())
    t = high if h >= threshold else low
    return z.double() / t, h >= threshold, h


def test_rows_get_their_own_temperature_and_other_rows_are_untouched():
    proc = ForkingTemperature(None, torch.device("cpu"), False)
    outs = [[], [], []]
    # row 0 forking (threshold 2.0), row 1 an ordinary request, row 2 forking with another rule
    proc.update_state(BatchUpdate(3, [], [(0, params("a"), [1], outs[0]), (1, SamplingParams(), [1], outs[1]),
                                          (2, params("b", 3.0, 0.5, 0.0), [1], outs[2])], []))
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        scale = torch.tensor([[0.2], [1.0], [3.0]]) if step % 2 else torch.tensor([[4.0], [1.0], [0.1]])
        logits = torch.randn(3, V, generator=g) * scale
        logits[0, :3] = -math.inf                     # masked entries (allowed-token mask, bad words)
        before = logits.clone()
        out = proc.apply(logits)
        for row, (hi, lo, thr) in ((0, (1.5, 0.7, 2.0)), (2, (3.0, 0.5, 0.0))):
            want, _, _ = ref_step(before[row], hi, lo, thr)
            finite = torch.isfinite(want)
            torch.testing.assert_close(out[row][finite].double(), want[finite], rtol=1e-6, atol=1e-6)
            assert torch.equal(torch.isfinite(out[row]), finite)
        assert torch.equal(out[1], before[1])
        for o in outs:
            o.append(0)                               # vLLM appends the sampled token: the next position
    counts = proc.pop_counts(["a", "b", "zzz"])
    assert set(counts) == {"a", "b"}
    assert counts["a"]["positions"] == 6 and counts["b"]["positions"] == counts["b"]["high"] == 6
    assert proc.pop_counts(["a", "b"]) == {}          # forgotten once read


def test_counts_match_the_reference_and_partial_prefill_rows_collapse():
    """Two rows at position 0 (a prompt's prefill chunks reach the sampler; their tokens are discarded)
    count once, the last decision; removal commits the pending position; high-entropy sums are exact."""
    proc = ForkingTemperature(None, torch.device("cpu"), False)
    out = []
    proc.update_state(BatchUpdate(1, [], [(0, params("k", threshold=1.0), [1], out)], []))
    g = torch.Generator().manual_seed(1)
    want = {"positions": 0, "high": 0, "high_entropy_sum": 0.0, "entropy_sum": 0.0}
    for step in range(9):
        logits = torch.randn(1, V, generator=g) * (0.3 if step % 3 else 5.0)
        _, high, h = ref_step(logits[0], 1.5, 0.7, 1.0)
        proc.apply(logits)
        if step == 0:
            continue   # a partial-prefill chunk: the next call is at the same position and replaces it
        want["positions"] += 1
        want["high"] += high
        want["high_entropy_sum"] += h if high else 0.0
        want["entropy_sum"] += h
        out.append(0)
    proc.update_state(BatchUpdate(0, [0], [], []))   # finished: removed from the batch
    got = proc.pop_counts(["k"])["k"]
    assert got["positions"] == want["positions"] == 8 and got["high"] == want["high"]
    assert 0 < want["high"] < 8
    assert got["high_entropy_sum"] == pytest.approx(want["high_entropy_sum"], rel=1e-5)
    assert got["entropy_sum"] == pytest.approx(want["entropy_sum"], rel=1e-5)


def test_moves_swaps_and_replacement_keep_each_request_its_rule():
    proc = ForkingTemperature(None, torch.device("cpu"), False)
    a, b = [], []
    proc.update_state(BatchUpdate(2, [], [(0, params("a", 2.0, 2.0, 0.0), [1], a),
                                          (1, params("b", 0.5, 0.5, 0.0), [1], b)], []))
    proc.update_state(BatchUpdate(2, [], [], [(0, 1, MoveDirectionality.SWAP)]))
    logits = torch.ones(2, V) * torch.tensor([[1.0], [2.0]])
    logits[:, 0] = 3.0
    out = proc.apply(logits.clone())
    assert out[1, 0] == pytest.approx(3.0 / 2.0) and out[0, 0] == pytest.approx(3.0 / 0.5)   # followed the swap
    a.append(0)
    b.append(0)
    proc.update_state(BatchUpdate(1, [1], [], [(0, 1, MoveDirectionality.UNIDIRECTIONAL)]))   # a removed, b moved
    proc.apply(torch.zeros(2, V))
    counts = proc.pop_counts(["a", "b"])
    assert counts["a"]["positions"] == 1 and counts["b"]["positions"] == 2
    # an index reused by a new request commits the old one's pending position first
    b.append(0)
    proc.apply(torch.zeros(2, V))
    proc.update_state(BatchUpdate(2, [], [(1, params("c"), [1], [])], []))
    assert proc.pop_counts(["b", "c"]) == {"b": {"positions": 1.0, "high": 1.0, "high_entropy_sum": pytest.approx(
        math.log(V)), "entropy_sum": pytest.approx(math.log(V))}}


def test_entropy_t1_and_parameter_checks():
    z = torch.tensor([[0.0, 0.0, -math.inf, 0.0], [5.0, -5.0, -5.0, -5.0]])
    h = entropy_t1(z)
    assert h[0] == pytest.approx(math.log(3)) and 0 < h[1] < 0.01
    ForkingTemperature.validate_params(SamplingParams())                    # not opted in: nothing to check
    ForkingTemperature.validate_params(params("x"))
    with pytest.raises(ValueError, match="temperature must be 1.0"):
        ForkingTemperature.validate_params(SamplingParams(temperature=0.7, extra_args=request_args("x", 1, 1, 1)))
    with pytest.raises(ValueError, match="> 0"):
        ForkingTemperature.validate_params(params("x", high=0.0))
    assert ForkingTemperature(None, torch.device("cpu"), False).is_argmax_invariant()
