"""Recovery from the faults a run survives (docs/reliability.md): a dead, hung or half-reloaded generator, a
failed weight sync, a queue server that restarted or lost the run's stream. Each is counted (metrics.jsonl,
the ledger, the log) and the run stops past cluster.max_recoveries."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cluster.driver.system import System

log = logging.getLogger("forkrl")


def reason(e: BaseException) -> str:
    """`Type: first line` of what failed, without Ray's wrapping and traceback."""
    cause = getattr(e, "cause", None) or e
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


def recovered(s: System, kind: str, detail: str) -> None:
    """Count a recovery; stop the run past cluster.max_recoveries."""
    s.recoveries += 1
    s.record.count(f"fault/{kind}")
    s.log_event("fault", kind=kind, detail=detail[:500])
    if s.recoveries > s.cfg.cluster.max_recoveries:
        raise RuntimeError(f"{s.recoveries} recoveries exceed cluster.max_recoveries "
                           f"({s.cfg.cluster.max_recoveries}); last: {kind}: {detail}")
    log.error("recovering (%s): %s", kind, detail)


def sync_failed(s: System, gen_refs: dict, why: str) -> None:
    s.record.count("sync/failures")
    recovered(s, "sync_failed", why)
    replace_generators(s, gen_refs, why)


def replace_generators(s: System, refs: dict, why: str) -> None:
    """After calls `refs` {generator index: ref} failed: replace every generator that is dead, still busy in
    its call the hung deadline later, or holds half-reloaded weights; rebuild the weight-sync group with all
    members and push the learner's current weights to every generator."""
    import ray
    from ray.exceptions import RayError

    a = s.actors
    _, busy = ray.wait(list(refs.values()), num_returns=len(refs), timeout=s.deadlines.hung_s)
    hung = {i for i, ref in refs.items() if ref in busy}
    for i, g in enumerate(a.generators):
        try:
            healthy = i not in hung and ray.get(g.info.remote(), timeout=10)["broken"] is None
        except RayError:  # dead
            healthy = False
        if not healthy:
            recovered(s, "generators_replaced", f"generator {i}: {why}")
            ray.kill(g)
            a.generators[i] = a.new_generator(i)
    ray.get([g.info.remote() for g in a.generators])
    a.init_sync()
    s.synced = -1
    s.sync_weights()
    s.write_pids()
    log.info("generators hold weights version %d again", s.version)


def recover_queue(s: System, e: Exception) -> bool:
    """A queue operation failed (on any learner rank, or in a grader): restart the server if it is ours and
    died (with queue.aof the stream comes back); if the run's data is gone, set the run up again and
    reconnect every client. A read that timed out on a live server (`queue_timeout`) needs neither: the
    ranks kept the groups they got, and the caller trains the step again. Returns whether the run's data
    was gone (the caller pushes the step's rollouts again)."""
    from cluster.transport.queue import Producer, QueueTimeout, ServerLost, setup_run

    if s.server is not None and not s.server.running:
        s.server.start()   # same port and directory
    try:
        Producer(s.address, s.cfg.queue).close()   # the run's marker is still there
        lost = isinstance(e, ServerLost)
    except ServerLost:
        lost = True
    recovered(s, "queue_lost" if lost else "queue_timeout" if isinstance(e, QueueTimeout) else "queue_restarted",
              reason(e))
    if lost:
        log.error("the queue server lost this run's stream: setting it up again and re-sending the step")
        setup_run(s.address, s.cfg.queue.reconnect_s)
        s.actors.attach_learner()
        s.actors.graders.close()  # their producers belong to the lost run
        s.actors.graders = s.actors.new_graders()
        s.actors.graders.wait_ready()
        s.write_pids()
    return lost
