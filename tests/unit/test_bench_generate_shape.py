"""The pure parts of `forkrl bench generate`'s shape bound (cluster/tools/bench/generate.py): the rows of each
decode step, the interpolation between timed shapes, the Linear shapes of a model. Nothing here is timed."""

import torch
from transformers import LlamaConfig

from cluster.tools.bench.generate import _meta_model, decode_batches, interpolate, linear_shapes, matmul_pass_s


def test_decode_batches_count_the_responses_still_running():
    # the prefill samples token 1 of all; step t multiplies the responses longer than t
    assert decode_batches([1, 1, 1]) == []
    assert decode_batches([3, 1, 2]) == [2, 1]
    assert decode_batches([]) == []
    lengths = [5, 5, 2, 64, 1]
    b = decode_batches(lengths)
    assert len(b) == 63 and b[0] == 4 and b[-1] == 1
    assert sum(b) + len(lengths) == sum(lengths)   # every token: the prefill's one per response + one per step


def test_interpolate_is_exact_at_the_points_linear_between_and_clamped():
    pts = {1: 1.0, 4: 2.5, 16: 4.0}
    assert interpolate(pts, 1) == 1.0 and interpolate(pts, 4) == 2.5 and interpolate(pts, 16) == 4.0
    assert interpolate(pts, 2) == 1.5 and interpolate(pts, 10) == 3.25
    assert interpolate(pts, 0) == 1.0 and interpolate(pts, 99) == 4.0


def test_linear_shapes_are_the_models_matmuls_with_lm_head():
    cfg = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    shapes = linear_shapes(_meta_model(cfg))
    per_layer = [(16, 16), (16, 8), (16, 8), (16, 16), (16, 40), (16, 40), (40, 16)]   # q k v o gate up down
    assert sorted(shapes) == sorted(per_layer * 2 + [(16, 100)])


def test_a_matmul_pass_feeds_each_weight_an_input_of_its_own_width():
    ws = [torch.randn(8, 4), torch.randn(4, 8), torch.randn(8, 3)]
    assert matmul_pass_s(ws, 5, threads=1, repeats=1) > 0
