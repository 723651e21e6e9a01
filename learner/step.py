"""One RL step on one learner rank, with the other ranks (`TrainStep.run`): recompute the old log-probs and
entropies (no grad; skipped when the step has a single update, see `single_pass`) -> for each epoch and
mini-batch: the forking-token mask at the configured scope, the global normalisers, forward/backward over
packed shared-prompt micro-batches (learner.batching), one optimizer step.

Collectives. ZeRO-2 reduces gradients inside every backward and ZeRO-3 gathers parameters inside every
forward, so every rank runs the same sequence of passes: a rank with fewer micro-batches in a pass list
runs empty ones (a 2-token forward whose loss is multiplied by zero), and every decision that changes the
sequence is taken from values all ranks share (config, counts summed across ranks).

Exact mini-batch loss. Every normaliser is a global count of the mini-batch across ranks
(`losses.BatchCounts`): the token-mean denominator is the number of response tokens of the mini-batch on
all ranks, the selected count is the number of tokens the masks select on all ranks
(`masks.scope_selected_count`). Each micro-batch loss is multiplied by `deepspeed_loss_scale(world)` to undo
DeepSpeed's mean over ranks, so the gradient DeepSpeed hands the optimizer is exactly the gradient of the
mini-batch loss.

Old log-probs (AlgorithmConfig.old_logprobs): `recompute` (default) runs a no-grad pass under the weights
before the step's first update, or, with one update per step (`single_pass`), takes them from the training
forward itself, where they are the same numbers (about a third of a step's compute saved); `sampler` takes
the sampler's log-probs, so the PPO ratio itself corrects the sampler/learner mismatch. With `recompute`
and `tis_cap`, each token's policy term is weighted by min(pi_old / pi_sampler, tis_cap). The mismatch
|log pi_old - log pi_sampler| is reported either way (learner/logprob_mismatch_mean, _max).

Forking-token scope (AlgorithmConfig.entropy_scope): `micro` is computed inside the loss; `mini` (this
rank's mini-batch) and `global` (all ranks' mini-batch, `distributed.global_forking_mask`) need the
mini-batch's entropies before its first backward: the first update of a step reuses the recompute pass
(the weights are still the old policy's), later mini-batches run one extra no-grad pass under the current
weights (the 80/20 code also takes entropies from the policy being trained).

Statistics. The micro-batch losses leave their statistics on the device (no host synchronisation per
micro-batch); `stats.parts_to_host` copies the step's parts to the host once. Rank 0 returns the step's
learner statistics over ALL ranks (`stats.summarize` of every rank's micro-batch parts, gathered without
pickle), with loss/* the mean over the step's updates of the global
mini-batch loss; every rank returns its own learner/groups, learner/responses, learner/tokens and time/*
(the driver sums and maxes those).
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import numpy as np
import torch

from cluster.config import Config
from cluster.types import ScoredGroup, StepStats
from learner.batching import (MicroBatches, Seq, check_group, flat_positions, plan_micro_batches, sequences,
                              split_groups, token_offsets)
from learner.distributed import all_reduce_floats
from learner.engine import Engine
from learner.masks import mask_active, scope_selected_count

log = logging.getLogger("forkrl.learner")


def single_pass(cfg: Config) -> bool:
    """Whether a step trains with one forward per micro-batch, no separate no-grad pass for pi_old: one
    update per step (epochs = mini_batches = 1, so pi_old IS the weights being trained and the ratio is 1
    in value), old log-probs recomputed (not the sampler's), no TIS weight (it needs pi_old before the
    forward) and no mini/global forking mask (it needs the whole mini-batch's entropies before the first
    backward). TRL skips the same pass when num_iterations = 1; verl recomputes it always."""
    ac, lc = cfg.algorithm, cfg.learner
    return (lc.epochs == 1 and lc.mini_batches == 1 and ac.old_logprobs == "recompute" and ac.tis_cap is None
            and (not mask_active(ac.top_entropy_ratio, ac.mask_variant) or ac.entropy_scope == "micro"))


class TrainStep:
    """The training step of one rank over its engine; `gen` (per rank) and `mask_gen` (same state on every
    rank) are the seeded generators of the random draws; `entropy_control` the adaptive-entropy state."""

    def __init__(self, cfg: Config, eng: Engine, rank: int, world: int, gen: torch.Generator,
                 mask_gen: torch.Generator, entropy_control=None):
        self.cfg, self.eng, self.rank, self.world = cfg, eng, rank, world
        self.gen, self.mask_gen, self.entropy_control = gen, mask_gen, entropy_control
        self.updates = 0      # optimizer updates
        self.grad_buffer: torch.Tensor | None = None

    # ------------------------------------------------------------------ collectives
    def reduce(self, values: list[float], op: str = "sum") -> list[float]:
        return all_reduce_floats(values, op, device=self.eng.device)

    def all_ok(self, ok: bool) -> bool:
        return self.reduce([1.0 if ok else 0.0], "min")[0] > 0

    # ------------------------------------------------------------------ passes
    def _micro_batches(self, seqs: list[Seq], idx: list[int], offsets: list[int],
                       no_grad: bool = False) -> MicroBatches:
        """Packed micro-batches of seqs[idx], collated lazily (one at a time as the pass iterates), padded
        with None (an empty pass) to the ranks' largest count. `no_grad`: a no-grad pass's token budget
        (learner.logprob_micro_batch_tokens, the per-rank cap on its memory)."""
        lc = self.cfg.learner
        budget = (lc.logprob_micro_batch_tokens or lc.micro_batch_tokens) if no_grad else lc.micro_batch_tokens
        plans = plan_micro_batches(seqs, idx, budget)
        return MicroBatches(seqs, plans, offsets, self.eng.pad_id, self.eng.device,
                            int(self.reduce([len(plans)], "max")[0]))

    @torch.no_grad()
    def _token_pass(self, mbs: MicroBatches, total: int,
                    with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """No-grad log-probs and entropies of the micro-batches' response tokens under the current weights,
        at their positions in [total] float32 vectors (NaN elsewhere)."""
        from learner.tokenstats import token_stats

        logp = torch.full((total,), math.nan, device=self.eng.device)
        ent = torch.full((total,), math.nan, device=self.eng.device)
        for mb in mbs:
            logits = self.eng.logits(mb)
            if mb is None:
                continue
            lp, h = token_stats(logits, mb.targets, self.cfg.rollout.temperature,
                                chunk=self.cfg.learner.logits_chunk, with_entropy=with_entropy)
            logp[mb.positions] = lp
            if h is not None:
                ent[mb.positions] = h
        return logp, ent

    @torch.no_grad()
    def _ref_logp(self, seqs: list[Seq], offsets: list[int], total: int) -> torch.Tensor:
        """Reference-policy log-probs [total] (a plain `Policy` on every rank, outside DeepSpeed: no collectives)."""
        from learner.tokenstats import token_stats

        out = torch.full((total,), math.nan, device=self.eng.device)
        lc = self.cfg.learner
        plans = plan_micro_batches(seqs, list(range(len(seqs))), lc.logprob_micro_batch_tokens or lc.micro_batch_tokens)
        for mb in MicroBatches(seqs, plans, offsets, self.eng.pad_id, self.eng.device):
            logits = self.eng.ref(mb.input_ids, mb.layout, mb.position_ids, mb.gather)
            out[mb.positions] = token_stats(logits, mb.targets, self.cfg.rollout.temperature,
                                            chunk=self.cfg.learner.logits_chunk, with_entropy=False)[0]
        return out

    def _scope_mask(self, seqs: list[Seq], idx: list[int], offsets: list[int], total: int,
                    entropy: torch.Tensor | None) -> tuple[torch.Tensor | None, float]:
        """The mini-batch's forking mask [total] bool and tau for scopes mini/global (None for micro or
        when no mask is in use). `entropy` [total]: reusable entropies, or None to recompute them."""
        from learner.distributed import global_forking_mask
        from learner.masks import forking_mask, window_entropy

        ac = self.cfg.algorithm
        if not mask_active(ac.top_entropy_ratio, ac.mask_variant) or ac.entropy_scope == "micro":
            return None, math.nan
        if entropy is None:
            entropy = self._token_pass(self._micro_batches(seqs, idx, offsets, no_grad=True), total,
                                       with_entropy=True)[1]
        pos = flat_positions(seqs, idx, offsets).to(self.eng.device)
        local = entropy[pos]
        if ac.entropy_window > 1:   # ARES/AEPO: rank by the window mean, each response's own tokens only
            sids = torch.repeat_interleave(torch.arange(len(idx)), torch.tensor([seqs[i].resp_len for i in idx],
                                                                                dtype=torch.long))
            local = window_entropy(local, sids.to(self.eng.device), ac.entropy_window)
        if ac.entropy_scope == "global":
            sel, tau = global_forking_mask(local, ac.top_entropy_ratio, ac.mask_variant, generator=self.mask_gen)
        else:
            sel, tau = forking_mask(local, ac.top_entropy_ratio, ac.mask_variant, generator=self.gen)
        mask = torch.zeros(total, dtype=torch.bool, device=self.eng.device)
        mask[pos] = sel
        return mask, tau

    def _valid_groups(self, groups: list[ScoredGroup]) -> tuple[list[ScoredGroup], int]:
        ok = []
        for g in groups:
            problem = check_group(g, self.eng.vocab_size)
            if problem is None:
                ok.append(g)
            else:  # never crash a rank (its peers would wait in a collective); acked with the rest
                log.warning("learner rank %d: dropping group %r: %s", self.rank, g.group_id, problem)
        return ok, len(groups) - len(ok)

    # ------------------------------------------------------------------ the step
    def run(self, groups: list[ScoredGroup], version: int) -> StepStats:
        """One RL step on this rank's share of groups (may be empty), with the other ranks; `version` is the
        weights version this step produces (learner/version)."""
        from learner.entropy_control import update_control
        from learner.losses import BatchCounts, check_inputs, deepspeed_loss_scale, micro_batch_loss
        from learner.stats import group_sequence_stats, parts_to_host

        t0 = time.perf_counter()
        cfg, ac, lc = self.cfg, self.cfg.algorithm, self.cfg.learner
        eng = self.eng
        groups, dropped = self._valid_groups(groups)
        seqs = sequences(groups)
        offsets = token_offsets(seqs)
        total = sum(s.resp_len for s in seqs)
        dev = eng.device
        sampler_logp = torch.from_numpy(np.concatenate([s.sampler_logp for s in seqs]) if seqs
                                        else np.zeros(0, np.float32)).to(dev)
        adv = torch.tensor([s.advantage for s in seqs for _ in range(s.resp_len)], dtype=torch.float32, device=dev)

        # pi_old = the current weights before this step's first update (in the synchronous loop, the
        # sampler's weights): its log-probs, and its entropies for the first mini-batch's mask. With a single
        # update per step nothing needs them before the training forward, which computes them anyway
        # (`single_pass`): they are filled in from it below.
        single = single_pass(cfg)
        if single:
            old_logp = torch.full((total,), math.nan, device=dev)
            old_ent = torch.full((total,), math.nan, device=dev)
        else:
            old_logp, old_ent = self._token_pass(self._micro_batches(seqs, list(range(len(seqs))), offsets,
                                                                     no_grad=True), total, with_entropy=True)
        tis = None
        if ac.old_logprobs == "sampler":
            pi_old = sampler_logp.clone()
        else:
            pi_old = old_logp
            if ac.tis_cap is not None:
                tis = torch.exp(torch.clamp(old_logp - sampler_logp, max=math.log(ac.tis_cap)))
        ref_logp = self._ref_logp(seqs, offsets, total) if eng.ref is not None else None
        alpha = self.entropy_control.alpha if self.entropy_control else ac.entropy_coef
        # the loss's value checks once over the step's [T] vectors, not per micro-batch (host syncs)
        check_inputs(total, old_logp=None if single else pi_old, advantages=adv, ref_logp=ref_logp, token_weight=tis)
        t_prep = time.perf_counter() - t0

        parts: list[dict[str, Any]] = []
        grad_norms, lrs = [], []
        n_updates = 0
        scale = deepspeed_loss_scale(self.world)
        minis = split_groups(len(groups), lc.mini_batches)
        for epoch in range(lc.epochs):
            for m, gidx in enumerate(minis):
                gset = set(gidx)
                idx = [i for i, s in enumerate(seqs) if s.group in gset]
                mbs = self._micro_batches(seqs, idx, offsets)
                fresh = epoch == 0 and m == 0  # the weights are still pi_old: its entropies are current
                mask_vec, tau = self._scope_mask(seqs, idx, offsets, total, old_ent if fresh else None)
                n_tok = sum(mbs.token_counts)
                n_sel = scope_selected_count(mbs.token_counts, ac.top_entropy_ratio, ac.mask_variant, mask_vec)
                g_tok, g_sel, g_resp = self.reduce([n_tok, n_sel, len(idx)])
                if g_tok == 0:
                    continue  # no rank has a token in this mini-batch: no update (identical on all ranks)
                counts = BatchCounts(int(g_tok), int(g_sel), int(g_resp), cfg.rollout.max_new_tokens)
                for mb in mbs:
                    logits = eng.logits(mb)
                    if mb is None:
                        eng.engine.backward(logits.float().sum() * 0.0, scale_wrt_gas=False)
                        continue
                    pos = mb.positions
                    loss, part = micro_batch_loss(   # no host sync: the part's scalars stay on the device
                        logits, mb.targets, None if single else pi_old[pos], adv[pos], mb.seq_ids, counts, ac,
                        temperature=cfg.rollout.temperature, chunk=lc.logits_chunk,
                        ref_logp=ref_logp[pos] if ref_logp is not None else None,
                        mask=(mask_vec[pos], tau) if mask_vec is not None else None,
                        entropy_coef=alpha, generator=self.gen,
                        token_weight=tis[pos] if tis is not None else None,
                        grad_buffer=self._grad_buffer(logits), num_seqs=len(mb.seqs), check=False)
                    eng.engine.backward(loss * scale, scale_wrt_gas=False)
                    if single:  # on-policy: this forward's log-probs and entropies are pi_old's
                        old_logp[pos] = part.pop("tokens/logp")
                        old_ent[pos] = part["tokens/entropy"]
                    parts.append(part)
                lrs.append(float(eng.engine.get_lr()[0]))
                eng.engine.step()
                norm = eng.engine.get_global_grad_norm()
                grad_norms.append(float(norm) if norm is not None else math.nan)
                n_updates += 1
                self.updates += 1

        valid = ~torch.isnan(old_ent)
        mismatch = (old_logp - sampler_logp).abs()
        n_local = float(valid.sum())
        h_local = float(-pi_old[valid].sum()) if ac.entropy_estimator == "sampled" else float(old_ent[valid].sum())
        mm_sum, h_sum, n_all, dropped_all = self.reduce([float(mismatch[valid].sum()), h_local, n_local, dropped])
        mm_max = self.reduce([float(mismatch[valid].max()) if n_local else 0.0], "max")[0]
        # Cui et al. Eq. 5 and the per-group sequence covariance (Sec. 3.3), under pi_old, over all ranks
        seq_parts = (0.0, 0.0, 0.0, 0.0)
        if seqs and n_local == total:
            seq_parts = group_sequence_stats(old_ent, old_logp, torch.tensor([s.resp_len for s in seqs]),
                                             torch.tensor([s.advantage for s in seqs], dtype=torch.float64),
                                             torch.tensor([s.group for s in seqs]))
        eq5_sum, n_prompts, gcov_sum, n_gcov = self.reduce(list(seq_parts))
        if self.entropy_control is not None and n_all:
            # e_k over all ranks' tokens of the step, under the pre-update policy (docs/algorithms.md 3.2)
            self.entropy_control = update_control(self.entropy_control, h_sum / n_all, ac)

        summary = self._global_summary(parts_to_host(parts), n_updates)   # the step's one copy to the host
        stats: StepStats = {"learner/groups": float(len(groups)), "learner/responses": float(len(seqs)),
                            "learner/tokens": float(total),
                            "time/prep_s": t_prep, "time/train_s": time.perf_counter() - t0}
        if self.rank == 0:
            stats.update(summary)
            stats.update({
                "learner/grad_norm": float(np.mean(grad_norms)) if grad_norms else math.nan,
                "learner/lr": lrs[-1] if lrs else math.nan,
                "learner/updates": float(self.updates), "learner/step_updates": float(n_updates),
                "learner/version": float(version), "learner/entropy_coef": float(alpha),
                "learner/logprob_mismatch_mean": mm_sum / n_all if n_all else math.nan,
                "learner/logprob_mismatch_max": mm_max if n_all else math.nan,
                "learner/dropped_invalid": dropped_all,
                "learner/old_logp_pass": 0.0 if single else 1.0,
            })
            if n_prompts:
                stats["entropy/policy"] = eq5_sum / n_prompts
            if n_gcov:
                stats["cov/seq_group_mean"] = gcov_sum / n_gcov
        return stats

    def _global_summary(self, parts: list[dict[str, Any]], n_updates: int) -> StepStats:
        """`stats.summarize` over every rank's micro-batch parts: the scalars travel as JSON bytes, the
        per-token entropies and covariances as float32 all-gathers (no pickle). loss/* become the mean over
        the step's updates of the global mini-batch loss."""
        from learner.distributed import all_gather_1d
        from learner.stats import summarize

        if self.world > 1:
            scalars = [{k: v for k, v in p.items() if not k.startswith("tokens/")} for p in parts]
            blob = torch.frombuffer(bytearray(json.dumps(scalars).encode()), dtype=torch.uint8).to(self.eng.device)
            blobs, lengths = all_gather_1d(blob)
            data, everyone, start = bytes(blobs.cpu().numpy()), [], 0
            for n in lengths:
                everyone += json.loads(data[start:start + n])
                start += n
            tokens = sum(p["count/tokens"] for p in everyone)
            for key in ("tokens/entropy", "tokens/cov"):
                mine = [p[key].float() for p in parts if p.get(key) is not None]
                local = torch.cat(mine) if mine else torch.zeros(0, device=self.eng.device)
                if tokens and everyone:  # merge() concatenates tokens/ tensors: one holder suffices
                    everyone[0][key] = all_gather_1d(local)[0]
            parts = everyone
        out = summarize(parts) if parts else {}
        for k in ("loss", "loss/pg", "loss/kl", "loss/entropy_bonus"):
            if k in out and n_updates:
                out[k] /= n_updates
        return out

    def _grad_buffer(self, logits: torch.Tensor) -> torch.Tensor:
        need = logits.numel()
        if self.grad_buffer is None or self.grad_buffer.numel() < need or self.grad_buffer.dtype != logits.dtype:
            self.grad_buffer = torch.empty(need, dtype=logits.dtype, device=logits.device)
        return self.grad_buffer
