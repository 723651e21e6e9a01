"""Sampling from a Hugging Face transformers model: the one `generate` call behind the generator's HF engine
(actors/generator.py), the tiny model's sampled accuracy (cluster.data.models) and the entropy-patterns
experiment (cluster.tools.experiments).

Pure sampling (top_k = 0: transformers' default top-k of 50 is off) at `temperature`, nucleus `top_p`;
temperature 0 is greedy. The prompts are a left-padded batch, so every row's new tokens start at the same
column. The caller owns the random state (the global torch generator) and the grad mode.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, NamedTuple


class Sampled(NamedTuple):
    tokens: Any          # [B * n, L] int64 torch tensor: the new tokens after the prompt (padded after an EOS)
    scores: Any = None   # with scores=True: L tensors [B * n, V], the processed (temperature, top-p) logits
    logits: Any = None   # with logits=True: L tensors [B * n, V], the raw logits of each sampled position


def hf_sample(model, inputs: Mapping[str, Any], *, temperature: float, max_new_tokens: int,
              eos_token_id: int | list[int], pad_token_id: int, top_p: float = 1.0, n: int = 1,
              scores: bool = False, logits: bool = False) -> Sampled:
    """`model.generate` on `inputs` (input_ids [B, P] left-padded, attention_mask, ...): n samples per row
    (row i's samples are rows i*n .. i*n + n-1 of the result)."""
    greedy = temperature == 0
    kw: dict[str, Any] = dict(do_sample=not greedy, temperature=None if greedy else temperature,
                              top_p=None if greedy else top_p, top_k=0, max_new_tokens=max_new_tokens,
                              eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if n != 1:
        kw["num_return_sequences"] = n
    if scores:
        kw["output_scores"] = True
    if logits:
        kw["output_logits"] = True
    if scores or logits:
        kw["return_dict_in_generate"] = True
    out = model.generate(**inputs, **kw)
    width = inputs["input_ids"].shape[1]
    if not (scores or logits):
        return Sampled(out[:, width:])
    return Sampled(out.sequences[:, width:], out.scores if scores else None, out.logits if logits else None)


def left_pad(prompt_ids: list[list[int]], pad_token_id: int) -> dict[str, Any]:
    """Token-id prompts -> {"input_ids", "attention_mask"} [B, max P] int64, left-padded: every prompt ends
    where generation starts."""
    import torch

    width = max(map(len, prompt_ids))
    ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def cut_at_eos(tokens: list[int], eos: Collection[int]) -> tuple[list[int], bool]:
    """A sampled row -> (its tokens through the first EOS, which is a sampled token and kept; whether it
    stopped there, False when it ran to max_new_tokens)."""
    end = next((k + 1 for k, t in enumerate(tokens) if t in eos), None)
    return (tokens, False) if end is None else (tokens[:end], True)
