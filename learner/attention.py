"""Shared-prompt attention without an L x L mask, registered in transformers' attention-function registry.

A shared-prompt row (learner.batching) is one prompt then its responses' segments; segment k's queries
attend to the prompt and to segment k's earlier tokens, never to another segment. A dense [B, 1, L, L] mask
says that at O(L^2) memory and rules out the fused kernels (an arbitrary mask sends SDPA to its math
kernel, which keeps the [L, L] attention weights for backward). This function never builds one.

The block-structured form. Every segment becomes an ordinary causal sequence of the attention call,
[the row's prompt ; the segment], gathered from the row's already projected (and RoPE-rotated) queries,
keys and values; a row without a segment (every response one token long) contributes its prompt alone.
The sequences are right-padded into buckets of similar width and each bucket is ONE fused causal SDPA call
(`is_causal=True`, no mask tensor: flash attention on CPU and on CUDA, which keep O(width) memory and
recompute in backward). Under a causal mask a real query never sees the right-padding, and the prompt's
queries see only the prompt: a segment's outputs are exactly those of its own sequence, the prompt's are
read from the row's first sequence. Everything outside attention (projections, MLPs, norms) still runs on
the row, so the prompt's tokens are computed once per row, not once per response: that is the saving of
the layout. Attention memory is O(sum over segments of (P + R_k)) per layer, work sum (P + R_k)^2 / 2,
never the (P + sum R_k)^2 square of the row. The one redundancy is the prompt's own queries, recomputed
in every segment's sequence (P^2 / 2 per segment, small next to R_k (P + R_k / 2) when responses are
longer than prompts, as in RLVR); a CUDA kernel with lower-right causal alignment (FlexAttention, varlen
flash) could drop it.

Gradients flow through the gathers (index_select's backward adds the prompt keys' and values' gradients
from every segment), so the function is exact in value and gradient: the float64 checks of
tests/unit/test_attention.py compare it with one sequence at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NAME = "forkrl_shared_prompt"   # the attention implementation's name in transformers' registry
KWARG = "forkrl_layout"         # the model-forward keyword argument carrying the AttentionLayout


@dataclass
class AttentionLayout:
    """Where each causal sequence of the attention calls comes from in the [B, L] block, and where each row
    position's output is found (built by learner.batching.collate; all int64 on the block's device)."""

    packs: list[torch.Tensor]   # per fused call, [S_b, W_b]: flat [B*L] index of each sequence's tokens (prompt, then one segment), right-padded with index 0
    source: torch.Tensor        # [B*L]: index of each row position's output in the concatenated [S_b*W_b] outputs of the calls; one past their end is zero (padding)

    def to(self, device: torch.device | str) -> "AttentionLayout":
        return AttentionLayout([p.to(device) for p in self.packs], self.source.to(device))


def build_layout(rows: list[tuple[int, int, list[tuple[int, int]]]], width: int,
                 bucket_ratio: float = 0.5) -> AttentionLayout:
    """rows: per row (row index, prompt length P >= 1, segments [(start, length)] with start >= P, length
    >= 0); width: L. Sequences are sorted widest first and a new bucket (fused call) starts when a
    sequence is narrower than `bucket_ratio` x its bucket's width (bounds the padding work)."""
    seqs: list[tuple[int, int, int, int]] = []     # (row, P, start, n)
    for r, p, segs in rows:
        mine = [(r, p, s, n) for s, n in segs if n > 0]
        seqs += mine or [(r, p, p, 0)]
    order = sorted(range(len(seqs)), key=lambda j: (-(seqs[j][1] + seqs[j][3]), j))
    buckets: list[list[int]] = []
    for j in order:
        w = seqs[j][1] + seqs[j][3]
        if not buckets or w < bucket_ratio * (seqs[buckets[-1][0]][1] + seqs[buckets[-1][0]][3]):
            buckets.append([])
        buckets[-1].append(j)
    n_rows = max((r for r, _, _ in rows), default=-1) + 1
    packs, base = [], 0
    slot_of: dict[int, int] = {}                    # sequence -> flat index of its slot 0 in the outputs
    for b in buckets:
        wb = seqs[b[0]][1] + seqs[b[0]][3]
        pack = torch.zeros((len(b), wb), dtype=torch.long)
        for i, j in enumerate(b):
            r, p, s, n = seqs[j]
            pack[i, :p] = r * width + torch.arange(p)
            pack[i, p:p + n] = r * width + torch.arange(s, s + n)
            slot_of[j] = base + i * wb
        packs.append(pack)
        base += len(b) * wb
    source = torch.full((n_rows * width,), base, dtype=torch.long)   # `base` = the zero row (padding)
    first: dict[int, int] = {}
    for j, (r, p, s, n) in enumerate(seqs):
        if r not in first:
            first[r] = j
            source[r * width:r * width + p] = slot_of[j] + torch.arange(p)
        source[r * width + s:r * width + s + n] = slot_of[j] + p + torch.arange(n)
    return AttentionLayout(packs, source)


def shared_prompt_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [B, H, L, D], key/value [B, Hkv, L, D] -> ([B, L, H, D], None),
    laid out by the `forkrl_layout` keyword argument of the model's forward (an AttentionLayout)."""
    layout: AttentionLayout | None = kwargs.get(KWARG)
    if layout is None:
        raise ValueError(f"attention {NAME!r} needs the model forward's {KWARG}= argument (learner.batching)")
    if sliding_window is not None:
        raise NotImplementedError(f"attention {NAME!r}: sliding-window layers are not supported")
    if dropout:
        raise NotImplementedError(f"attention {NAME!r}: attention dropout must be off (learner.engine.disable_dropout)")
    b, h, length, d = query.shape
    hkv = key.shape[1]
    q = query.transpose(1, 2).reshape(b * length, h, d)
    k = key.transpose(1, 2).reshape(b * length, hkv, d)
    v = value.transpose(1, 2).reshape(b * length, hkv, value.shape[-1])
    outs = []
    for pack in layout.packs:
        s, w = pack.shape
        flat = pack.reshape(-1)
        qb = q.index_select(0, flat).view(s, w, h, d).transpose(1, 2)
        kb = k.index_select(0, flat).view(s, w, hkv, d).transpose(1, 2)
        vb = v.index_select(0, flat).view(s, w, hkv, v.shape[-1]).transpose(1, 2)
        if hkv != h:   # grouped-query attention
            kb, vb = kb.repeat_interleave(h // hkv, dim=1), vb.repeat_interleave(h // hkv, dim=1)
        ob = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scaling)
        outs.append(ob.transpose(1, 2).reshape(s * w, h, ob.shape[-1]))
    outs.append(query.new_zeros(1, h, value.shape[-1]))
    out = torch.cat(outs).index_select(0, layout.source).view(b, length, h, value.shape[-1])
    return out, None


def register() -> str:
    """Register the function under NAME (idempotent); returns NAME for `attn_implementation=`."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, shared_prompt_attention)
    return NAME
