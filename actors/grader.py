"""Grader actors: a pool of Ray actors that turn Rollouts into ScoredGroups (docs/architecture.md).

Each actor runs the pure group stage (reward.group.score_groups) and verifies every response in its own
isolated worker processes (reward.worker.WorkerPool, `reward.workers_per_grader` of them) with the hard
timeout `reward.timeout_s`: a hung or crashing verification scores `reward.incorrect`, is counted, and the
actor keeps serving. Scoring and pushing are separate: a `sink_factory` (called once inside each actor, e.g.
to open a queue Producer) receives the kept groups of every `score(..., push=True)` call.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence

import numpy as np

from cluster.config import Config, RewardConfig
from cluster.runtime import startup_gc
from cluster.split import split_even
from cluster.types import Rollout, ScoredGroup

Sink = Callable[[list[ScoredGroup]], None]


class Grader:
    """One grader: score_groups over an isolated WorkerPool; its own seeded RNG for reward-noise flips."""

    def __init__(self, reward_cfg: dict, adv_estimator: str, l_max: int | None, seed: int,
                 sink_factory: Callable[[], Sink] | None = None):
        with startup_gc():
            from reward import group  # noqa: F401 - pay torch's import at start-up, not in the first batch
            from reward.worker import WorkerPool

            self.cfg = RewardConfig.model_validate(reward_cfg)
            self.adv_estimator = adv_estimator
            self.l_max = l_max
            self.rng = np.random.default_rng(seed)
            self.pool = WorkerPool(self.cfg.workers_per_grader, self.cfg.timeout_s, self.cfg.worker_memory_mb)
            self.sink = sink_factory() if sink_factory else None

    def ready(self) -> int:
        """Wait until the worker processes have started; returns this actor's pid."""
        self.pool.wait_ready()
        return os.getpid()

    def score(self, rollouts: list[Rollout], push: bool = False, return_groups: bool = True,
              reward: dict | None = None) -> tuple[list[ScoredGroup], dict[str, float]]:
        """Score with the actor's reward config, or with `reward` for this call (GraderPool.scoring_with)."""
        from reward.group import score_groups

        cfg = self.cfg if reward is None else RewardConfig.model_validate(reward)
        restarts = self.pool.restarts
        groups, stats = score_groups(rollouts, cfg, self.adv_estimator, self.rng, self.pool.run, l_max=self.l_max)
        stats["reward/worker_restarts"] = float(self.pool.restarts - restarts)  # in this call, like the rest
        if push:
            if self.sink is None:
                raise RuntimeError("score(push=True) needs a GraderPool created with a sink_factory")
            self.sink(groups)
        return (groups if return_groups else []), stats

    def worker_pids(self) -> list[int]:
        return self.pool.pids()

    def close(self) -> None:
        self.pool.close()


class GraderPool:
    """`reward.num_graders` Grader actors. `score(rollouts)` splits the groups over the actors and returns
    (kept ScoredGroups in input order, merged stats). Built from a full Config (which supplies the advantage
    estimator, DAPO L_max, seed and CPUs) or from a RewardConfig plus those as keywords."""

    def __init__(self, cfg: Config | RewardConfig, *, adv_estimator: str = "grpo", l_max: int | None = None,
                 seed: int = 0, num_cpus: float = 0.0, sink_factory: Callable[[], Sink] | None = None):
        import ray

        from cluster.runtime import runtime_env_vars

        if isinstance(cfg, Config):
            reward, adv_estimator, seed = cfg.reward, cfg.algorithm.adv_estimator, cfg.run.seed
            l_max, num_cpus = cfg.reward.overlong_max or cfg.rollout.max_new_tokens, cfg.cluster.grader_cpus
        else:
            reward = cfg
        if reward.overlong_buffer:
            top = reward.overlong_max or l_max
            if not top or reward.overlong_buffer > top:
                raise ValueError(f"reward.overlong_buffer ({reward.overlong_buffer}) needs an L_max >= it: "
                                 f"reward.overlong_max or rollout.max_new_tokens (got {top})")
        self.reward = reward
        actor = ray.remote(Grader).options(num_cpus=num_cpus, runtime_env={"env_vars": runtime_env_vars()})
        # Each actor its own RNG stream: noise flips stay independent across graders and reproducible.
        seeds = np.random.SeedSequence(seed).spawn(reward.num_graders)
        self.actors = [actor.remote(reward.model_dump(), adv_estimator, l_max,
                                    int(s.generate_state(1)[0]), sink_factory) for s in seeds]
        self._next = 0
        self._score_with: dict | None = None   # scoring_with's reward (None: each actor's own); set on a view

    def scoring_with(self, reward: RewardConfig) -> GraderPool:
        """These actors scoring with `reward` instead of their own config: the evaluation's plain 1/0 reward
        on a run's grader pool (cluster/driver/evaluation.py), where a pool of its own would be another actor
        and worker process to start. Closing the view closes nothing. `reward` may not draw reward noise: the
        actors' RNG stream belongs to training's noise flips and stays as it was."""
        if reward.noise_flip_prob > 0:
            raise ValueError("scoring_with: a reward with noise_flip_prob > 0 would draw from the training RNG")
        view = copy.copy(self)
        view.reward, view._score_with = reward, reward.model_dump()
        return view

    def wait_ready(self) -> list[int]:
        import ray

        return ray.get([a.ready.remote() for a in self.actors])

    def submit(self, rollouts: Sequence[Rollout], push: bool = False, return_groups: bool = True) -> list:
        """Start scoring; returns Ray object refs for `collect`. Contiguous chunks keep the input order; the
        first chunk goes to the next actor in turn so that small calls spread over the pool."""
        n = min(len(self.actors), len(rollouts))
        refs = []
        for j, chunk in enumerate(split_even(rollouts, n) if n else []):
            actor = self.actors[(self._next + j) % len(self.actors)]
            refs.append(actor.score.remote(chunk, push, return_groups, self._score_with))
        self._next = (self._next + n) % len(self.actors)
        return refs

    @staticmethod
    def collect(refs: list) -> tuple[list[ScoredGroup], dict[str, float]]:
        import ray

        from reward.group import merge_stats

        outs = ray.get(refs)
        return [g for groups, _ in outs for g in groups], merge_stats([s for _, s in outs])

    def score(self, rollouts: Sequence[Rollout], push: bool = False, return_groups: bool = True
              ) -> tuple[list[ScoredGroup], dict[str, float]]:
        return self.collect(self.submit(rollouts, push, return_groups)) if rollouts else ([], {})

    def close(self) -> None:
        import ray

        if self._score_with is not None:   # a view: the actors belong to the pool it came from
            return
        for a in self.actors:
            try:
                ray.get(a.close.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - a dead actor has no workers left to stop
                pass
            ray.kill(a)
        self.actors = []
