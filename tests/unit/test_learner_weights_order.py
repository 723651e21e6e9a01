"""learner.weights.module_params: every parameter once, the tied lm_head left out, and the input embedding last
(its bucket no longer holds back the start of the generator's layer-wise reload, docs/performance.md)."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from learner.weights import module_params, weight_specs


def _model(tied: bool) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=tied)
    return Qwen2ForCausalLM(cfg)


def test_every_parameter_once_embedding_last_the_rest_in_module_order():
    for tied in (True, False):
        lm = _model(tied)
        got = [n for _, params in module_params(lm) for n, _ in params]
        # the reference: named_parameters' order (a tied weight once, under its first name), embedding moved last
        ref = [n for n, _ in lm.named_parameters()]
        assert ref[0] == "model.embed_tokens.weight"
        assert got == ref[1:] + ref[:1], (tied, got)
        assert ("lm_head.weight" in got) == (not tied)
        assert [s.name for s in weight_specs(lm)] == got
        assert [tuple(s.shape) for s in weight_specs(lm)] == [tuple(dict(lm.named_parameters())[n].shape)
                                                              for n in got]
