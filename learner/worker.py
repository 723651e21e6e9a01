"""One DeepSpeed ZeRO learner rank (`Trainer`, a plain class) and the ranks as Ray actors (`LearnerGroup`).

One RL step on a rank (`train_step`): read its share of fresh groups from the queue -> recompute the old
log-probs and entropies (no grad; skipped when the step has a single update, see `single_pass`) -> for each
epoch and mini-batch: the forking-token mask at the configured scope, the global normalisers,
forward/backward over packed shared-prompt micro-batches (learner.batching), one optimizer step -> ack.

Collectives. ZeRO-2 reduces gradients inside every backward and ZeRO-3 gathers parameters inside every
forward, so every rank runs the same sequence of passes: a rank with fewer micro-batches in a pass list
runs empty ones (a 2-token forward whose loss is multiplied by zero), and every decision that changes the
sequence is taken from values all ranks share (config, counts summed across ranks).

Exact mini-batch loss. Gradient accumulation is unmanaged (`managed_gradient_accumulation: false`): each
mini-batch is one `engine.step()` whatever its number of micro-batches. Every normaliser is a global count
of the mini-batch across ranks (`losses.BatchCounts`): the token-mean denominator is the number of response
tokens of the mini-batch on all ranks, the selected count is the number of tokens the masks select on all
ranks. Each micro-batch loss is multiplied by `deepspeed_loss_scale(world)` to undo DeepSpeed's mean over
ranks, so the gradient DeepSpeed hands the optimizer is exactly the gradient of the mini-batch loss.

Old log-probs (AlgorithmConfig.old_logprobs): `recompute` (default) runs a no-grad pass under the weights
before the step's first update, or, with one update per step (`single_pass`), takes them from the training
forward itself, where they are the same numbers (about a third of a step's compute saved); `sampler` takes
the sampler's log-probs, so the PPO ratio itself corrects the sampler/learner mismatch. With `recompute`
and `tis_cap`, each token's policy term is weighted by min(pi_old / pi_sampler, tis_cap). The mismatch
|log pi_old - log pi_sampler| is reported either way (learner/logprob_mismatch_mean, _max). Dropout is off
in every pass (`disable_dropout`).

Forking-token scope (AlgorithmConfig.entropy_scope): `micro` is computed inside `compute_loss`; `mini`
(this rank's mini-batch) and `global` (all ranks' mini-batch, `distributed.global_forking_mask`) need the
mini-batch's entropies before its first backward: the first update of a step reuses the recompute pass
(the weights are still the old policy's), later mini-batches run one extra no-grad pass under the current
weights (the 80/20 code also takes entropies from the policy being trained).

Statistics. Rank 0 returns the step's learner statistics over ALL ranks (`stats.summarize` of every rank's
micro-batch parts, gathered without pickle), with loss/* the mean over the step's updates of the global
mini-batch loss; every rank returns its own learner/groups, learner/responses, learner/tokens, queue/*
and time/* (the driver sums and maxes those).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from cluster.config import Config
from cluster.types import ScoredGroup, StepStats
from learner.batching import (MicroBatch, Seq, check_group, collate, flat_positions, plan_micro_batches,
                              sequences, split_groups, token_offsets)

log = logging.getLogger("forkrl.learner")

CKPT_TAG = "ds"   # DeepSpeed's tag directory inside a checkpoint directory


class Policy(torch.nn.Module):
    """Causal LM returning logits only at the gathered (response-predicting) positions: [N, V]."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                gather: torch.Tensor):
        """attention_mask [B, 1, L, L] bool and position_ids [B, L]: a shared-prompt layout (learner.batching)."""
        h = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False)[0]
        h = h.reshape(-1, h.shape[-1]).index_select(0, gather)
        return self.lm.get_output_embeddings()(h)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in every pass (verl and OpenRLHF do the same): the old log-probs, the ratio's numerator
    and the reference must be one deterministic function of the weights."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):  # HF attention modules
            m.attention_dropout = 0.0


def ds_config(cfg: Config, world: int) -> dict[str, Any]:
    """The DeepSpeed config: one caller-owned accumulation boundary per `engine.step()`."""
    lc = cfg.learner
    zero: dict[str, Any] = {"stage": lc.zero_stage}
    if lc.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=lc.stage3_param_persistence_threshold,
                    stage3_gather_16bit_weights_on_model_save=False)
    if lc.zero_stage in (1, 2):
        zero.update(overlap_comm=False, contiguous_gradients=True)
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "managed_gradient_accumulation": False,
        "gradient_clipping": lc.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(cfg: Config, total_updates: int):
    """Multiplier of learner.lr at optimizer update `step` (0-based): linear warm-up over warmup_steps
    updates (the first update uses lr/warmup_steps), then constant, cosine to 0 or linear to 0 at
    `total_updates`."""
    lc = cfg.learner

    def f(step: int) -> float:
        if step < lc.warmup_steps:
            return (step + 1) / lc.warmup_steps
        if lc.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - lc.warmup_steps) / max(1, total_updates - lc.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress)) if lc.schedule == "cosine" else 1.0 - progress
    return f


class Trainer:
    """A learner rank. Create all ranks of a group concurrently. Collectives, which every rank must call
    at once: setup (joins the process group), train_step, train_on, named_weights/full_weights (ZeRO-3
    gathers), sync_weights, save, load."""

    def __init__(self, cfg: Config, model_path: str, rank: int = 0, world: int = 1,
                 master_addr: str = "127.0.0.1", master_port: int = 29500):
        self.cfg, self.model_path = cfg, model_path
        self.rank, self.world = rank, world
        self.master = (master_addr, master_port)
        self.version = 0      # weights version: RL steps trained (matches the driver's count)
        self.updates = 0      # optimizer updates
        self.consumer = None
        self.sender = None
        self.last_trained: list[str] = []   # group ids of the last step's optimizer updates
        self.grad_buffer: torch.Tensor | None = None
        self.entropy_control = None

    # ------------------------------------------------------------------ setup
    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def free_port(self, host: str) -> int:
        from cluster.transport.weightsync import free_port

        return free_port(host)

    def set_master(self, host: str, port: int) -> None:
        self.master = (host, port)

    def setup(self) -> dict[str, Any]:
        """Join the process group, load the model (partitioned at load time under ZeRO-3), build the engine."""
        import deepspeed
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        from cluster.runtime import setup_env
        from learner.entropy_control import initial_control

        setup_env()
        lc = self.cfg.learner
        torch.set_num_threads(lc.threads)
        os.environ.update(MASTER_ADDR=self.master[0], MASTER_PORT=str(self.master[1]), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world), LOCAL_RANK="0", LOCAL_SIZE="1")
        gpu = torch.cuda.is_available() and self.cfg.cluster.learner_gpus > 0
        # a rank whose queue read returned waits in train_step's agreement for the slowest read, which
        # gives up after queue.read_timeout_s: the collectives must outwait it
        deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo", auto_mpi_discovery=False,
                                   verbose=False, timeout=timedelta(seconds=self.cfg.queue.read_timeout_s + 120))
        # LOCAL_SIZE=1 keeps DeepSpeed's CPU shared-memory all-reduce (an inference path) off when
        # world > 1; a 1-rank group still maps a 69 MB /dev/shm segment that no other process opens and
        # nobody removes: unlink it now (the mapping stays valid until exit).
        if self.world == 1:
            shm = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{self.master[0]}_{self.master[1]}_0")
            shm.unlink(missing_ok=True)
        seed = self.cfg.run.seed
        random.seed(seed + self.rank)
        np.random.seed(seed + self.rank)
        torch.manual_seed(seed)
        self.gen = torch.Generator().manual_seed(seed * 7919 + 1 + self.rank)  # per rank: Clip-Cov, micro/mini random
        self.mask_gen = torch.Generator().manual_seed(seed * 7919)             # same on all ranks: global random
        dtype = torch.bfloat16 if self.cfg.model.dtype == "bfloat16" else torch.float32
        dsc = ds_config(self.cfg, self.world)
        # ZeRO-3: HfDeepSpeedConfig makes from_pretrained partition the weights while loading (PLATFORM.md);
        # it must be gone before any other from_pretrained (the reference), which would become a collective.
        hf_ds = HfDeepSpeedConfig(dsc) if lc.zero_stage == 3 else None
        try:
            lm = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        finally:
            del hf_ds
            unset_hf_deepspeed_config()
        disable_dropout(lm)
        lm.train()  # from_pretrained returns eval mode, in which HF skips gradient checkpointing
        if lc.gradient_checkpointing:
            lm.gradient_checkpointing_enable()
        self.pad_id = int(lm.config.pad_token_id or 0)
        self.vocab_size = int(lm.config.vocab_size)
        opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=lc.lr, betas=lc.betas,
                                weight_decay=lc.weight_decay)
        total = self.cfg.run.steps * lc.mini_batches * lc.epochs
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.cfg, total))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=Policy(lm), optimizer=opt, lr_scheduler=sched, config=dsc)
        self.device = self.engine.device
        self.ref = None
        if self.cfg.algorithm.kl_coef > 0:
            ref = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
            self.ref = Policy(ref).to(self.device).eval()
            self.ref.requires_grad_(False)
        self.entropy_control = initial_control(self.cfg.algorithm) if self.cfg.algorithm.adaptive_entropy else None
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in lm.parameters())
        return {"rank": self.rank, "params": n_params, "device": str(self.device)}

    def attach_queue(self, address: dict[str, Any], name: str | None = None) -> None:
        """Become consumer `rank<r>` of the run's queue (a restarted rank takes its pending groups back)."""
        from cluster.transport.queue import Consumer, QueueAddress

        if self.consumer is not None:
            self.consumer.close()
        self.consumer = Consumer(QueueAddress(**address), name or f"rank{self.rank}", self.cfg.queue)

    # ------------------------------------------------------------------ collectives
    def _reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Element-wise sum / max / min over ranks, in float64 (counts stay exact)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                   "min": dist.ReduceOp.MIN}[op])
        return t.tolist()

    def _all_ok(self, ok: bool) -> bool:
        return self._reduce([1.0 if ok else 0.0], "min")[0] > 0

    # ------------------------------------------------------------------ passes
    def _micro_batches(self, seqs: list[Seq], idx: list[int], offsets: list[int]) -> list[MicroBatch | None]:
        """Packed micro-batches of seqs[idx], padded with None (an empty pass) to the ranks' largest count."""
        plans = plan_micro_batches(seqs, idx, self.cfg.learner.micro_batch_tokens)
        mbs: list[MicroBatch | None] = [collate(seqs, p, offsets, self.pad_id).to(self.device) for p in plans]
        return mbs + [None] * (int(self._reduce([len(mbs)], "max")[0]) - len(mbs))

    def _logits(self, mb: MicroBatch | None) -> torch.Tensor:
        if mb is None:  # the empty pass: every rank must run the same forwards (ZeRO-3 gathers inside)
            ids = torch.full((1, 2), self.pad_id, dtype=torch.long, device=self.device)
            mask = torch.ones(2, 2, dtype=torch.bool, device=self.device).tril()[None, None]
            return self.engine(ids, mask, torch.arange(2, device=self.device)[None],
                               torch.zeros(1, dtype=torch.long, device=self.device))
        return self.engine(mb.input_ids, mb.attention_mask, mb.position_ids, mb.gather)

    @torch.no_grad()
    def _token_pass(self, mbs: list[MicroBatch | None], total: int,
                    with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """No-grad log-probs and entropies of the micro-batches' response tokens under the current weights,
        at their positions in [total] float32 vectors (NaN elsewhere)."""
        from learner.tokenstats import token_stats

        logp = torch.full((total,), math.nan, device=self.device)
        ent = torch.full((total,), math.nan, device=self.device)
        for mb in mbs:
            logits = self._logits(mb)
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

        out = torch.full((total,), math.nan, device=self.device)
        for p in plan_micro_batches(seqs, list(range(len(seqs))), self.cfg.learner.micro_batch_tokens):
            mb = collate(seqs, p, offsets, self.pad_id).to(self.device)
            logits = self.ref(mb.input_ids, mb.attention_mask, mb.position_ids, mb.gather)
            out[mb.positions] = token_stats(logits, mb.targets, self.cfg.rollout.temperature,
                                            chunk=self.cfg.learner.logits_chunk, with_entropy=False)[0]
        return out

    def _scope_mask(self, seqs: list[Seq], idx: list[int], offsets: list[int], mbs: list[MicroBatch | None],
                    total: int, entropy: torch.Tensor | None) -> tuple[torch.Tensor | None, float]:
        """The mini-batch's forking mask [total] bool and tau for scopes mini/global (None for micro or
        when no mask is in use). `entropy` [total]: reusable entropies, or None to recompute them."""
        from learner.distributed import global_forking_mask
        from learner.masks import forking_mask

        ac = self.cfg.algorithm
        if not _mask_active(ac) or ac.entropy_scope == "micro":
            return None, math.nan
        if entropy is None:
            entropy = self._token_pass(mbs, total, with_entropy=True)[1]
        pos = flat_positions(seqs, idx, offsets).to(self.device)
        local = entropy[pos]
        if ac.entropy_scope == "global":
            sel, tau = global_forking_mask(local, ac.top_entropy_ratio, ac.mask_variant, generator=self.mask_gen)
        else:
            sel, tau = forking_mask(local, ac.top_entropy_ratio, ac.mask_variant, generator=self.gen)
        mask = torch.zeros(total, dtype=torch.bool, device=self.device)
        mask[pos] = sel
        return mask, tau

    # ------------------------------------------------------------------ the step
    def train_step(self, n_groups: int, version: int, max_staleness: int = 0,
                   timeout_s: float | None = None) -> StepStats:
        """Read this rank's n_groups (0 is allowed) from the queue, train on them with the other ranks, and
        ack them only after the step's optimizer updates succeeded. If any rank's read fails, every rank
        raises (no rank is left waiting in a collective); read groups stay pending and come back to the
        same consumer name after a restart."""
        from cluster.transport.queue import Batch

        t0 = time.perf_counter()
        batch, error = Batch([], []), None
        try:
            if n_groups > 0:
                batch = self.consumer.read(n_groups, version, max_staleness, timeout_s=timeout_s)
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = e
        if not self._all_ok(error is None):
            if error is not None:
                raise error
            raise RuntimeError(f"learner rank {self.rank}: another rank's queue read failed; step abandoned")
        t_read = time.perf_counter() - t0
        stats = self.train_on(batch.groups)
        # read by this update (even if the ack below fails); ones check_group rejected count as dropped_invalid
        self.last_trained = [g.group_id for g in batch.groups]
        if batch.entry_ids:
            self.consumer.ack(batch.entry_ids)
        stats["time/queue_read_s"] = t_read
        stats.update({k: float(v) for k, v in self.consumer.stats().items()})
        for g in batch.groups:  # staleness of the trained groups, in weight versions
            key = f"queue/staleness/{max(version - g.version, 0)}"
            stats[key] = stats.get(key, 0.0) + 1.0
        return stats

    def queue_state(self) -> dict:
        return self.consumer.state_dict()

    def status(self) -> dict[str, Any]:
        """Health check (no collective): process id, weights version, and the group ids of the last step's
        update (the driver's ledger, and whether a step whose ack failed was trained)."""
        return {"rank": self.rank, "pid": os.getpid(), "version": self.version, "trained": self.last_trained}

    def load_queue_state(self, state: dict) -> None:
        self.consumer.load_state_dict(state)

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()
            self.consumer = None
        self.close_sender()

    def _valid_groups(self, groups: list[ScoredGroup]) -> tuple[list[ScoredGroup], int]:
        ok = []
        for g in groups:
            problem = check_group(g, self.vocab_size)
            if problem is None:
                ok.append(g)
            else:  # never crash a rank (its peers would wait in a collective); acked with the rest
                log.warning("learner rank %d: dropping group %r: %s", self.rank, g.group_id, problem)
        return ok, len(groups) - len(ok)

    def train_on(self, groups: list[ScoredGroup]) -> StepStats:
        """One RL step on this rank's share of groups (may be empty), with the other ranks."""
        from learner.entropy_control import update_control
        from learner.losses import BatchCounts, compute_loss, deepspeed_loss_scale
        from learner.masks import selected_count

        t0 = time.perf_counter()
        cfg, ac, lc = self.cfg, self.cfg.algorithm, self.cfg.learner
        groups, dropped = self._valid_groups(groups)
        seqs = sequences(groups)
        offsets = token_offsets(seqs)
        total = sum(s.resp_len for s in seqs)
        dev = self.device
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
            old_logp, old_ent = self._token_pass(self._micro_batches(seqs, list(range(len(seqs))), offsets), total,
                                                 with_entropy=True)
        tis = None
        if ac.old_logprobs == "sampler":
            pi_old = sampler_logp.clone()
        else:
            pi_old = old_logp
            if ac.tis_cap is not None:
                tis = torch.exp(torch.clamp(old_logp - sampler_logp, max=math.log(ac.tis_cap)))
        ref_logp = self._ref_logp(seqs, offsets, total) if self.ref is not None else None
        alpha = self.entropy_control.alpha if self.entropy_control else ac.entropy_coef
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
                mask_vec, tau = self._scope_mask(seqs, idx, offsets, mbs, total, old_ent if fresh else None)
                real = [mb for mb in mbs if mb is not None]
                n_tok = sum(mb.num_tokens for mb in real)
                if mask_vec is not None:
                    n_sel = int(mask_vec.sum())
                elif _mask_active(ac):  # micro scope: compute_loss selects per micro-batch
                    n_sel = sum(selected_count(mb.num_tokens, ac.top_entropy_ratio, ac.mask_variant) for mb in real)
                else:
                    n_sel = n_tok
                g_tok, g_sel, g_resp = self._reduce([n_tok, n_sel, len(idx)])
                if g_tok == 0:
                    continue  # no rank has a token in this mini-batch: no update (identical on all ranks)
                counts = BatchCounts(int(g_tok), int(g_sel), int(g_resp), cfg.rollout.max_new_tokens)
                for mb in mbs:
                    logits = self._logits(mb)
                    if mb is None:
                        self.engine.backward(logits.float().sum() * 0.0, scale_wrt_gas=False)
                        continue
                    pos = mb.positions
                    loss, part = compute_loss(
                        logits, mb.targets, None if single else pi_old[pos], adv[pos], mb.seq_ids, counts, ac,
                        temperature=cfg.rollout.temperature, chunk=lc.logits_chunk,
                        ref_logp=ref_logp[pos] if ref_logp is not None else None,
                        mask=(mask_vec[pos], tau) if mask_vec is not None else None,
                        entropy_coef=alpha, generator=self.gen,
                        token_weight=tis[pos] if tis is not None else None,
                        grad_buffer=self._grad_buffer(logits))
                    self.engine.backward(loss * scale, scale_wrt_gas=False)
                    if single:  # on-policy: this forward's log-probs and entropies are pi_old's
                        old_logp[pos] = part.pop("tokens/logp")
                        old_ent[pos] = part["tokens/entropy"]
                    parts.append(part)
                lrs.append(float(self.engine.get_lr()[0]))
                self.engine.step()
                norm = self.engine.get_global_grad_norm()
                grad_norms.append(float(norm) if norm is not None else math.nan)
                n_updates += 1
                self.updates += 1
        self.version += 1

        valid = ~torch.isnan(old_ent)
        mismatch = (old_logp - sampler_logp).abs()
        n_local = float(valid.sum())
        h_local = float(-pi_old[valid].sum()) if ac.entropy_estimator == "sampled" else float(old_ent[valid].sum())
        mm_sum, h_sum, n_all, dropped_all = self._reduce([float(mismatch[valid].sum()), h_local, n_local, dropped])
        mm_max = self._reduce([float(mismatch[valid].max()) if n_local else 0.0], "max")[0]
        if self.entropy_control is not None and n_all:
            # e_k over all ranks' tokens of the step, under the pre-update policy (ALGORITHMS.md 3.2)
            self.entropy_control = update_control(self.entropy_control, h_sum / n_all, ac)

        summary = self._global_summary(parts, n_updates)
        stats: StepStats = {"learner/groups": float(len(groups)), "learner/responses": float(len(seqs)),
                            "learner/tokens": float(total),
                            "time/prep_s": t_prep, "time/train_s": time.perf_counter() - t0}
        if self.rank == 0:
            stats.update(summary)
            stats.update({
                "learner/grad_norm": float(np.mean(grad_norms)) if grad_norms else math.nan,
                "learner/lr": lrs[-1] if lrs else math.nan,
                "learner/updates": float(self.updates), "learner/step_updates": float(n_updates),
                "learner/version": float(self.version), "learner/entropy_coef": float(alpha),
                "learner/logprob_mismatch_mean": mm_sum / n_all if n_all else math.nan,
                "learner/logprob_mismatch_max": mm_max if n_all else math.nan,
                "learner/dropped_invalid": dropped_all,
                "learner/old_logp_pass": 0.0 if single else 1.0,
            })
        return stats

    def _global_summary(self, parts: list[dict[str, Any]], n_updates: int) -> StepStats:
        """`stats.summarize` over every rank's micro-batch parts: the scalars travel as JSON bytes, the
        per-token entropies and covariances as float32 all-gathers (no pickle). loss/* become the mean over
        the step's updates of the global mini-batch loss."""
        from learner.distributed import all_gather_1d
        from learner.stats import summarize

        if self.world > 1:
            scalars = [{k: v for k, v in p.items() if not k.startswith("tokens/")} for p in parts]
            blob = torch.frombuffer(bytearray(json.dumps(scalars).encode()), dtype=torch.uint8).to(self.device)
            blobs, lengths = all_gather_1d(blob)
            data, everyone, start = bytes(blobs.cpu().numpy()), [], 0
            for n in lengths:
                everyone += json.loads(data[start:start + n])
                start += n
            tokens = sum(p["count/tokens"] for p in everyone)
            for key in ("tokens/entropy", "tokens/cov"):
                mine = [p[key].float() for p in parts if p.get(key) is not None]
                local = torch.cat(mine) if mine else torch.zeros(0, device=self.device)
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

    # ------------------------------------------------------------------ weights
    def _module_params(self) -> list[tuple[str, list[tuple[str, torch.nn.Parameter]]]]:
        """[(module name, [(HF name, parameter)])], each parameter once: a tied weight under its first name
        (the tied lm_head is not listed; vLLM ties it back)."""
        out, seen = [], set()
        for mod_name, mod in self.engine.module.lm.named_modules():
            params = [(f"{mod_name}.{n}" if mod_name else n, p) for n, p in mod.named_parameters(recurse=False)
                      if id(p) not in seen]
            seen.update(id(p) for _, p in params)
            if params:
                out.append((mod_name, params))
        return out

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full weight) in a fixed order; under ZeRO-3 each module's weights are gathered while its
        items are consumed and released after, so EVERY rank must iterate to the end (the gathers are
        collectives). The tensors are live views: copy them before the next item."""
        import deepspeed

        for _, params in self._module_params():
            if self.cfg.learner.zero_stage == 3:
                with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                    yield from ((n, p.data) for n, p in params)
            else:
                yield from ((n, p.data) for n, p in params)

    def weight_specs(self):
        """The `cluster.transport.weightsync.TensorSpec` of every item of `named_weights`, in order, ungathered."""
        from cluster.transport.weightsync import TensorSpec

        return [TensorSpec(n, tuple(getattr(p, "ds_shape", p.shape)), str(p.dtype).removeprefix("torch."))
                for _, params in self._module_params() for n, p in params]

    def full_weights(self) -> dict[str, torch.Tensor]:
        """Copies of all full weights by HF name (collective under ZeRO-3; for checks and exports)."""
        return {n: t.detach().clone().cpu() for n, t in self.named_weights()}

    def init_sender(self, host: str, port: int, world_size: int) -> None:
        """Rank 0 joins the weight-sync group as its rank 0 (blocks until the generators joined)."""
        from cluster.transport.weightsync import WeightSender

        sc = self.cfg.sync
        self.close_sender()   # re-initialising after a failed sync or a replaced generator
        self.sender = WeightSender(host, port, world_size, timeout_s=sc.timeout_s, bucket_mb=sc.bucket_mb,
                                   backend=sc.backend)

    def close_sender(self) -> None:
        if self.sender is not None:
            self.sender.close()
            self.sender = None

    def sync_weights(self) -> dict[str, float]:
        """Publish the current weights as `self.version`: rank 0 broadcasts them to the generators while
        every rank takes part in the ZeRO-3 gathers (call it on all ranks at once). If rank 0's send
        fails it still finishes the gathers, so the other ranks return, then raises."""
        t0 = time.perf_counter()
        if not self._all_ok(self.rank != 0 or self.sender is not None):
            raise RuntimeError("sync_weights before init_sender on learner rank 0")
        weights = self.named_weights()
        if self.rank != 0:
            for _ in weights:
                pass
            return {"total_s": time.perf_counter() - t0}
        try:
            out = self.sender.send(self.version, weights, specs=self.weight_specs())
        except BaseException:
            for _ in weights:
                pass
            raise
        return {**out, "total_s": time.perf_counter() - t0}

    # ------------------------------------------------------------------ checkpoints
    def save(self, ckpt_dir: str) -> None:
        """Collective: the DeepSpeed checkpoint (weights, optimizer, scheduler; each rank its shards) in
        ckpt_dir/ds, plus this rank's RNG states and entropy controller in ckpt_dir/rank<r>.json. The
        driver writes into a temporary directory and renames it when every rank has returned."""
        self.engine.save_checkpoint(ckpt_dir, tag=CKPT_TAG, client_state={"version": self.version,
                                                                           "updates": self.updates})
        np_state = np.random.get_state()
        py_state = random.getstate()
        state = {
            "rank": self.rank, "world": self.world,
            "torch": torch.get_rng_state().tolist(), "gen": self.gen.get_state().tolist(),
            "mask_gen": self.mask_gen.get_state().tolist(),
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py_state[0], list(py_state[1]), py_state[2]],
            "entropy_control": [self.entropy_control.coef, self.entropy_control.enabled]
            if self.entropy_control else None,
        }
        Path(ckpt_dir, f"rank{self.rank}.json").write_text(json.dumps(state))

    def load(self, ckpt_dir: str) -> dict[str, Any]:
        """Collective: restore everything `save` wrote (same world size and ZeRO stage)."""
        from learner.entropy_control import EntropyControl

        path = Path(ckpt_dir, f"rank{self.rank}.json")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no learner state for rank {self.rank} (saved with another world size?)")
        state = json.loads(path.read_text())
        if state["world"] != self.world:
            raise ValueError(f"{ckpt_dir} was saved by {state['world']} learner ranks, this group has {self.world}")
        loaded, client = self.engine.load_checkpoint(ckpt_dir, tag=CKPT_TAG, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
        if loaded is None:
            raise FileNotFoundError(f"{ckpt_dir}/{CKPT_TAG}: no DeepSpeed checkpoint")
        self.version, self.updates = int(client["version"]), int(client["updates"])
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        self.gen.set_state(torch.tensor(state["gen"], dtype=torch.uint8))
        self.mask_gen.set_state(torch.tensor(state["mask_gen"], dtype=torch.uint8))
        n = state["numpy"]
        np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
        p = state["python"]
        random.setstate((p[0], tuple(p[1]), p[2]))
        if self.entropy_control is not None and state["entropy_control"] is not None:
            self.entropy_control = EntropyControl(float(state["entropy_control"][0]),
                                                  bool(state["entropy_control"][1]))
        return {"version": self.version, "updates": self.updates}


def single_pass(cfg: Config) -> bool:
    """Whether a step trains with one forward per micro-batch, no separate no-grad pass for pi_old: one
    update per step (epochs = mini_batches = 1, so pi_old IS the weights being trained and the ratio is 1
    in value), old log-probs recomputed (not the sampler's), no TIS weight (it needs pi_old before the
    forward) and no mini/global forking mask (it needs the whole mini-batch's entropies before the first
    backward). TRL skips the same pass when num_iterations = 1; verl recomputes it always."""
    ac, lc = cfg.algorithm, cfg.learner
    return (lc.epochs == 1 and lc.mini_batches == 1 and ac.old_logprobs == "recompute" and ac.tis_cap is None
            and (not _mask_active(ac) or ac.entropy_scope == "micro"))


def _mask_active(ac) -> bool:
    """Whether a forking mask selects anything less than all tokens (rho < 1, or the bottom variant)."""
    return ac.top_entropy_ratio < 1 or ac.mask_variant == "bottom"


class LearnerGroup:
    """The learner ranks as Ray actors, one per rank, placed by the caller's scheduling options. Ray must
    be initialised by the caller."""

    def __init__(self, cfg: Config, model_path: str, actor_options: list[dict[str, Any]] | None = None,
                 loopback: bool = True):
        """loopback: all ranks on this machine, so the process group binds 127.0.0.1 (local runs)."""
        import ray

        from cluster.runtime import runtime_env_vars

        n = cfg.learner.num_ranks
        env = {**runtime_env_vars(), "OMP_NUM_THREADS": str(cfg.learner.threads)}
        opts = actor_options or [{} for _ in range(n)]
        cls = ray.remote(Trainer)
        self.ranks = [cls.options(num_cpus=cfg.cluster.learner_cpus, num_gpus=cfg.cluster.learner_gpus,
                                  runtime_env={"env_vars": env}, **opts[r]).remote(cfg, model_path, r, n, "", 0)
                      for r in range(n)]
        try:
            host = "127.0.0.1" if loopback else ray.get(self.ranks[0].node_ip.remote())
            port = ray.get(self.ranks[0].free_port.remote(host))
            ray.get([a.set_master.remote(host, port) for a in self.ranks])
            self.master = (host, port)
            self.info = ray.get([a.setup.remote() for a in self.ranks])
        except BaseException:
            self.kill()  # a rank that failed leaves the others waiting in init_distributed
            raise

    def call(self, method: str, *args, **kwargs) -> list:
        """The same call on every rank at once; returns their results in rank order."""
        import ray

        return ray.get([getattr(a, method).remote(*args, **kwargs) for a in self.ranks])

    def call_each(self, method: str, args: list[tuple]) -> list:
        """Rank r gets args[r]."""
        import ray

        if len(args) != len(self.ranks):
            raise ValueError(f"call_each({method!r}): {len(args)} argument tuples for {len(self.ranks)} ranks")
        return ray.get([getattr(a, method).remote(*x) for a, x in zip(self.ranks, args)])

    def kill(self) -> None:
        import ray

        for a in self.ranks:
            ray.kill(a)
        self.ranks = []
