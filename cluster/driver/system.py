"""What the training loops call, one `System` per `forkrl train`: it owns the run's state (weights versions,
the step, its record) and composes the run directory (rundir), placement and the actors (placement),
recovery (recovery) and the step statistics (stepstats)."""

from __future__ import annotations

import logging
import math
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cluster.config import Config
from cluster.data.paths import check_paths
from cluster.data.tasks import PromptStream
from cluster.driver import recovery
from cluster.driver.memory import check_gpu_memory
from cluster.driver.nosignal import NoSignal
from cluster.driver.placement import Actors, check_local_fit, start_ray
from cluster.driver.rundir import RunLog, latest_checkpoint, open_run_dir, run_state, save_checkpoint, write_pids
from cluster.driver.stepstats import StepRecord, merge_rank_stats, metrics_line, rollout_stats, step_stats
from cluster.split import split_even
from cluster.transport.weightsync import Deadlines
from cluster.types import Prompt, Rollout

log = logging.getLogger("forkrl")


class System:
    def __init__(self, cfg: Config, run_dir: Path, resume: bool):
        self.cfg, self.run_dir, self.resume = cfg, run_dir, resume
        self.run_id = run_dir.name
        self.deadlines = Deadlines.of(cfg.sync)
        self.version = 0          # weights version of the learner (one per RL step that updated)
        self.synced = 0           # version the generators hold
        self.start_step = 0
        self.step = 0             # steps completed
        self.record = StepRecord()
        self.no_signal = NoSignal(cfg.metrics.no_signal_steps)   # warns after steps in a row with nothing to learn
        self.recoveries = 0
        self.server = self.exporter = self.actors = self.run_log = self.trackers = None
        self._ray_started = False
        self._bar = None
        self._last_eval: dict[str, float] = {}
        self._queue_prev: dict[str, float] = {}
        self._pushed: list[Rollout] = []   # the step's rollouts, pushed again if the queue server lost them
        self._leftover = 0   # groups a stopped run left on the stream: the first resumed step trains them too
        self.phase_now = ("start", time.monotonic())   # the last phase entered and when (the watchdog's report)
        self.watchdog = None

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    @contextmanager
    def start(cls, cfg: Config, resume: str | None = None) -> Iterator["System"]:
        from cluster.runtime import setup_env, startup_gc

        setup_env()
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        check_paths(cfg)       # a missing model or data file, or actors this machine cannot hold, fail here:
        check_local_fit(cfg)   # before the run directory or any process exists
        check_gpu_memory(cfg)  # (a GPU config: weights + KV + buffers + learner state per GPU)
        cfg, run_dir = open_run_dir(cfg, resume)
        s = cls(cfg, run_dir, resume=bool(resume))
        try:
            with startup_gc():
                s._start()
        except BaseException:
            s.stop()
            if not resume:  # a start that failed leaves no run directory behind
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        try:
            yield s
        finally:
            s.stop()

    def _start(self) -> None:
        from cluster.observe.metrics import MetricsExporter
        from cluster.transport.queue import open_queue

        cfg = self.cfg
        self._load_data()  # a bad dataset row fails here, before any process starts
        log.info("run directory %s", self.run_dir)
        local, self._ray_started = start_ray(cfg)
        data_dir = str(self.run_dir / "queue") if cfg.queue.aof else None
        self.address, self.server = open_queue(cfg.queue, self.run_id, data_dir=data_dir)
        log.info("queue %s", self.address.display)
        self.exporter = MetricsExporter(cfg.metrics, run=self.run_id,
                                        info={"model": cfg.model.path, "task": cfg.data.task})
        (self.run_dir / "metrics_url").write_text(self.exporter.url + "\n")
        log.info("metrics at %s", self.exporter.url)
        self.actors = Actors(cfg, self.run_id, self.model_path, self.address, local)
        self.actors.start()
        self.write_pids()
        self.run_log = RunLog(self.run_dir)
        self._start_trackers()
        if self.resume:
            self._restore()
        self.log_event("start", resumed=self.resume, version=self.version)
        if cfg.run.eval_every and self.start_step == 0:
            self._log_eval(0, self.evaluate())
        from tqdm import tqdm
        self._bar = tqdm(total=cfg.run.steps, initial=self.start_step, desc="forkrl", unit="step",
                         dynamic_ncols=True)

    def _start_trackers(self) -> None:
        """metrics.trackers: a resumed run continues the tracker runs whose ids its run directory kept."""
        if not self.cfg.metrics.trackers:
            return
        from cluster.driver.rundir import public_config
        from cluster.observe.trackers import Trackers

        self.trackers = Trackers(self.cfg.metrics, self.run_dir, self.run_id)
        self.trackers.params(public_config(self.cfg).model_dump(mode="json"))

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

    def write_pids(self) -> None:
        write_pids(self.run_dir, self.actors.pids(self.server.pid if self.server else None))

    def log_event(self, event: str, **fields) -> None:
        """One ledger line for the step under way (none before the ledger is open)."""
        if self.run_log is not None:
            self.run_log.event(event, self.step + 1, **fields)

    def stop(self) -> None:
        import ray

        if self.watchdog is not None:
            self.watchdog.stop()
        if self._bar is not None:
            self._bar.close()
        if self.actors is not None:
            self.actors.stop()
        if self.exporter:
            self.exporter.close()
        if self.server:
            self.server.stop()
        if self.run_log is not None:
            self.run_log.close()
        if self.trackers is not None:
            self.trackers.close()
        if self._ray_started:
            ray.shutdown()

    # ------------------------------------------------------------------ steps of the loops
    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        self.phase_now = (name, time.monotonic())
        try:
            yield
        finally:
            self.record.phases[name] = self.record.phases.get(name, 0.0) + time.perf_counter() - t0

    def generate(self, prompts: list[Prompt], method: str = "generate") -> list:
        """Start sampling `prompts` split over the generators; returns the pending work for `collect`."""
        gens = self.actors.generators
        parts = split_even(prompts, len(gens))
        return [(i, p, getattr(gens[i], method).remote(p), method) for i, p in enumerate(parts) if p]

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
                why = recovery.reason(e)
        if lost:
            recovery.replace_generators(self, {i: ref for i, _, ref, _ in lost},
                                        f"generator died during {lost[0][3]}: {why}")
            gens = self.actors.generators
            out += self._gather([(i, p, getattr(gens[i], m).remote(p), m) for i, p, _, m in lost])
        return out

    def collect(self, pending: list) -> list[Rollout]:
        rollouts = self._gather(pending)
        self.log_event("generated", ids=[r.group_id for r in rollouts])
        self.record.count("generator/tokens", sum(len(x.token_ids) for r in rollouts for x in r.responses))
        self.record.count("generator/seconds", max((r.timing.get("generate_s", 0.0) for r in rollouts), default=0.0))
        self.record.stats.update(rollout_stats(rollouts, self.version))
        return rollouts

    def grade_and_push(self, rollouts: list[Rollout]) -> int:
        """Score the groups and push the kept ones onto the stream; returns how many were kept."""
        from cluster.transport.queue import QueueError

        self._pushed = rollouts
        try:
            groups, stats = self.actors.graders.score(rollouts, push=True, return_groups=False)
        except QueueError as e:
            recovery.recover_queue(self, e)
            return self.grade_and_push(rollouts)  # a group already admitted is not added twice
        self.record.stats.update(stats)
        kept = int(stats.get("reward/groups_kept", 0))
        self.log_event("pushed", kept=kept)
        return kept

    def refill(self, kept: int) -> int:
        """DAPO dynamic sampling with refill (cluster/driver/refill.py): sample and grade new prompts until
        rollout.prompts_per_step groups with signal are on the stream, at most reward.max_gen_batches
        generation batches in the step; their time counts in the generate and grade phases (in the async
        loop the refill waits behind the next batch's generation: time the learner is not hidden behind).
        Returns the groups kept; sampling/refill_rounds is the number of refill rounds."""
        from cluster.driver.refill import refill
        from reward.group import merge_stats

        cfg, st = self.cfg, self.record.stats

        def sample(n: int) -> int:
            first = dict(st)
            pushed = self._pushed
            with self.phase("generate"):
                rollouts = self.collect(self.generate(self.data.next(n)))
            with self.phase("grade"):
                got = self.grade_and_push(rollouts)
            self._pushed = pushed + rollouts   # a lost queue gets every round's groups pushed again
            reward = merge_stats([{k: v for k, v in first.items() if k.startswith("reward/")},
                                  {k: v for k, v in st.items() if k.startswith("reward/")}])
            st.update({k: v for k, v in first.items() if not k.startswith("generator/")})  # the first batch's
            st.update(reward)                                                  # sample; reward/* over all
            return got

        rounds = 0
        if cfg.reward.dynamic_sampling:
            kept, rounds = refill(kept, cfg.rollout.prompts_per_step, cfg.reward.max_gen_batches, sample)
        st["sampling/refill_rounds"] = float(rounds)
        return kept

    def train(self, n_groups: int) -> None:
        """Every rank reads its share of the n_groups fresh groups from the queue and trains on them."""
        from cluster.transport.queue import QueueError

        learner = self.actors.learner
        n_groups, self._leftover = n_groups + self._leftover, 0
        if n_groups == 0:
            log.warning("no group kept this step (all groups had equal rewards): no update")
            return
        shares = [len(x) for x in split_even(range(n_groups), self.cfg.learner.num_ranks)]
        try:
            per_rank = learner.call_each("train_step", [(n, self.version, self.cfg.run.max_staleness)
                                                        for n in shares])
        except QueueError as e:
            lost = recovery.recover_queue(self, e)
            if learner.call("status")[0]["version"] == self.version:  # no update: train again
                return self.train(self.grade_and_push(self._pushed) if lost else n_groups)
            log.warning("the step's update happened before the queue failed (only its ack was lost)")
            per_rank = [{}]
        self.record.stats.update(merge_rank_stats(per_rank))
        self.version += 1
        self.log_event("trained", version=self.version, ids=[i for r in learner.call("status") for i in r["trained"]])

    def sync_weights(self) -> None:
        import ray
        from ray.exceptions import RayError

        from cluster.transport.weightsync import SyncError

        if self.synced == self.version:
            return  # nothing new to publish
        # rollout.forking_temperature.threshold=live: the learner's tau of this step travels with the weights
        live = self.cfg.rollout.forking_temperature.threshold == "live"
        tau = self.record.stats.get("tau") if live else None
        gen_refs = dict(enumerate(g.receive_weights.remote(tau) for g in self.actors.generators))
        try:
            learn = self.actors.learner.call("sync_weights")  # any failure but the sync's own stops the run
        except SyncError as e:
            return recovery.sync_failed(self, gen_refs, f"weight sync to version {self.version} failed: "
                                                        f"{recovery.reason(e)}")
        got = []
        for i, ref in gen_refs.items():
            try:
                got.append(ray.get(ref, timeout=self.deadlines.apply_s))
            except RayError as e:  # the broadcast went out but this generator did not apply it
                return recovery.sync_failed(self, gen_refs, f"generator {i} did not apply version {self.version}: "
                                                            f"{recovery.reason(e)}")
        st = self.record.stats
        st["sync/duration_s"] = float(learn[0]["total_s"])
        st["sync/bytes"] = float(learn[0].get("bytes", 0.0))
        versions = {int(x["version"]) for x in got}
        if versions != {self.version}:
            raise RuntimeError(f"generators hold versions {sorted(versions)} after publishing {self.version}")
        self.synced = self.version

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """The held-out evaluation (cluster/driver/evaluation.py, the evaluator `forkrl eval` runs too)."""
        from cluster.driver.evaluation import eval_graders, evaluate

        return evaluate(self.eval_prompts, lambda ps: self._gather(self.generate(ps, method="evaluate")),
                        eval_graders(self.cfg, self.actors.graders))

    def _log_eval(self, step: int, stats: dict[str, float]) -> None:
        self._last_eval = stats
        self._write(step, dict(stats))

    # ------------------------------------------------------------------ end of a step
    def end_step(self, step: int) -> None:
        cfg = self.cfg
        rec, self.record = self.record, StepRecord()
        self.step = step + 1
        st = step_stats(rec, self.version)
        last = step + 1 == cfg.run.steps
        if cfg.run.eval_every and ((step + 1) % cfg.run.eval_every == 0 or last):
            with self.phase("eval"):
                ev = self.evaluate()
            self._last_eval = ev
            st.update(ev)
        warning = self.no_signal.update(st)
        if warning:
            log.warning(warning)
        st.update(self.no_signal.stats())
        self._write(step + 1, st)
        self._progress(st)
        if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0 and not last:
            self.save_checkpoint(step + 1)
        if self.watchdog is not None:
            self.watchdog.beat()

    def start_watchdog(self):
        """The driver's hang watchdog (cluster/driver/watchdog.py), started now: call it as the loop starts."""
        from cluster.driver.watchdog import Watchdog

        c = self.cfg.cluster
        self.watchdog = Watchdog(self, c.watchdog_multiple, c.watchdog_floor_s, c.watchdog_grace_s)
        self.watchdog.start()
        return self.watchdog

    def _write(self, step: int, st: dict[str, float]) -> None:
        from cluster.observe.metrics import STALENESS_PREFIX, STEP_STATS

        st = metrics_line(st, step, self._queue_prev)
        exported = {k: v for k, v in st.items()
                    if (k in STEP_STATS or k.startswith(STALENESS_PREFIX)) and (math.isfinite(v) or k != "entropy/mean")}
        try:
            st.update(self.exporter.record(step, exported))
        except ValueError as e:
            log.warning("metrics: %s", e)
        self.run_log.stats(st)
        if self.trackers is not None:
            self.trackers.log(step, st)

    def _progress(self, st: dict[str, float]) -> None:
        if self._bar is None:
            return
        self._bar.update(1)
        postfix = {"reward": f"{st.get('reward/mean', float('nan')):.3f}",
                   "acc": f"{self._last_eval.get('eval/accuracy_avg', float('nan')):.3f}",
                   "H": f"{st.get('entropy/mean', float('nan')):.3f}",
                   "tok/s": f"{st.get('generator/tokens_per_s', 0):.0f}"}
        if warning := self.no_signal.postfix():   # the no-signal warning stands until a step has signal again
            postfix["no signal"] = warning
        self._bar.set_postfix(postfix)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int) -> Path:
        learner = self.actors.learner
        state = {"step": step, "version": self.version, "data": self.data.state_dict(),
                 "queue": learner.call("queue_state")[0], "run_id": self.run_id}
        path = save_checkpoint(self.run_dir, step, self.cfg.checkpoint.keep_last,
                               lambda d: learner.call("save", d), state)
        if self.cfg.checkpoint.save_hf:
            from cluster.driver.export import HF_DIR, export_checkpoint

            export_checkpoint(path, path / HF_DIR, self.model_path, self.cfg.model.dtype,
                              {"run": self.run_id, "step": step, "version": self.version})
        return path

    def _restore(self) -> None:
        from cluster.transport.queue import Producer

        ck = latest_checkpoint(self.run_dir)
        if ck is None:
            log.warning("--resume %s: no checkpoint yet, starting from step 0", self.run_dir)
            return
        state = run_state(ck)
        learner = self.actors.learner
        learner.call("load", str(ck))
        learner.call("load_queue_state", state["queue"])
        self.data.load_state_dict(state["data"])
        self.version, self.start_step = int(state["version"]), int(state["step"])
        self.step = self.start_step
        with Producer(self.address, self.cfg.queue) as p:
            # delivered or not, never acked (acked = deleted); not a stranger's bytes or a group a read drops
            self._leftover = p.trainable(self.version, self.cfg.run.max_staleness)
        self.sync_weights()  # the generators start from the checkpoint's weights
        self.record = StepRecord()
        log.info("resumed from %s at step %d, weights version %d; %d groups left on the stream are trained in "
                 "the first step", ck, self.start_step, self.version, self._leftover)

    def finish(self) -> None:
        from cluster.observe.report import write_report

        if self.cfg.run.steps > self.start_step:
            self.save_checkpoint(self.cfg.run.steps)
        if self.run_log is not None:
            self.run_log.metrics.flush()
        path = write_report(self.run_dir)
        log.info("report %s", path)
        if self.trackers is not None:
            self.trackers.images(self.step, path.parent)
        print(f"run directory: {self.run_dir}\nreport: {path}")
