"""From scored groups to mini- and micro-batches (pure, no I/O).

A sequence is prompt + response. A rank's sequences have one flat token order: the response tokens of
sequence 0, then of sequence 1, ... (`token_offsets`); the learner keeps its per-token vectors (old
log-probs, advantages, masks) in that order, [T] with T = the rank's response tokens.

Shared-prompt rows. The G responses of a group share one prompt, and under a causal mask the prompt's
hidden states do not depend on what follows it, so a row holds the prompt ONCE followed by its responses,
each one a segment that attends to the prompt and to itself only (position ids that restart after the
prompt for every segment, and an `attention.AttentionLayout` that says which positions each segment sees:
learner.attention computes the layout as fused causal attention calls, never an [L, L] mask). That is the same function as G separate
rows, gradients included, at 1/G of the prompt's cost: on the arithmetic task the prompt is half of the
tokens of a step. A segment holds its response's tokens except the last (whose hidden state predicts
nothing); the hidden state at the prompt's last position predicts every response's first token.

Micro-batches group rows of similar width (sorted, widest first) into a right-padded [B, L] block whose
B*L stays within the token budget (a group too wide for it is split over several rows, each with its own
copy of the prompt); the positions whose hidden state predicts a response token are gathered into the flat,
padding-free [N] vectors the loss functions take, and `MicroBatch.positions` maps them back into the rank's
[T] order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cluster.split import split_even
from cluster.types import ScoredGroup
from learner.attention import AttentionLayout, build_layout


@dataclass
class Seq:
    ids: np.ndarray            # [P + R] int64 prompt then response tokens
    prompt_len: int            # P >= 1
    sampler_logp: np.ndarray   # [R] float32 sampler log-probs of the response tokens
    advantage: float
    group: int                 # index of the group within the rank's rollout batch

    @property
    def resp_len(self) -> int:
        return len(self.ids) - self.prompt_len


@dataclass
class MicroBatch:
    input_ids: torch.Tensor       # [B, L] int64, right-padded
    layout: AttentionLayout       # which positions each segment's queries see (learner.attention; no [L, L] mask)
    position_ids: torch.Tensor    # [B, L] int64, restarting after the prompt for every response segment
    gather: torch.Tensor          # [N] int64 flat index into [B*L] of the positions predicting response tokens
    targets: torch.Tensor         # [N] int64 response tokens
    seq_ids: torch.Tensor         # [N] int64 sequence of each token within the micro-batch (0..S-1)
    positions: torch.Tensor       # [N] int64 each token's index in the rank's flat [T] token order
    seqs: list[int]               # [S] the micro-batch's sequences (indices into the rank's list), in token order

    @property
    def num_tokens(self) -> int:
        return int(self.targets.numel())

    def to(self, device: torch.device | str) -> "MicroBatch":
        return MicroBatch(self.input_ids.to(device), self.layout.to(device),
                          *(t.to(device) for t in (self.position_ids, self.gather, self.targets, self.seq_ids,
                                                   self.positions)),
                          self.seqs)


def check_group(group: ScoredGroup, vocab_size: int) -> str | None:
    """Why the learner cannot train on this group, naming the field (None: it can). The codec already
    checked structure and dtypes; these are the facts only the learner knows or that would crash or
    poison a forward pass (an id outside the vocabulary, a non-finite number, an empty prompt)."""
    ro = group.rollout
    if len(ro.prompt_ids) == 0:
        return "rollout.prompt_ids is empty (a response's first token needs a prompt position)"
    if len(group.advantages) != len(ro.responses):
        return f"advantages has {len(group.advantages)} values for {len(ro.responses)} responses"
    bad = _outside(ro.prompt_ids, vocab_size)
    if bad is not None:
        return f"rollout.prompt_ids[{bad}] = {int(ro.prompt_ids[bad])} is outside the vocabulary [0, {vocab_size})"
    for i, (resp, adv) in enumerate(zip(ro.responses, group.advantages)):
        if not np.isfinite(adv):
            return f"advantages[{i}] is not finite ({adv})"
        if len(resp.logprobs) != len(resp.token_ids):
            return f"responses[{i}]: {len(resp.token_ids)} token_ids but {len(resp.logprobs)} logprobs"
        bad = _outside(resp.token_ids, vocab_size)
        if bad is not None:
            return (f"responses[{i}].token_ids[{bad}] = {int(resp.token_ids[bad])} is outside the vocabulary "
                    f"[0, {vocab_size})")
        lp = np.asarray(resp.logprobs)
        if not np.isfinite(lp).all():
            j = int(np.flatnonzero(~np.isfinite(lp))[0])
            return f"responses[{i}].logprobs[{j}] = {lp[j]} is not finite"
    return None


def _outside(ids, vocab_size: int) -> int | None:
    a = np.asarray(ids)
    bad = np.flatnonzero((a < 0) | (a >= vocab_size))
    return int(bad[0]) if bad.size else None


def sequences(groups: list[ScoredGroup]) -> list[Seq]:
    """One Seq per response, in group order; empty responses are skipped (no token to learn from; they
    also leave the response count of the seq-mean normalisers)."""
    out = []
    for g, sg in enumerate(groups):
        prompt = np.asarray(sg.rollout.prompt_ids, dtype=np.int64)
        for resp, adv in zip(sg.rollout.responses, sg.advantages):
            tok = np.asarray(resp.token_ids, dtype=np.int64)
            if tok.size == 0:
                continue
            out.append(Seq(np.concatenate([prompt, tok]), len(prompt),
                           np.asarray(resp.logprobs, dtype=np.float32), float(adv), g))
    return out


def token_offsets(seqs: list[Seq]) -> list[int]:
    """Offset of each sequence's first response token in the rank's flat [T] token order."""
    return np.concatenate([[0], np.cumsum([s.resp_len for s in seqs])[:-1]]).astype(int).tolist() if seqs else []


def flat_positions(seqs: list[Seq], rows: list[int], offsets: list[int]) -> torch.Tensor:
    """[sum of resp_len over rows] int64: the flat [T] positions of the response tokens of seqs[rows], in order."""
    if not rows:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(offsets[i], offsets[i] + seqs[i].resp_len) for i in rows])


Row = list[int]   # indices of sequences with one prompt (one group), laid out as one shared-prompt row


def row_width(seqs: list[Seq], row: Row) -> int:
    """Tokens of a shared-prompt row: the prompt once, then every response but its last token."""
    return seqs[row[0]].prompt_len + sum(seqs[i].resp_len - 1 for i in row)


def plan_micro_batches(seqs: list[Seq], indices: list[int], budget_tokens: int) -> list[list[Row]]:
    """Partition `indices` (into seqs) into micro-batches of shared-prompt rows: each group's sequences fill
    rows of at most `budget_tokens` tokens (a single sequence wider than that gets a row of its own), then
    rows are packed widest first with B * max_width <= budget (an over-wide row gets a micro-batch alone)."""
    by_group: dict[int, list[int]] = {}
    for i in indices:
        by_group.setdefault(seqs[i].group, []).append(i)
    rows: list[Row] = []
    for members in by_group.values():
        cur: Row = []
        for i in sorted(members, key=lambda i: (-seqs[i].resp_len, i)):
            if cur and row_width(seqs, cur + [i]) > budget_tokens:
                rows.append(cur)
                cur = []
            cur.append(i)
        rows.append(cur)
    rows.sort(key=lambda r: (-row_width(seqs, r), r[0]))
    plans: list[list[Row]] = []
    cur_mb: list[Row] = []
    width = 0
    for r in rows:
        w = max(width, row_width(seqs, r))
        if cur_mb and w * (len(cur_mb) + 1) > budget_tokens:
            plans.append(cur_mb)
            cur_mb, w = [], row_width(seqs, r)
        cur_mb.append(r)
        width = w
    if cur_mb:
        plans.append(cur_mb)
    return plans


def collate(seqs: list[Seq], rows: list[Row], offsets: list[int], pad_id: int = 0) -> MicroBatch:
    """The right-padded block of shared-prompt rows, its attention layout and position ids, and the flat
    index of its response-predicting positions (see the module doc). Memory O(B * L), no [L, L] term."""
    width = max(row_width(seqs, r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos_ids = torch.zeros((len(rows), width), dtype=torch.long)
    layout_rows: list[tuple[int, int, list[tuple[int, int]]]] = []   # (row, prompt length, [(start, length)])
    gather, targets, seq_ids, order = [], [], [], []
    for r, row in enumerate(rows):
        p = seqs[row[0]].prompt_len
        if any(seqs[i].prompt_len != p or not np.array_equal(seqs[i].ids[:p], seqs[row[0]].ids[:p]) for i in row):
            raise ValueError(f"row {r}: sequences {row} do not share one prompt")
        ids[r, :p] = torch.from_numpy(seqs[row[0]].ids[:p])
        pos_ids[r, :p] = torch.arange(p)
        layout_rows.append((r, p, []))
        at = p
        for i in row:
            s = seqs[i]
            n = s.resp_len - 1   # inputs: the response without its last token
            ids[r, at:at + n] = torch.from_numpy(s.ids[p:p + n])
            pos_ids[r, at:at + n] = torch.arange(p, p + n)
            layout_rows[-1][2].append((at, n))
            # response token 0 is predicted at the prompt's last position, token j >= 1 at segment position j-1
            gather.append(r * width + torch.cat([torch.tensor([p - 1]), torch.arange(at, at + n)]))
            targets.append(torch.from_numpy(s.ids[p:]))
            seq_ids.append(torch.full((s.resp_len,), len(order), dtype=torch.long))
            order.append(i)
            at += n
    return MicroBatch(ids, build_layout(layout_rows, width), pos_ids, torch.cat(gather), torch.cat(targets),
                      torch.cat(seq_ids), flat_positions(seqs, order, offsets), order)


class MicroBatches:
    """The micro-batches of one pass, planned up front and collated (and moved to `device`) one at a time
    as they are iterated: nothing of the pass's size (step tokens x row width) is ever held, only the
    current micro-batch. Iterating again collates again. After the plans come `count - len(plans)` Nones
    (empty passes, so every rank runs the same number of forwards)."""

    def __init__(self, seqs: list[Seq], plans: list[list[Row]], offsets: list[int], pad_id: int,
                 device: torch.device | str, count: int | None = None):
        self.seqs, self.plans, self.offsets, self.pad_id, self.device = seqs, plans, offsets, pad_id, device
        self.count = len(plans) if count is None else count
        if self.count < len(plans):
            raise ValueError(f"count {self.count} < {len(plans)} planned micro-batches")

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        for p in self.plans:
            yield collate(self.seqs, p, self.offsets, self.pad_id).to(self.device)
        for _ in range(self.count - len(self.plans)):
            yield None

    @property
    def token_counts(self) -> list[int]:
        """Response tokens of each planned (non-empty) micro-batch, without collating."""
        return [sum(self.seqs[i].resp_len for r in p for i in r) for p in self.plans]


def split_groups(num_groups: int, parts: int) -> list[list[int]]:
    """Group indices split into `parts` contiguous, as-even-as-possible mini-batches (some may be empty)."""
    return split_even(range(num_groups), parts)
