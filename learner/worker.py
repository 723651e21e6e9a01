"""The Ray-facing learner: one rank (`Trainer`, a plain class made a Ray actor by `LearnerGroup`) and the
group of ranks. A rank composes its DeepSpeed engine (learner.engine), the training step (learner.step) and
weight publishing (learner.weights); this module adds the queue (a rank reads its groups and acks them
after the update), the weights version, the checkpoint's learner part and the health check.

Collectives, which every rank must call at once: setup (joins the process group), train_step, train_on,
named_weights/full_weights (ZeRO-3 gathers), sync_weights, save, load.
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterator

import ray
import torch

from cluster.config import Config
from cluster.types import ScoredGroup, StepStats
from learner.engine import (Engine, build_engine, build_locks, init_process_group, load_checkpoint, save_checkpoint,
                            seed_everything)
from learner.step import TrainStep
from learner.weights import Publisher, named_weights, weight_specs


class LearnerSetupTimeout(RuntimeError):
    """The learner ranks did not finish set-up within learner.setup_timeout_s; the message names what each
    unfinished rank was doing (and any JIT build lock it waits on)."""


class PeerFailed(RuntimeError):
    """This rank's part of a collective call was fine but another rank's failed; that rank's error is the
    cause (`LearnerGroup` raises it instead of this one)."""


class Trainer:
    """A learner rank. Create all ranks of a group concurrently."""

    def __init__(self, cfg: Config, model_path: str, rank: int = 0, world: int = 1,
                 master_addr: str = "127.0.0.1", master_port: int = 29500):
        self.cfg, self.model_path = cfg, model_path
        self.rank, self.world = rank, world
        self.master = (master_addr, master_port)
        self.version = 0      # weights version: RL steps trained (matches the driver's count)
        self.consumer = None
        self.publisher = Publisher(cfg.sync)
        self.last_trained: list[str] = []   # group ids of the last step's optimizer updates
        self.eng: Engine | None = None
        self.step: TrainStep | None = None
        self._phase = ("created", time.monotonic())   # what setup() is doing, for progress()

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
        from cluster.runtime import setup_env, startup_gc
        from learner.entropy_control import initial_control

        setup_env()
        torch.set_num_threads(self.cfg.learner.threads)
        with startup_gc():
            self._at(f"joining the process group at {self.master[0]}:{self.master[1]} with {self.world} ranks")
            init_process_group(self.cfg, self.rank, self.world, self.master)
            gen, mask_gen = seed_everything(self.cfg.run.seed, self.rank)
            self._at(f"loading {self.model_path} and building the DeepSpeed engine")
            self.eng = build_engine(self.cfg, self.model_path, self.world)
            control = initial_control(self.cfg.algorithm) if self.cfg.algorithm.adaptive_entropy else None
            self.step = TrainStep(self.cfg, self.eng, self.rank, self.world, gen, mask_gen, control)
        self._at("set up")
        return {"rank": self.rank, "params": self.eng.params, "device": str(self.eng.device)}

    def _at(self, phase: str) -> None:
        self._phase = (phase, time.monotonic())

    @ray.method(concurrency_group="probe")
    def progress(self) -> str:
        """What set-up is doing and for how long, with any JIT build lock present and its holders; answered
        while setup() runs (its own concurrency group)."""
        phase, since = self._phase
        out = f"rank {self.rank} (pid {os.getpid()}): {phase}, for {time.monotonic() - since:.0f} s"
        for path, holders in build_locks():
            out += (f"; build lock {path} held by pid {', '.join(map(str, holders))}" if holders else
                    f"; build lock {path} held by no process")
        return out

    def attach_queue(self, address: dict[str, Any], name: str | None = None) -> None:
        """Become consumer `rank<r>` of the run's queue (a restarted rank takes its pending groups back)."""
        from cluster.transport.queue import Consumer, QueueAddress

        if self.consumer is not None:
            self.consumer.close()
        self.consumer = Consumer(QueueAddress(**address), name or f"rank{self.rank}", self.cfg.queue)

    # ------------------------------------------------------------------ the step
    def train_step(self, n_groups: int, version: int, max_staleness: int = 0,
                   timeout_s: float | None = None) -> StepStats:
        """Read this rank's n_groups (0 is allowed) from the queue, train on them with the other ranks, and
        ack them only after the step's optimizer updates succeeded. If any rank's read fails, every rank
        raises (no rank is left waiting in a collective): the failed one its queue error, the others
        PeerFailed, after giving their groups back to their consumer (the next read returns them first);
        read groups stay pending and come back to the same consumer name after a restart. Returns the
        step's statistics with this rank's queue/*."""
        from cluster.transport.queue import Batch

        t0 = time.perf_counter()
        batch, error = Batch([], []), None
        try:
            if n_groups > 0:
                batch = self.consumer.read(n_groups, version, max_staleness, timeout_s=timeout_s)
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = e
        if not self.step.all_ok(error is None):
            if error is not None:
                raise error
            self.consumer.release(batch)
            raise PeerFailed(f"learner rank {self.rank}: another rank's queue read failed; step abandoned, "
                             f"its {len(batch.groups)} groups kept for the retry")
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

    def train_on(self, groups: list[ScoredGroup]) -> StepStats:
        """One RL step on this rank's share of groups (may be empty), with the other ranks."""
        stats = self.step.run(groups, self.version + 1)
        self.version += 1
        return stats

    def queue_state(self) -> dict:
        return self.consumer.state_dict()

    def load_queue_state(self, state: dict) -> None:
        self.consumer.load_state_dict(state)

    def status(self) -> dict[str, Any]:
        """Health check (no collective): process id, weights version, and the group ids of the last step's
        update (the driver's ledger, and whether a step whose ack failed was trained)."""
        return {"rank": self.rank, "pid": os.getpid(), "version": self.version, "trained": self.last_trained}

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()
            self.consumer = None
        self.publisher.close()

    # ------------------------------------------------------------------ weights
    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        return named_weights(self.eng.lm, self.cfg.learner.zero_stage == 3)

    def weight_specs(self):
        return weight_specs(self.eng.lm)

    def full_weights(self) -> dict[str, torch.Tensor]:
        """Copies of all full weights by HF name (collective under ZeRO-3; for checks and exports)."""
        return {n: t.detach().clone().cpu() for n, t in self.named_weights()}

    def token_logprobs(self, groups: list[ScoredGroup]) -> list[list[float]]:
        """The learner's log-probs (at rollout.temperature, no grad) of every non-empty response of `groups`
        under the current weights, in group order: the pass that gives a step its pi_old (every rank calls
        it, each with its own groups; for checks: `forkrl export`'s test)."""
        from learner.batching import sequences, token_offsets

        seqs = sequences(groups)
        offsets = token_offsets(seqs)
        mbs = self.step._micro_batches(seqs, list(range(len(seqs))), offsets, no_grad=True)
        logp, _ = self.step._token_pass(mbs, sum(s.resp_len for s in seqs), with_entropy=False)
        return [logp[o:o + s.resp_len].cpu().tolist() for s, o in zip(seqs, offsets)]

    def init_sender(self, host: str, port: int, world_size: int) -> None:
        """Rank 0 joins the weight-sync group as its rank 0 (blocks until the generators joined)."""
        self.publisher.open(host, port, world_size)

    def sync_weights(self) -> dict[str, float]:
        """Publish the current weights as `self.version` (every rank at once; learner.weights.Publisher)."""
        return self.publisher.publish(self.version, self.eng.lm, self.cfg.learner.zero_stage == 3, self.rank,
                                      self.step.all_ok)

    # ------------------------------------------------------------------ checkpoints
    def save(self, ckpt_dir: str) -> None:
        """Collective: the engine's checkpoint in ckpt_dir/ds, this rank's RNG states and entropy controller
        in ckpt_dir/rank<r>.json. The driver writes into a temporary directory and renames it when every
        rank has returned."""
        ec = self.step.entropy_control
        save_checkpoint(self.eng, ckpt_dir, self.rank, self.world,
                        {"version": self.version, "updates": self.step.updates}, self._generators(),
                        {"entropy_control": [ec.coef, ec.enabled] if ec else None})

    def load(self, ckpt_dir: str) -> dict[str, Any]:
        """Collective: restore everything `save` wrote (same world size and ZeRO stage)."""
        from learner.entropy_control import EntropyControl

        client, state = load_checkpoint(self.eng, ckpt_dir, self.rank, self.world, self._generators())
        self.version, self.step.updates = int(client["version"]), int(client["updates"])
        if self.step.entropy_control is not None and state["entropy_control"] is not None:
            self.step.entropy_control = EntropyControl(float(state["entropy_control"][0]),
                                                       bool(state["entropy_control"][1]))
        return {"version": self.version, "updates": self.step.updates}

    def _generators(self) -> dict[str, torch.Generator]:
        return {"gen": self.step.gen, "mask_gen": self.step.mask_gen}


def rank_env(cfg: Config) -> dict[str, str]:
    """Process environment of a learner rank (on top of what Ray gives a worker). On CPU the step's large
    tensors stay in glibc's heap between steps (cluster.runtime.MALLOC_KEEP); on a GPU they live in CUDA's
    allocator, and the host's memory is given back."""
    from cluster.runtime import MALLOC_KEEP, runtime_env_vars

    env = {**runtime_env_vars(), "OMP_NUM_THREADS": str(cfg.learner.threads)}
    if not cfg.cluster.learner_gpus:
        env["GLIBC_TUNABLES"] = MALLOC_KEEP
    return env


class LearnerGroup:
    """The learner ranks as Ray actors, one per rank, placed by the caller's scheduling options. Ray must
    be initialised by the caller."""

    def __init__(self, cfg: Config, model_path: str, actor_options: list[dict[str, Any]] | None = None,
                 loopback: bool = True):
        """loopback: all ranks on this machine, so the process group binds 127.0.0.1 (local runs)."""
        import ray

        n = cfg.learner.num_ranks
        env = rank_env(cfg)
        opts = actor_options or [{} for _ in range(n)]
        cls = ray.remote(concurrency_groups={"probe": 1})(Trainer)
        self.ranks = [cls.options(num_cpus=cfg.cluster.learner_cpus, num_gpus=cfg.cluster.learner_gpus,
                                  runtime_env={"env_vars": env}, **opts[r]).remote(cfg, model_path, r, n, "", 0)
                      for r in range(n)]
        self.timeout_s = cfg.learner.setup_timeout_s
        end = time.monotonic() + self.timeout_s
        try:
            host = "127.0.0.1" if loopback else self._within(end, [self.ranks[0].node_ip.remote()])[0]
            port = self._within(end, [self.ranks[0].free_port.remote(host)])[0]
            self._within(end, [a.set_master.remote(host, port) for a in self.ranks])
            self.master = (host, port)
            self.info = self._within(end, [a.setup.remote() for a in self.ranks])
        except BaseException:
            self.kill()  # a rank that failed leaves the others waiting in init_distributed
            raise

    def _within(self, end: float, refs: list) -> list:
        """The ranks' results of one set-up call, or LearnerSetupTimeout at monotonic time `end` naming what
        every rank was doing: a call to rank 0 alone (its port) can time out because rank 0 starts slowly
        while another rank can never be placed, and the error names both."""
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, end - time.monotonic()))
        if len(ready) < len(refs):
            probes = [a.progress.remote() for a in self.ranks]
            done, _ = ray.wait(probes, num_returns=len(probes), timeout=10)
            what = [ray.get(p) if p in done else f"rank {r}: no answer (its actor process has not started: "
                    "waiting for CPUs/GPUs, the placement group or its runtime environment)"
                    for r, p in enumerate(probes)]
            raise LearnerSetupTimeout(f"learner set-up did not finish within learner.setup_timeout_s = "
                                      f"{self.timeout_s:g} s: {'; '.join(what)}")
        return _results(refs)

    def call(self, method: str, *args, **kwargs) -> list:
        """The same call on every rank at once; returns their results in rank order."""
        return _results([getattr(a, method).remote(*args, **kwargs) for a in self.ranks])

    def call_each(self, method: str, args: list[tuple]) -> list:
        """Rank r gets args[r]."""
        if len(args) != len(self.ranks):
            raise ValueError(f"call_each({method!r}): {len(args)} argument tuples for {len(self.ranks)} ranks")
        return _results([getattr(a, method).remote(*x) for a, x in zip(self.ranks, args)])

    def kill(self) -> None:
        import ray

        for a in self.ranks:
            ray.kill(a)
        self.ranks = []


def _results(refs: list) -> list:
    """Every rank's result; if some failed, the error of the first rank that failed by itself (a queue
    error on rank 1, a dead rank), not the PeerFailed of the ranks that only followed it."""
    from ray.exceptions import RayError

    out, errors = [], []
    for ref in refs:
        try:
            out.append(ray.get(ref))
        except RayError as e:
            errors.append(e)
    if errors:
        raise next((e for e in errors if not isinstance(e, PeerFailed)), errors[0])
    return out
