"""Placement and the actors: Ray (join or start), the run's placement group, the generators, the two grader
pools (training, pushing onto the stream; evaluation, scoring only), the learner group and the weight-sync
group that joins them."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Any

import numpy as np

from cluster.config import Config, ConfigError
from cluster.transport.queue import QueueAddress
from cluster.transport.sink import QueueSink

log = logging.getLogger("forkrl")


def start_ray(cfg: Config, log_to_driver: bool = True) -> tuple[bool, bool]:
    """Join the cluster of RAY_ADDRESS / cluster.address / a `ray start` on this machine (as under
    `ray job submit`), else start a private local one. Never join another process's private Ray.
    `log_to_driver=False`: the actors' output does not come to this process's stdout (`forkrl eval`).
    Returns (local: the cluster is this one machine, started: this process started it)."""
    import ray

    from cluster.runtime import runtime_env_vars

    env = {"env_vars": runtime_env_vars()}
    if ray.is_initialized():  # e.g. tests that share one Ray session
        return _one_node(), False
    address = cfg.cluster.address or _started_cluster()
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=log_to_driver)
        log.info("joined the Ray cluster at %s", address)
        return _one_node(), False
    with _loopback_node():
        # no idle workers started ahead for this driver: every forkrl actor has its own runtime_env, so none
        # would ever run in one (they cost ~0.8 s of CPU each, num_cpus of them)
        ray.init(num_cpus=cfg.cluster.num_cpus, include_dashboard=False, runtime_env=env,
                 dashboard_host=cfg.cluster.dashboard_host, log_to_driver=log_to_driver,
                 _system_config={"prestart_worker_first_driver": False})
    ip = ray.util.get_node_ip_address()
    if ip in ("127.0.0.1", "::1"):
        log.info("started a private local Ray on %s (loopback only)", ip)
    else:  # a Ray that no longer honours its local-only mode: say so rather than listen quietly
        log.warning("the private local Ray took node address %s: its ports are reachable from the network", ip)
    return True, True


@contextlib.contextmanager
def _loopback_node():
    """The private Ray's node address is loopback, so every one of its servers listens on 127.0.0.1 only
    (docs/platform.md "What a local run listens on"). Ray binds its gRPC servers (GCS, raylet, object
    manager, each worker's core worker), agents and metrics exporters to loopback exactly when the node
    address is loopback, but `ray.init(_node_ip_address="127.0.0.1")` is rewritten to the machine's address
    (`services.resolve_ip_for_localhost`); Ray's own local-only mode (what it uses on macOS and Windows,
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) makes the node address loopback. Set for `ray.init` only: the
    processes it starts inherit it (and the workers from the raylet), then this process's environment is
    restored, so a later `ray.init(address=...)` in it joins a cluster as before."""
    from ray._private import ray_constants

    key = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    env, const = os.environ.get(key), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[key], ray_constants.ENABLE_RAY_CLUSTER = "0", False   # read at import (ray_constants) and here
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = const
        if env is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = env


def check_local_fit(cfg: Config) -> None:
    """A run that will start its own local Ray knows its CPUs before it asks Ray: actors that cannot all be
    placed are a ConfigError naming the fields at once (Ray would wait for them until `Actors.start` gives up)."""
    import ray

    if ray.is_initialized() or cfg.cluster.address or _started_cluster():
        return  # a cluster's size is the cluster's to say
    from ray._private.utils import get_num_cpus

    c, r = cfg.cluster, cfg.rollout
    have = c.num_cpus or get_num_cpus()
    parts = [(r.num_generators, c.generator_cpus, "rollout.num_generators", "cluster.generator_cpus"),
             (cfg.learner.num_ranks, c.learner_cpus, "learner.num_ranks", "cluster.learner_cpus"),
             (cfg.reward.num_graders + 1, c.grader_cpus, "reward.num_graders + 1", "cluster.grader_cpus")]
    need = sum(n * cpus for n, cpus, _, _ in parts)
    if need > have:
        terms = " + ".join(f"{a}={n} x {b}={cpus:g}" for n, cpus, a, b in parts if n * cpus)
        raise ConfigError(f"{terms} = {need:g} CPUs, but this local run has {have} "
                          f"({'cluster.num_cpus' if c.num_cpus else 'the machine'}): lower one of them")


def generator_bundles(cfg: Config) -> list[dict[str, float]]:
    """The placement bundles of one generator. On GPUs with tensor parallelism, one bundle of one GPU per TP
    worker, as verl and OpenRLHF place them: vLLM's Ray executor refuses a bundle with more than one GPU
    (vllm/v1/executor/ray_utils.py) and takes its workers' bundles from VLLM_RAY_BUNDLE_INDICES inside the
    placement group the generator actor runs in. Otherwise one bundle for the whole generator."""
    c, tp = cfg.cluster, cfg.rollout.tensor_parallel_size
    if c.generator_gpus >= 1 and tp > 1:
        return [{"CPU": c.generator_cpus, "GPU": 1.0}] + [{"GPU": 1.0}] * (tp - 1)
    return [{"CPU": c.generator_cpus, **({"GPU": c.generator_gpus} if c.generator_gpus else {})}]


def _one_node() -> bool:
    import ray

    return len([n for n in ray.nodes() if n.get("Alive")]) == 1


def _started_cluster() -> str | None:
    """RAY_ADDRESS, or the cluster a `ray start` on this machine recorded; None when there is neither (a
    bare `ray.init(address="auto")` would also join any other process's private local Ray)."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    from ray._private.services import find_bootstrap_address

    return find_bootstrap_address(None)


class Actors:
    """The run's actors in one placement group: bundles 0..G-1 the generators, G..G+R-1 the learner ranks."""

    def __init__(self, cfg: Config, run_id: str, model_path: str, address: QueueAddress, local: bool):
        self.cfg, self.run_id, self.model_path, self.address, self.local = cfg, run_id, model_path, address, local
        self.pg = None
        self.generators: list = []
        self.graders = self.learner = None

    def start(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from learner.worker import LearnerGroup

        cfg, c = self.cfg, self.cfg.cluster
        n_gen, n_rank = cfg.rollout.num_generators, cfg.learner.num_ranks
        bundles = [b for _ in range(n_gen) for b in generator_bundles(cfg)]
        bundles += [{"CPU": c.learner_cpus, **({"GPU": c.learner_gpus} if c.learner_gpus else {})}] * n_rank
        self.pg = placement_group(bundles, strategy="PACK")
        ready, _ = ray.wait([self.pg.ready()], timeout=120)
        if not ready:
            raise RuntimeError(f"the cluster cannot place {n_gen} generators and {n_rank} learner ranks "
                               f"({bundles}); it has {ray.cluster_resources()}")

        def opts(i: int) -> dict[str, Any]:
            return {"scheduling_strategy": PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)}

        t0 = time.perf_counter()
        self.generators = [self.new_generator(i) for i in range(n_gen)]
        self.graders = self.new_graders()   # they score the evaluation too (eval_graders)
        first = n_gen * len(generator_bundles(cfg))
        self.learner = LearnerGroup(cfg, self.model_path, [opts(first + r) for r in range(n_rank)],
                                    loopback=self.local)
        self.attach_learner()
        ray.get([g.info.remote() for g in self.generators])
        self.graders.wait_ready()
        self.init_sync()
        log.info("actors ready in %.1f s", time.perf_counter() - t0)

    def new_generator(self, i: int):
        """A generator actor in placement bundle i. Its id is new for every actor ever started (a
        replacement, a resumed run), so its group ids never collide with ones the queue already admitted."""
        import secrets

        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from actors.generator import generator_actor

        cfg, c = self.cfg, self.cfg.cluster
        per = len(generator_bundles(cfg))
        own = list(range(i * per, (i + 1) * per))
        ray_tp = per > 1   # vLLM's Ray executor: one worker actor per bundle, the generator actor holds no GPU
        return generator_actor(
            f"{self.run_id}-g{i}-{secrets.token_hex(3)}", self.model_path, cfg.rollout, dtype=cfg.model.dtype,
            seed=cfg.run.seed + i, eval_seed=cfg.run.seed,
            max_model_len=cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens,
            num_cpus=c.generator_cpus, num_gpus=0 if ray_tp else c.generator_gpus, gpus=c.generator_gpus,
            extra_env={"VLLM_RAY_BUNDLE_INDICES": ",".join(map(str, own))} if ray_tp else None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=own[0],
                                                                 placement_group_capture_child_tasks=True))

    def new_graders(self):
        """The grader pool that pushes onto this run's stream (each actor opens its own producer)."""
        from actors.grader import GraderPool

        return GraderPool(self.cfg, sink_factory=QueueSink(dataclasses.asdict(self.address),
                                                           self.cfg.queue.model_dump()))

    def attach_learner(self) -> None:
        """Every learner rank becomes a consumer of the run's stream (again, after the queue lost it)."""
        self.learner.call("attach_queue", dataclasses.asdict(self.address))

    def init_sync(self) -> None:
        """Form the weight-sync group: learner rank 0 is its rank 0, then every generator's vLLM workers."""
        import ray

        from cluster.transport.weightsync import Deadlines

        ranks = ray.get([g.sync_ranks.remote() for g in self.generators])
        world = 1 + sum(ranks)
        host = "127.0.0.1" if self.local else ray.get(self.learner.ranks[0].node_ip.remote())
        port = ray.get(self.learner.ranks[0].free_port.remote(host))
        offsets = np.concatenate([[1], 1 + np.cumsum(ranks)[:-1]]).astype(int)
        sc = self.cfg.sync
        refs = [self.learner.ranks[0].init_sender.remote(host, port, world)]
        refs += [g.init_weight_sync.remote(host, port, int(o), world, sc.model_dump())
                 for g, o in zip(self.generators, offsets)]
        ray.get(refs, timeout=Deadlines.of(sc).group_init_s)

    def pids(self, server_pid: int | None) -> dict[str, Any]:
        import ray

        return {"driver": os.getpid(), "queue_server": server_pid,
                "generators": [x["pid"] for x in ray.get([g.info.remote() for g in self.generators])],
                "learner": [x["pid"] for x in self.learner.call("status")],
                "grader_workers": [p for a in self.graders.actors for p in ray.get(a.worker_pids.remote())]}

    def stop(self) -> None:
        """Shut every actor down, whatever state it is in: a dead or hung actor gets a few seconds to close,
        then it is killed (a learner rank left in a collective by a dead peer would otherwise hold this up
        for the collective's timeout)."""
        import ray

        if self.learner and self.learner.ranks:
            refs = [a.close.remote() for a in self.learner.ranks]
            ray.wait(refs, num_returns=len(refs), timeout=10)
        try:
            if self.graders:
                self.graders.close()
        except Exception as e:  # noqa: BLE001 - shut down the rest regardless
            log.warning("shutdown: %s", e)
        for g in self.generators:
            ray.kill(g)
        if self.learner:
            self.learner.kill()
        if self.pg is not None:  # in a shared Ray session it would keep holding the run's CPUs
            from ray.util import remove_placement_group
            remove_placement_group(self.pg)
