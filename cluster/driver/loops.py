"""The driver behind `forkrl train`: place the actors, run the sync or async loop, write the run.

The two loops below are the algorithm; everything else is a call into `System` (cluster/driver/system.py),
which composes the run directory (rundir.py), placement and the actors (placement.py), recovery from dead
generators, failed weight syncs and queue-server restarts (recovery.py; docs/reliability.md lists the faults)
and the step statistics (stepstats.py).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from cluster.config import Config
from cluster.driver.watchdog import EXIT_HUNG  # noqa: F401 - the run's exit codes are read from here

if TYPE_CHECKING:
    from cluster.driver.system import System

log = logging.getLogger("forkrl")

EXIT_ACTOR_LOST = 3   # an actor the run cannot replace died (e.g. a learner rank): resume from the checkpoint


def sync_loop(s: System, steps: range) -> None:
    """max_staleness = 0: generate with version v, grade, push, train, publish v+1."""
    for step in steps:
        with s.phase("generate"):
            rollouts = s.collect(s.generate(s.data.next()))
        with s.phase("grade"):
            n_groups = s.grade_and_push(rollouts)
        n_groups = s.refill(n_groups)                # DAPO: more prompts until the batch has signal
        with s.phase("train"):
            s.train(n_groups)
        with s.phase("sync"):
            s.sync_weights()
        s.end_step(step)


def async_loop(s: System, steps: range) -> None:
    """max_staleness = k >= 1: the generators sample the next batch while the learner trains on this one;
    new weights reach a generator between two generate calls; the queue drops groups older than k."""
    rollouts = s.collect(s.generate(s.data.next()))
    for step in steps:
        pending = s.generate(s.data.next())          # sampled with the current weights ...
        with s.phase("grade"):
            n_groups = s.grade_and_push(rollouts)    # ... while the graders score the last batch
        n_groups = s.refill(n_groups)                # DAPO refill: queued behind `pending`, counted in generate
        with s.phase("train"):
            s.train(n_groups)                        # ... while the learner trains
        with s.phase("generate"):
            rollouts = s.collect(pending)            # only the part of generation training did not hide
        with s.phase("sync"):
            s.sync_weights()
        s.end_step(step)


def train(cfg: Config, resume: str | None = None) -> int:
    """`forkrl train`: returns the process exit code."""
    from ray.exceptions import RayActorError

    from cluster.runtime import startup_gc

    with startup_gc():
        from cluster.driver.system import System

    with System.start(cfg, resume=resume) as s:   # on --resume, s.cfg is the run's own config
        loop = sync_loop if s.cfg.run.max_staleness == 0 else async_loop
        dog = s.start_watchdog()
        try:
            loop(s, range(s.start_step, s.cfg.run.steps))
        except RayActorError as e:
            log.error("an actor the run cannot replace died: %s\nthe run stopped; continue it from its last "
                      "checkpoint with: forkrl train --resume %s", str(e).splitlines()[0], s.run_dir)
            return EXIT_ACTOR_LOST
        except KeyboardInterrupt:
            if dog.fired is None:
                raise
            dog.taken()
            log.error("the run stopped: %s\ncontinue it from its last checkpoint with: forkrl train --resume %s",
                      dog.fired, s.run_dir)
            return EXIT_HUNG
        finally:
            dog.stop()
        s.finish()
    return 0
