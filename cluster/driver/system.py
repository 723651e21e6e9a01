"""Everything the training loops call: Ray and placement, the queue, the actors, weight sync, evaluation,
metrics, checkpoints and the run directory. One `System` per `forkrl train`."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cluster.config import Config, dump_config, load_config
from cluster.types import Prompt, Rollout, ScoredGroup

log = logging.getLogger("forkrl")

CHECKPOINTS = "checkpoints"
RUN_STATE = "run_state.json"
LEDGER = "ledger.jsonl"   # what happened to every group id: generated, pushed, trained; and every fault
PIDS = "pids.json"        # the run's processes (operators, fault tests)
# learner statistics summed over ranks (the rest are token-weighted means over ranks)
_SUMMED = ("tokens", "selected", "clip_cov/clipped", "kl_cov/penalised", "learner/groups", "learner/responses",
           "learner/tokens")


class PromptStream:
    """Training prompts in a reshuffled order each epoch; its position is saved with checkpoints."""

    def __init__(self, prompts: list[Prompt], batch: int, seed: int):
        self.prompts, self.batch, self.seed = prompts, batch, seed
        self.epoch, self.pos = 0, 0
        self._order = self._perm()

    def _perm(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.prompts))

    def next(self) -> list[Prompt]:
        out = []
        while len(out) < self.batch:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm()
            out.append(self.prompts[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._perm()


@dataclass
class StepRecord:
    phases: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)


def _split(items: list, parts: int) -> list[list]:
    bounds = np.linspace(0, len(items), parts + 1).astype(int)
    return [items[bounds[i]:bounds[i + 1]] for i in range(parts)]


def new_run_dir(cfg: Config) -> Path:
    base = Path(cfg.run.output_dir).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d = base / f"{cfg.run.name}-{stamp}"
    k = 1
    while d.exists():
        d, k = base / f"{cfg.run.name}-{stamp}-{k}", k + 1
    (d / CHECKPOINTS).mkdir(parents=True)
    return d


def public_config(cfg: Config) -> Config:
    """The config as written to the run directory: no queue password, in the field or in the URL (on --resume
    it comes from FORKRL_REDIS_PASSWORD)."""
    from urllib.parse import urlparse

    q, url = cfg.queue, cfg.queue.url
    if url and "@" in urlparse(url).netloc:
        userinfo, _, host = urlparse(url).netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        url = urlparse(url)._replace(netloc=f"{user}@{host}" if user else host).geturl()
    return cfg.model_copy(update={"queue": q.model_copy(update={"password": None, "url": url})})


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted(p for p in (run_dir / CHECKPOINTS).glob("step-*") if (p / RUN_STATE).is_file())
    return ckpts[-1] if ckpts else None


class QueueSink:
    """Grader-side sink (built inside each grader actor): push kept groups onto the run's stream."""

    def __init__(self, address: dict[str, Any], queue_cfg: dict[str, Any]):
        self.address, self.queue_cfg = address, queue_cfg

    def __call__(self):
        from cluster.transport.codec import CodecError
        from cluster.config import QueueConfig
        from cluster.transport.queue import Producer, QueueAddress

        producer = Producer(QueueAddress(**self.address), QueueConfig.model_validate(self.queue_cfg))

        def push(groups: list[ScoredGroup]) -> None:
            for g in groups:
                try:
                    producer.put(g)
                except CodecError as e:  # e.g. undecodable text: drop this group, keep the run going
                    log.error("group %s cannot be encoded and is dropped: %s", g.group_id, e)
        return push


class System:
    def __init__(self, cfg: Config, run_dir: Path, resume: bool):
        self.cfg, self.run_dir, self.resume = cfg, run_dir, resume
        self.run_id = run_dir.name
        self.version = 0          # weights version of the learner (one per RL step that updated)
        self.synced = 0           # version the generators hold
        self.start_step = 0
        self.step = 0             # steps completed
        self.record = StepRecord()
        self.server = None
        self.exporter = None
        self.generators: list = []
        self.pg = None
        self.graders = self.eval_graders = self.learner = None
        self._ray_started = False
        self._bar = None
        self._last_eval: dict[str, float] = {}
        self._queue_prev: dict[str, float] = {}
        self._metrics_file = self._ledger = None
        self._pushed: list[Rollout] = []   # the step's rollouts, pushed again if the queue server lost them
        self.recoveries = 0
        self._leftover = 0   # groups a stopped run left on the stream: the first resumed step trains them too

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    @contextmanager
    def start(cls, cfg: Config, resume: str | None = None) -> Iterator["System"]:
        from cluster.runtime import setup_env

        setup_env()
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if resume:
            run_dir = Path(resume).resolve()
            if not (run_dir / "config.yaml").is_file():
                raise FileNotFoundError(f"--resume {resume}: not a forkrl run directory (no config.yaml)")
            cfg = load_config(run_dir / "config.yaml")
        else:
            run_dir = new_run_dir(cfg)
            (run_dir / "config.yaml").write_text(dump_config(public_config(cfg)))
        s = cls(cfg, run_dir, resume=bool(resume))
        try:
            s._start()
            yield s
        finally:
            s.stop()

    def _start(self) -> None:
        cfg = self.cfg
        log.info("run directory %s", self.run_dir)
        self._load_data()  # a missing model or a bad dataset row fails here, before any process starts
        self._start_ray()
        self._start_queue()
        self._start_metrics()
        self._start_actors()
        self._metrics_file = open(self.run_dir / "metrics.jsonl", "a")
        self._ledger = open(self.run_dir / LEDGER, "a")
        if self.resume:
            self._restore()
        self._log_event("start", resumed=self.resume, version=self.version)
        if cfg.run.eval_every and self.start_step == 0:
            self._log_eval(0, self.evaluate())
        from tqdm import tqdm
        self._bar = tqdm(total=cfg.run.steps, initial=self.start_step, desc="forkrl", unit="step",
                         dynamic_ncols=True)

    def _start_ray(self) -> None:
        """Join the cluster of RAY_ADDRESS / cluster.address / a `ray start` on this machine (as under
        `ray job submit`), else start a private local one. Never join another process's private Ray."""
        import ray

        from cluster.runtime import runtime_env_vars

        env = {"env_vars": runtime_env_vars()}
        if ray.is_initialized():  # e.g. tests that share one Ray session
            self.local = len([n for n in ray.nodes() if n.get("Alive")]) == 1
            return
        address = self.cfg.cluster.address or _started_cluster()
        if address:
            ray.init(address=address, runtime_env=env)
            self.local = len([n for n in ray.nodes() if n.get("Alive")]) == 1
            log.info("joined the Ray cluster at %s", address)
            return
        ray.init(num_cpus=self.cfg.cluster.num_cpus, include_dashboard=False, runtime_env=env,
                 dashboard_host=self.cfg.cluster.dashboard_host)
        self._ray_started = True
        self.local = True

    def _start_queue(self) -> None:
        from cluster.transport.queue import open_queue

        data_dir = str(self.run_dir / "queue") if self.cfg.queue.aof else None
        self.address, self.server = open_queue(self.cfg.queue, self.run_id, data_dir=data_dir)
        log.info("queue %s", self.address.display)

    def _start_metrics(self) -> None:
        from cluster.observe.metrics import MetricsExporter

        self.exporter = MetricsExporter(self.cfg.metrics, run=self.run_id,
                                        info={"model": self.cfg.model.path, "task": self.cfg.data.task})
        (self.run_dir / "metrics_url").write_text(self.exporter.url + "\n")
        log.info("metrics at %s", self.exporter.url)

    def _load_data(self) -> None:
        from transformers import AutoTokenizer

        from cluster.data.models import resolve_model
        from cluster.data.tasks import load_problems, render_prompts

        cfg = self.cfg
        self.model_path = str(resolve_model(cfg.model.path, cfg.data.task))
        tok = AutoTokenizer.from_pretrained(self.model_path)
        train, held = load_problems(cfg.data, cfg.run.seed)
        self.data = PromptStream(render_prompts(train, tok, cfg.data, "train"), cfg.rollout.prompts_per_step,
                                 cfg.run.seed)
        self.eval_prompts = render_prompts(held, tok, cfg.data, "eval")

    def _start_actors(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from actors.grader import GraderPool
        from learner.worker import LearnerGroup

        cfg, c = self.cfg, self.cfg.cluster
        n_gen, n_rank = cfg.rollout.num_generators, cfg.learner.num_ranks
        bundles = [{"CPU": c.generator_cpus, **({"GPU": c.generator_gpus} if c.generator_gpus else {})}] * n_gen
        bundles += [{"CPU": c.learner_cpus, **({"GPU": c.learner_gpus} if c.learner_gpus else {})}] * n_rank
        self.pg = placement_group(bundles, strategy="PACK")
        ready, _ = ray.wait([self.pg.ready()], timeout=120)
        if not ready:
            raise RuntimeError(f"the cluster cannot place {n_gen} generators and {n_rank} learner ranks "
                               f"({bundles}); it has {ray.cluster_resources()}")

        def opts(i: int) -> dict[str, Any]:
            return {"scheduling_strategy": PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)}

        t0 = time.perf_counter()
        self.generators = [self._new_generator(i) for i in range(n_gen)]
        self.graders = self._new_graders()
        eval_reward = cfg.reward.model_copy(update=dict(
            ttrl=False, dynamic_sampling=False, noise_flip_prob=0.0, correct=1.0, incorrect=0.0, format_reward=0.0,
            overlong_buffer=0, rent_coef=0.0, num_graders=1))
        self.eval_graders = GraderPool(eval_reward, adv_estimator=cfg.algorithm.adv_estimator,
                                       l_max=cfg.rollout.max_new_tokens, seed=cfg.run.seed,
                                       num_cpus=c.grader_cpus)
        self.learner = LearnerGroup(cfg, self.model_path, [opts(n_gen + r) for r in range(n_rank)],
                                    loopback=self.local)
        self.learner.call("attach_queue", dataclasses.asdict(self.address))
        ray.get([g.info.remote() for g in self.generators])
        self.graders.wait_ready()
        self.eval_graders.wait_ready()
        self._init_sync()
        self._write_pids()
        log.info("actors ready in %.1f s", time.perf_counter() - t0)

    def _new_generator(self, i: int):
        """A generator actor in placement bundle i. Its id is new for every actor ever started (a
        replacement, a resumed run), so its group ids never collide with ones the queue already admitted."""
        import secrets

        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from actors.generator import generator_actor

        cfg, c = self.cfg, self.cfg.cluster
        return generator_actor(
            f"{self.run_id}-g{i}-{secrets.token_hex(3)}", self.model_path, cfg.rollout, dtype=cfg.model.dtype,
            seed=cfg.run.seed + i, max_model_len=cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens,
            num_cpus=c.generator_cpus, num_gpus=c.generator_gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i))

    def _new_graders(self):
        """The grader pool that pushes onto this run's stream (each actor opens its own producer)."""
        from actors.grader import GraderPool

        return GraderPool(self.cfg, sink_factory=QueueSink(dataclasses.asdict(self.address),
                                                           self.cfg.queue.model_dump()))

    def _write_pids(self) -> None:
        import ray

        pids = {"driver": os.getpid(), "queue_server": self.server.pid if self.server else None,
                "generators": [x["pid"] for x in ray.get([g.info.remote() for g in self.generators])],
                "learner": [x["pid"] for x in self.learner.call("status")],
                "grader_workers": [p for a in self.graders.actors for p in ray.get(a.worker_pids.remote())]}
        (self.run_dir / PIDS).write_text(json.dumps(pids))

    def _init_sync(self) -> None:
        import ray

        ranks = ray.get([g.sync_ranks.remote() for g in self.generators])
        world = 1 + sum(ranks)
        host = "127.0.0.1" if self.local else ray.get(self.learner.ranks[0].node_ip.remote())
        port = ray.get(self.learner.ranks[0].free_port.remote(host))
        offsets = np.concatenate([[1], 1 + np.cumsum(ranks)[:-1]]).astype(int)
        timeout = self.cfg.sync.timeout_s
        refs = [self.learner.ranks[0].init_sender.remote(host, port, world)]
        refs += [g.init_weight_sync.remote(host, port, int(o), world, timeout, self.cfg.sync.backend)
                 for g, o in zip(self.generators, offsets)]
        ray.get(refs, timeout=timeout + 30)

    def stop(self) -> None:
        """Shut everything down, whatever state it is in: a dead or hung actor gets a few seconds to close,
        then it is killed (a learner rank left in a collective by a dead peer would otherwise hold this up
        for the collective's timeout)."""
        import ray

        if self._bar is not None:
            self._bar.close()
        if self.learner and self.learner.ranks:
            refs = [a.close.remote() for a in self.learner.ranks]
            ray.wait(refs, num_returns=len(refs), timeout=10)
        for pool in (self.graders, self.eval_graders):
            try:
                if pool:
                    pool.close()
            except Exception as e:  # noqa: BLE001 - shut down the rest regardless
                log.warning("shutdown: %s", e)
        for g in self.generators:
            ray.kill(g)
        if self.learner:
            self.learner.kill()
        if self.pg is not None:  # in a shared Ray session it would keep holding the run's CPUs
            from ray.util import remove_placement_group
            remove_placement_group(self.pg)
        if self.exporter:
            self.exporter.close()
        if self.server:
            self.server.stop()
        for f in (self._metrics_file, self._ledger):
            if f:
                f.close()
        if self._ray_started:
            ray.shutdown()

    # ------------------------------------------------------------------ steps of the loops
    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.record.phases[name] = self.record.phases.get(name, 0.0) + time.perf_counter() - t0

    def generate(self, prompts: list[Prompt], method: str = "generate") -> list:
        """Start sampling `prompts` split over the generators; returns the pending work for `collect`."""
        parts = _split(prompts, len(self.generators))
        return [(i, p, getattr(self.generators[i], method).remote(p), method) for i, p in enumerate(parts) if p]

    def _gather(self, pending: list) -> list[Rollout]:
        """Results of `generate`; the part of a generator that died is sampled again by its replacement."""
        import ray
        from ray.exceptions import RayActorError

        out, lost = [], []
        for i, prompts, ref, method in pending:
            try:
                out += ray.get(ref)
            except RayActorError as e:
                lost.append((i, prompts, ref, method))
                why = _reason(e)
        if lost:
            self._replace_generators({i: ref for i, _, ref, _ in lost}, f"generator died during {lost[0][3]}: {why}")
            out += self._gather([(i, p, getattr(self.generators[i], m).remote(p), m) for i, p, _, m in lost])
        return out

    def collect(self, pending: list) -> list[Rollout]:
        rollouts = self._gather(pending)
        self._log_event("generated", ids=[r.group_id for r in rollouts])
        toks = sum(len(x.token_ids) for r in rollouts for x in r.responses)
        secs = max((r.timing.get("generate_s", 0.0) for r in rollouts), default=0.0)
        st = self.record.stats
        st["generator/tokens"] = st.get("generator/tokens", 0.0) + toks
        st["generator/seconds"] = st.get("generator/seconds", 0.0) + secs
        lengths = [len(x.token_ids) for r in rollouts for x in r.responses]
        st["response/length_mean"] = float(np.mean(lengths)) if lengths else 0.0
        st["response/length_max"] = float(max(lengths, default=0))
        st["response/truncated_share"] = float(np.mean([x.finish_reason == "length" for r in rollouts
                                                        for x in r.responses])) if lengths else 0.0
        st["generator/staleness_at_sample"] = float(self.version - min((r.version for r in rollouts), default=0))
        return rollouts

    def grade_and_push(self, rollouts: list[Rollout]) -> int:
        """Score the groups and push the kept ones onto the stream; returns how many were kept."""
        from cluster.transport.queue import QueueError

        self._pushed = rollouts
        try:
            groups, stats = self.graders.score(rollouts, push=True, return_groups=False)
        except QueueError as e:
            self._recover_queue(e)
            return self.grade_and_push(rollouts)  # a group already admitted is not added twice
        self.record.stats.update(stats)
        kept = int(stats.get("reward/groups_kept", 0))
        self._log_event("pushed", kept=kept)
        return kept

    def train(self, n_groups: int) -> None:
        """Every rank reads its share of the n_groups fresh groups from the queue and trains on them."""
        from cluster.transport.queue import QueueError

        n_groups, self._leftover = n_groups + self._leftover, 0
        if n_groups == 0:
            log.warning("no group kept this step (all groups had equal rewards): no update")
            return
        shares = [len(x) for x in _split(list(range(n_groups)), self.cfg.learner.num_ranks)]
        try:
            per_rank = self.learner.call_each("train_step", [(n, self.version, self.cfg.run.max_staleness)
                                                             for n in shares])
        except QueueError as e:
            lost = self._recover_queue(e)
            if self.learner.call("status")[0]["version"] == self.version:  # no update: train again
                return self.train(self.grade_and_push(self._pushed) if lost else n_groups)
            log.warning("the step's update happened before the queue failed (only its ack was lost)")
            per_rank = [{}]
        self.record.stats.update(merge_rank_stats(per_rank))
        self.version += 1
        self._log_event("trained", version=self.version,
                        ids=[i for r in self.learner.call("status") for i in r["trained"]])

    def sync_weights(self) -> None:
        import ray
        from ray.exceptions import RayError

        from cluster.transport.weightsync import SyncError

        if self.synced == self.version:
            return  # nothing new to publish
        gen_refs = dict(enumerate(g.receive_weights.remote() for g in self.generators))
        try:
            learn = self.learner.call("sync_weights")  # any failure but the sync's own stops the run
        except SyncError as e:
            return self._sync_failed(gen_refs, f"weight sync to version {self.version} failed: {_reason(e)}")
        got = []
        for i, ref in gen_refs.items():
            try:
                got.append(ray.get(ref, timeout=self.cfg.sync.timeout_s))
            except RayError as e:  # the broadcast went out but this generator did not apply it
                return self._sync_failed(gen_refs, f"generator {i} did not apply version {self.version}: "
                                                   f"{_reason(e)}")
        st = self.record.stats
        st["sync/duration_s"] = float(learn[0]["total_s"])
        st["sync/bytes"] = float(learn[0].get("bytes", 0.0))
        versions = {int(x["version"]) for x in got}
        if versions != {self.version}:
            raise RuntimeError(f"generators hold versions {sorted(versions)} after publishing {self.version}")
        self.synced = self.version

    # ------------------------------------------------------------------ recovery
    def _recovered(self, kind: str, detail: str) -> None:
        """Count a recovery (metrics.jsonl, the ledger, the log); stop the run past cluster.max_recoveries."""
        self.recoveries += 1
        st = self.record.stats
        st[f"fault/{kind}"] = st.get(f"fault/{kind}", 0.0) + 1
        self._log_event("fault", kind=kind, detail=detail[:500])
        if self.recoveries > self.cfg.cluster.max_recoveries:
            raise RuntimeError(f"{self.recoveries} recoveries exceed cluster.max_recoveries "
                               f"({self.cfg.cluster.max_recoveries}); last: {kind}: {detail}")
        log.error("recovering (%s): %s", kind, detail)

    def _sync_failed(self, gen_refs: dict, why: str) -> None:
        self.record.stats["sync/failures"] = self.record.stats.get("sync/failures", 0.0) + 1
        self._recovered("sync_failed", why)
        self._replace_generators(gen_refs, why)

    def _replace_generators(self, refs: dict, why: str) -> None:
        """After calls `refs` {generator index: ref} failed: replace every generator that is dead, still
        busy in its call sync.timeout_s later (hung), or holds half-reloaded weights; rebuild the weight-sync
        group with all members and push the learner's current weights to every generator."""
        import ray
        from ray.exceptions import RayError

        _, busy = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.cfg.sync.timeout_s)
        hung = {i for i, ref in refs.items() if ref in busy}
        for i, g in enumerate(self.generators):
            try:
                healthy = i not in hung and ray.get(g.info.remote(), timeout=10)["broken"] is None
            except RayError:  # dead
                healthy = False
            if not healthy:
                self._recovered("generators_replaced", f"generator {i}: {why}")
                ray.kill(g)
                self.generators[i] = self._new_generator(i)
        ray.get([g.info.remote() for g in self.generators])
        self._init_sync()
        self.synced = -1
        self.sync_weights()
        self._write_pids()
        log.info("generators hold weights version %d again", self.version)

    def _recover_queue(self, e: Exception) -> bool:
        """The queue server failed: restart it if it is ours and died (with queue.aof the stream comes back);
        if the run's data is gone, set the run up again and reconnect every client. Returns whether it was
        gone (the caller pushes the step's rollouts again)."""
        from cluster.transport.queue import Producer, ServerLost, setup_run

        if self.server is not None and not self.server.running:
            self.server.start()   # same port and directory
        try:
            Producer(self.address, self.cfg.queue).close()   # the run's marker is still there
            lost = isinstance(e, ServerLost)
        except ServerLost:
            lost = True
        self._recovered("queue_lost" if lost else "queue_restarted", _reason(e))
        if lost:
            log.error("the queue server lost this run's stream: setting it up again and re-sending the step")
            setup_run(self.address, self.cfg.queue.reconnect_s)
            self.learner.call("attach_queue", dataclasses.asdict(self.address))
            self.graders.close()  # their producers belong to the lost run
            self.graders = self._new_graders()
            self.graders.wait_ready()
            self._write_pids()
        return lost

    def _log_event(self, event: str, **fields: Any) -> None:
        """One ledger line, flushed at once: it must survive a crash of this process."""
        if self._ledger is None:
            return
        self._ledger.write(json.dumps({"event": event, "step": self.step + 1, **fields}) + "\n")
        self._ledger.flush()

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        rollouts = self._gather(self.generate(self.eval_prompts, method="evaluate"))
        groups, _ = self.eval_graders.score(rollouts)
        correct = [np.asarray(g.components["correct"]) > 0.5 for g in groups]
        lengths = [len(x.token_ids) for r in rollouts for x in r.responses]
        neg_logp = np.concatenate([-np.asarray(x.logprobs, dtype=np.float64) for r in rollouts for x in r.responses]) \
            if lengths else np.zeros(0)
        return {"eval/accuracy_avg": float(np.mean(np.concatenate(correct))) if correct else 0.0,
                "eval/accuracy_pass": float(np.mean([c.any() for c in correct])) if correct else 0.0,
                "eval/length_mean": float(np.mean(lengths)) if lengths else 0.0,
                "eval/entropy_sampled": float(neg_logp.mean()) if neg_logp.size else 0.0,
                "eval/problems": float(len(groups))}

    def _log_eval(self, step: int, stats: dict[str, float]) -> None:
        self._last_eval = stats
        self._write(step, dict(stats))

    # ------------------------------------------------------------------ end of a step
    def end_step(self, step: int) -> None:
        cfg = self.cfg
        rec, self.record = self.record, StepRecord()
        self.step = step + 1
        st = dict(rec.stats)
        for k, v in rec.phases.items():
            st[f"time/{k}_s"] = v
        st["time/step_s"] = sum(rec.phases.values())
        if st.get("generator/seconds"):
            st["generator/tokens_per_s"] = st["generator/tokens"] / st["generator/seconds"]
        if rec.phases.get("train") and st.get("learner/tokens"):
            st["learner/tokens_per_s"] = st["learner/tokens"] / rec.phases["train"]
        st["learner/version"] = float(self.version)
        last = step + 1 == cfg.run.steps
        if cfg.run.eval_every and ((step + 1) % cfg.run.eval_every == 0 or last):
            with self.phase("eval"):
                ev = self.evaluate()
            self._last_eval = ev
            st.update(ev)
        self._write(step + 1, st)
        self._progress(st)
        if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0 and not last:
            self.save_checkpoint(step + 1)

    def _write(self, step: int, st: dict[str, float]) -> None:
        from cluster.observe.metrics import STEP_STATS, STALENESS_PREFIX

        st = {k: float(v) for k, v in st.items() if isinstance(v, (int, float))}
        st["step"] = float(step)
        if "reward/mean" in st:
            st["train/reward_mean"] = st["reward/mean"]
        if "reward/accuracy" in st:
            st["train/accuracy_avg"] = st["reward/accuracy"]
        if "reward/kept_frac" in st:
            st["sampling/drop_share"] = 1.0 - st["reward/kept_frac"]
        for k in ("queue/produced", "queue/consumed", "queue/dropped_stale"):
            if k in st:  # cumulative per consumer -> this step's increment
                cur = st[k]
                st[k] = max(cur - self._queue_prev.get(k, 0.0), 0.0)
                self._queue_prev[k] = cur
        exported = {k: v for k, v in st.items()
                    if (k in STEP_STATS or k.startswith(STALENESS_PREFIX)) and (math.isfinite(v) or k != "entropy/mean")}
        try:
            st.update(self.exporter.record(step, exported))
        except ValueError as e:
            log.warning("metrics: %s", e)
        self._metrics_file.write(json.dumps(st) + "\n")
        self._metrics_file.flush()

    def _progress(self, st: dict[str, float]) -> None:
        if self._bar is None:
            return
        self._bar.update(1)
        self._bar.set_postfix({"reward": f"{st.get('reward/mean', float('nan')):.3f}",
                               "acc": f"{self._last_eval.get('eval/accuracy_avg', float('nan')):.3f}",
                               "H": f"{st.get('entropy/mean', float('nan')):.3f}",
                               "tok/s": f"{st.get('generator/tokens_per_s', 0):.0f}"})

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int) -> Path:
        ckdir = self.run_dir / CHECKPOINTS
        tmp, final = ckdir / f".tmp-step-{step:06d}", ckdir / f"step-{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.learner.call("save", str(tmp))
        state = {"step": step, "version": self.version, "data": self.data.state_dict(),
                 "queue": self.learner.call("queue_state")[0], "run_id": self.run_id}
        (tmp / RUN_STATE).write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # atomic: a checkpoint dir either has everything or does not exist
        for old in sorted(ckdir.glob("step-*"))[:-self.cfg.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s", final)
        return final

    def _restore(self) -> None:
        ck = latest_checkpoint(self.run_dir)
        if ck is None:
            log.warning("--resume %s: no checkpoint yet, starting from step 0", self.run_dir)
            return
        state = json.loads((ck / RUN_STATE).read_text())
        self.learner.call("load", str(ck))
        self.learner.call("load_queue_state", state["queue"])
        self.data.load_state_dict(state["data"])
        self.version, self.start_step = int(state["version"]), int(state["step"])
        self.step = self.start_step
        from cluster.transport.queue import Producer
        with Producer(self.address, self.cfg.queue) as p:
            self._leftover = int(p.depth()["queue/depth"])  # delivered or not, never acked (acked = deleted)
        self.sync_weights()  # the generators start from the checkpoint's weights
        self.record = StepRecord()
        log.info("resumed from %s at step %d, weights version %d; %d groups left on the stream are trained in "
                 "the first step", ck, self.start_step, self.version, self._leftover)

    def finish(self) -> None:
        from cluster.observe.report import write_report

        if self.cfg.run.steps > self.start_step:
            self.save_checkpoint(self.cfg.run.steps)
        if self._metrics_file:
            self._metrics_file.flush()
        path = write_report(self.run_dir)
        log.info("report %s", path)
        print(f"run directory: {self.run_dir}\nreport: {path}")


def _reason(e: BaseException) -> str:
    """`Type: first line` of what failed, without Ray's wrapping and traceback."""
    cause = getattr(e, "cause", None) or e
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


def _started_cluster() -> str | None:
    """RAY_ADDRESS, or the cluster a `ray start` on this machine recorded; None when there is neither (a
    bare `ray.init(address="auto")` would also join any other process's private local Ray)."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    from ray._private.services import find_bootstrap_address

    return find_bootstrap_address(None)


def merge_rank_stats(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Learner statistics of all ranks -> one dict: counts summed, times maxed, the rest token-weighted."""
    if len(per_rank) == 1:
        return dict(per_rank[0])
    weights = np.array([max(r.get("tokens", 0.0), 0.0) for r in per_rank])
    weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(per_rank), 1 / len(per_rank))
    out: dict[str, float] = {}
    for k in set().union(*per_rank):
        vals = [r[k] for r in per_rank if k in r]
        if k in _SUMMED or k.startswith("queue/"):
            out[k] = float(sum(vals))
        elif k.startswith("time/"):
            out[k] = float(max(vals))
        else:
            ws = [w for r, w in zip(per_rank, weights) if k in r]
            finite = [(v, w) for v, w in zip(vals, ws) if math.isfinite(v)]
            tot = sum(w for _, w in finite)
            out[k] = float(sum(v * w for v, w in finite) / tot) if tot > 0 else float("nan")
    return out
