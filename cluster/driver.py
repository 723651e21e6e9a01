"""The driver behind `forkrl train`: place the actors, run the sync or async loop, write the run.

The two loops below are the algorithm; everything else (placement, queue, metrics, checkpoints, report) is
a call into `System` (cluster/system.py).
"""

from __future__ import annotations

import logging

from cluster.config import Config

log = logging.getLogger("forkrl")


def sync_loop(s, steps: range) -> None:
    """max_staleness = 0: generate with version v, grade, push, train, publish v+1."""
    for step in steps:
        with s.phase("generate"):
            rollouts = s.collect(s.generate(s.data.next()))
        with s.phase("grade"):
            n_groups = s.grade_and_push(rollouts)
        with s.phase("train"):
            s.train(n_groups)
        with s.phase("sync"):
            s.sync_weights()
        s.end_step(step)


def async_loop(s, steps: range) -> None:
    """max_staleness = k >= 1: the generators sample the next batch while the learner trains on this one;
    new weights reach a generator between two generate calls; the queue drops groups older than k."""
    rollouts = s.collect(s.generate(s.data.next()))
    for step in steps:
        with s.phase("grade"):
            n_groups = s.grade_and_push(rollouts)
        pending = s.generate(s.data.next())          # sampled with the current weights ...
        with s.phase("train"):
            s.train(n_groups)                        # ... while the learner trains
        with s.phase("generate"):
            rollouts = s.collect(pending)            # only the part of generation training did not hide
        with s.phase("sync"):
            s.sync_weights()
        s.end_step(step)


def train(cfg: Config, resume: str | None = None) -> int:
    """`forkrl train`: returns the process exit code."""
    from cluster.system import System

    with System.start(cfg, resume=resume) as s:
        loop = sync_loop if cfg.run.max_staleness == 0 else async_loop
        loop(s, range(s.start_step, cfg.run.steps))
        s.finish()
    return 0
