"""From scored groups to mini- and micro-batches (pure, no I/O).

A sequence is prompt + response. A rank's sequences have one flat token order: the response tokens of
sequence 0, then of sequence 1, ... (`token_offsets`); the learner keeps its per-token vectors (old
log-probs, advantages, masks) in that order, [T] with T = the rank's response tokens.

Micro-batches group sequences of similar length (sorted, longest first) into a right-padded [B, L] block
whose B*L stays within the token budget, so padding stays small; the positions whose hidden state predicts
a response token are gathered into the flat, padding-free [N] vectors the loss functions take, and
`MicroBatch.positions` maps them back into the rank's [T] order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cluster.types import ScoredGroup


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
    attention_mask: torch.Tensor  # [B, L] int64
    gather: torch.Tensor          # [N] int64 flat index into [B*L] of the positions predicting response tokens
    targets: torch.Tensor         # [N] int64 response tokens
    seq_ids: torch.Tensor         # [N] int64 row of each token (0..B-1)
    positions: torch.Tensor       # [N] int64 each token's index in the rank's flat [T] token order
    rows: list[int]               # [B] index of each row's sequence in the rank's sequence list

    @property
    def num_tokens(self) -> int:
        return int(self.targets.numel())

    def to(self, device: torch.device | str) -> "MicroBatch":
        return MicroBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.gather,
                                                    self.targets, self.seq_ids, self.positions)), self.rows)


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


def plan_micro_batches(seqs: list[Seq], indices: list[int], budget_tokens: int) -> list[list[int]]:
    """Partition `indices` (into seqs) into micro-batches, longest first, with B * max_len <= budget
    (a sequence longer than the budget gets a micro-batch of its own)."""
    order = sorted(indices, key=lambda i: (-len(seqs[i].ids), i))
    plans: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for i in order:
        w = max(width, len(seqs[i].ids))
        if cur and w * (len(cur) + 1) > budget_tokens:
            plans.append(cur)
            cur, w = [], len(seqs[i].ids)
        cur.append(i)
        width = w
    if cur:
        plans.append(cur)
    return plans


def collate(seqs: list[Seq], rows: list[int], offsets: list[int], pad_id: int = 0) -> MicroBatch:
    """The right-padded block of seqs[rows] and the flat index of its response-predicting positions."""
    width = max(len(seqs[i].ids) for i in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    gather, targets, seq_ids = [], [], []
    for r, i in enumerate(rows):
        s = seqs[i]
        ids[r, :len(s.ids)] = torch.from_numpy(s.ids)
        att[r, :len(s.ids)] = 1
        pos = torch.arange(s.prompt_len - 1, len(s.ids) - 1)  # the hidden state at t predicts token t+1
        gather.append(r * width + pos)
        targets.append(torch.from_numpy(s.ids[s.prompt_len:]))
        seq_ids.append(torch.full((s.resp_len,), r, dtype=torch.long))
    return MicroBatch(ids, att, torch.cat(gather), torch.cat(targets), torch.cat(seq_ids),
                      flat_positions(seqs, rows, offsets), list(rows))


def split_groups(num_groups: int, parts: int) -> list[list[int]]:
    """Group indices split into `parts` contiguous, as-even-as-possible mini-batches (some may be empty)."""
    return [a.tolist() for a in np.array_split(np.arange(num_groups), parts)]
