"""A seeded chaos soak (issue 21, item 7): one real `forkrl train` of the tiny model, hurt from outside at
seeded random times, resumed with `--resume` whenever a fault stops it, then checked through its ledger.

    python -m cluster.tools.soak --steps 200 --faults 24 --seed 0 [--doc docs/reliability.md]   (make soak)

Faults (KINDS): kill -9 of a generator, of a grader worker and of a grader actor, of the learner rank, of
the driver; a restart of the queue server (an external Valkey the harness owns) with its AOF and without
it (the AOF removed before the restart: the run's stream is gone); a stranger's bytes on the run's stream.
The ones in STOPS end the process (exit 3, or a dead driver) and the harness resumes the run.

The checks (`check`): no group trained twice across every segment of the run; every trained group was
generated; every pushed group was trained or counted as dropped (stale / malformed), groups lost = 0;
weights versions strictly increase within each segment and a resumed segment starts at its checkpoint's
version; the run finished every step with the final checkpoint at the last step; and the final weights
equal those of a clean run resumed from the first checkpoint after the last fault (`verify_resume`; the soak
samples with rollout.seeded, so both continuations draw the same responses).

The subprocess helpers (`Run`, `rows`, `total`, `ledger_checks`) are the fault tests' too (tests/faults)."""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

KINDS = ("generator", "grader_worker", "grader_actor", "learner", "driver", "queue_aof", "queue_lost",
         "stranger")
STOPS = {"grader_actor", "learner", "driver"}   # the process ends; the harness resumes the run
DESCRIBE = {
    "generator": "kill -9 of a generator actor",
    "grader_worker": "kill -9 of a grader's verification worker",
    "grader_actor": "kill -9 of a grader actor (exit 3, resumed)",
    "learner": "kill -9 of the learner rank (exit 3, resumed)",
    "driver": "kill -9 of the driver (resumed)",
    "queue_aof": "Valkey kill -9 + restart with its AOF",
    "queue_lost": "Valkey kill -9 + restart without persistence",
    "stranger": "a stranger's bytes XADDed to the run's stream",
}


class RunFailed(AssertionError):
    """A run did not do what the harness waited for (its log's tail is in the message)."""


class Run:
    """`forkrl train` in a subprocess, its output in a file (a pipe could fill and block it)."""

    def __init__(self, out: Path, *args: str, env: dict[str, str] | None = None):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.log_path = out / f"train-{len(list(out.glob('train-*.log')))}.log"
        cmd = [sys.executable, "-m", "cluster.cli", "train", *args]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    @property
    def run_dir(self) -> Path:
        runs = [p for p in self.out.iterdir() if p.is_dir()]
        assert len(runs) == 1, runs
        return runs[0]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict]:
        return events(self.run_dir)

    def wait_for(self, event: str, step: int, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RunFailed(f"forkrl train exited ({self.proc.returncode}) before {event} of step {step}:\n"
                                f"{self.log()[-5000:]}")
            try:
                hit = [e for e in self.events() if e["event"] == event and e["step"] == step]
            except (AssertionError, FileNotFoundError):
                hit = []
            if hit:
                return hit[-1]
            time.sleep(0.05)
        raise RunFailed(f"no {event} event for step {step} in {timeout} s:\n{self.log()[-5000:]}")

    def pids(self) -> dict:
        return json.loads((self.run_dir / "pids.json").read_text())

    def wait(self, timeout: float = 600) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RunFailed(f"forkrl train did not finish in {timeout} s:\n{self.log()[-5000:]}") from None
        self._log.close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "ledger.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(x) for x in lines if x.endswith("}")]   # the last line may be half written


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def total(recs: list[dict], key: str) -> float:
    return sum(r.get(key, 0.0) for r in recs)


def ledger_checks(evs: list[dict]) -> dict[int, list[str]]:
    """Invariants of any run: no group trained twice, every trained group was generated. Returns the
    trained ids by step (of the last attempt of each step)."""
    generated = {i for e in evs if e["event"] == "generated" for i in e["ids"]}
    trained = [i for e in evs if e["event"] == "trained" for i in e["ids"]]
    dupes = [i for i, n in collections.Counter(trained).items() if n > 1]
    assert not dupes, f"groups trained twice: {dupes}"
    assert set(trained) <= generated, set(trained) - generated
    return {e["step"]: e["ids"] for e in evs if e["event"] == "trained"}


def schedule(seed: int, steps: int, n: int, kinds: tuple[str, ...] = KINDS) -> list[tuple[int, str, float]]:
    """(after trained step, kind, delay s) for n faults: every kind once (n >= len(kinds)), the rest drawn;
    distinct steps in 2 .. 2/3 of the run (a resumed segment repeats steps back to its checkpoint, and a
    fault must find the run still going), delays uniform in [0, 1) s (the fault lands in any phase)."""
    rng = random.Random(seed)
    picks = list(kinds) * (n // len(kinds)) + rng.sample(list(kinds), n % len(kinds))
    rng.shuffle(picks)
    at = sorted(rng.sample(range(2, max(n + 2, 2 * steps // 3)), n))
    return [(s, k, round(rng.random(), 3)) for s, k in zip(at, picks)]


def alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie has); it may exit while /proc is read."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@dataclass
class Fault:
    kind: str
    step: int                 # injected after this step was trained
    t: float = 0.0            # monotonic time of the injection
    rc: int | None = None     # exit code of a process the fault stopped
    lost_s: float = 0.0       # (gap from the last trained step before it to the next one) - median gap
    detail: str = ""


@dataclass
class Soak:
    model: str
    steps: int
    seed: int
    n_faults: int
    out: Path
    kinds: tuple[str, ...] = KINDS
    extra: tuple[str, ...] = ()
    say: object = print
    faults: list[Fault] = field(default_factory=list)
    seen: dict = field(default_factory=dict)        # (segment, step) -> monotonic time its trained event was read
    runs: list[Run] = field(default_factory=list)
    verify: bool = True       # compare the final weights with a clean resume (verify_resume)
    strangers: int = 0
    queue_trained: set = field(default_factory=set)  # the run's trained set on the server, read at each stop
    lock: threading.Lock = field(default_factory=threading.Lock)

    def args(self) -> list[str]:
        return [f"model.path={self.model}", f"run.steps={self.steps}", "run.eval_every=0",
                "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=32",
                "reward.dynamic_sampling=false", "data.train_size=64", "queue.reconnect_s=3",
                "checkpoint.every=2", f"checkpoint.keep_last={self.steps // 2 + 1}", "rollout.seeded=true",
                "cluster.max_recoveries=1000", "rollout.num_generators=2", "sync.timeout_s=10",
                "cluster.num_cpus=4", f"run.seed={self.seed}", f"run.output_dir={self.out / 'runs'}", *self.extra]

    def _poll(self) -> None:
        if not self.runs:
            return
        run = self.runs[-1]
        try:
            evs = run.events()
        except (AssertionError, FileNotFoundError, StopIteration):
            return
        seg = 0
        for e in evs:
            seg += e["event"] == "start"
            if e["event"] == "trained" and (seg, e["step"]) not in self.seen:
                with self.lock:
                    self.seen[(seg, e["step"])] = time.monotonic()

    def _watch(self, stop: threading.Event) -> None:
        """Read the ledger every 50 ms for the whole soak: when each step's trained event appeared."""
        while not stop.wait(0.05):
            self._poll()

    def _wait_trained(self, step: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        run = self.runs[-1]
        while time.monotonic() < deadline:
            with self.lock:
                seen = list(self.seen)
            # one start event per process: segment = runs started; a resumed segment may begin past `step`
            if any(seg == len(self.runs) and s >= step for seg, s in seen):
                return
            if run.proc.poll() is not None:
                raise RunFailed(f"forkrl train exited ({run.proc.returncode}) before step {step} was trained:\n"
                                f"{run.log()[-5000:]}")
            time.sleep(0.05)
        raise RunFailed(f"step {step} not trained in {timeout} s:\n{run.log()[-5000:]}")

    def _start(self, server, resume: bool) -> Run:
        env = {"FORKRL_REDIS_PASSWORD": server.password}
        if resume:
            run = Run(self.out / "runs", "--resume", str(self.run_dir), env=env)
        else:
            run = Run(self.out / "runs", *self.args(), f"queue.url={server.url}", env=env)
        self.runs.append(run)
        return run

    def _inject(self, f: Fault, run: Run, server) -> None:
        for _ in range(20):   # a pid in pids.json may be a moment old (a replaced process; rewritten after)
            try:
                return self._inject_once(f, run, server)
            except ProcessLookupError:
                if run.proc.poll() is not None:
                    raise RunFailed(f"the run ended ({run.proc.returncode}) before the {f.kind} fault") from None
                time.sleep(0.25)
        raise RunFailed(f"{f.kind}: the process to kill is gone: {run.pids()}")

    def _inject_once(self, f: Fault, run: Run, server) -> None:
        p = run.pids()
        k = f.kind
        if k == "generator":
            os.kill(p["generators"][0], signal.SIGKILL)
        elif k == "grader_worker":
            os.kill(p["grader_workers"][0], signal.SIGKILL)
        elif k == "grader_actor":
            actor = _ppid(p["grader_workers"][0])   # the workers are the grader actor's children
            f.detail = f"grader actor pid {actor}"
            os.kill(actor, signal.SIGKILL)
        elif k == "learner":
            os.kill(p["learner"][0], signal.SIGKILL)
        elif k == "driver":
            os.kill(p["driver"], signal.SIGKILL)
        elif k in ("queue_aof", "queue_lost"):
            server.kill()
            if k == "queue_lost":
                for x in server.data_dir.iterdir():
                    if x.name.endswith(".aof") or x.name == "appendonlydir":
                        shutil.rmtree(x) if x.is_dir() else x.unlink()
            server.start()
        elif k == "stranger":
            with server.client() as c:
                c.xadd(f"forkrl:{self.run_dir.name}:groups", {"g": os.urandom(120)})
            self.strangers += 1
        f.t = time.monotonic()
        if k in STOPS:
            f.rc = run.wait(300) if k != "driver" else run.proc.wait(60)
            if k == "driver":
                run._log.close()
            # the run's actors die with their driver; until they are gone, a learner rank can still finish an
            # update the driver never logged (its ack adds the groups to the server's trained set)
            deadline = time.monotonic() + 60
            left = [x for x in [*p["generators"], *p["learner"], *p["grader_workers"]] if alive(x)]
            while left and time.monotonic() < deadline:
                time.sleep(0.2)
                left = [x for x in left if alive(x)]
            if left:
                raise RunFailed(f"processes left behind by the stopped run ({k}): {left}")
            time.sleep(0.5)   # a command a dead client had already sent is still executed by the server
            # the queue's own record of what the stopped process trained: an update can finish (its groups
            # acked and added to the trained set) after the last ledger line the dead driver wrote
            with server.client() as c:
                self.queue_trained |= {x.decode() for x in c.smembers(f"forkrl:{self.run_dir.name}:trained")}
            if k != "driver" and f.rc != 3:
                raise RunFailed(f"{k}: expected exit code 3, got {f.rc}:\n{run.log()[-5000:]}")
            self._start(server, resume=True)

    def run(self) -> dict:
        from cluster.transport.valkey import LocalServer, valkey_binary

        plan = schedule(self.seed, self.steps, self.n_faults, self.kinds)
        self.say(f"soak: {self.steps} steps, {len(plan)} faults (seed {self.seed}): {plan}")
        t0 = time.monotonic()
        server = LocalServer(valkey_binary(), aof=True, data_dir=self.out / "valkey").start()
        stop = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(stop,), daemon=True, name="soak-ledger")
        watcher.start()
        try:
            self._start(server, resume=False)
            self._wait_trained(1)
            self.run_dir = self.runs[-1].run_dir
            for step, kind, delay in plan:
                self._wait_trained(step)
                time.sleep(delay)
                f = Fault(kind, step)
                self._inject(f, self.runs[-1], server)
                self.faults.append(f)
                self.say(f"soak: {kind} after step {step}" + (f" (exit {f.rc}, resumed)" if f.rc is not None
                                                               else ""))
            last = self.runs[-1]
            rc = last.wait(1800)
            if rc != 0:
                raise RunFailed(f"the last segment exited {rc}:\n{last.log()[-5000:]}")
            self._poll()
            resumed = self.verify_resume(server) if self.verify else {}
        finally:
            stop.set()
            watcher.join()
            for r in self.runs:
                r.kill()
            server.stop()
        figures = self.check()
        figures.update(resumed)
        figures["wall_s"] = round(time.monotonic() - t0, 1)
        return figures

    def verify_resume(self, server) -> dict:
        """The final weights against a clean run resumed from the same checkpoint: a copy of the run directory
        cut back to the first checkpoint after the last fault (every fault lands in the first 2/3 of the
        run), resumed with `--resume` on an emptied queue server, to the last step. With rollout.seeded the
        two continuations sample the same responses, so their final weights must be equal (the figure is
        the largest absolute difference of any parameter, and the step resumed from)."""
        last = max((f.step for f in self.faults), default=0)
        have = sorted(int(p.name[5:]) for p in (self.run_dir / "checkpoints").iterdir()
                      if p.name.startswith("step-") and p.name[5:].isdigit() and (p / "run_state.json").is_file())
        start = next((c for c in have if c >= last + 2 and c < self.steps), None)
        if start is None:
            raise RunFailed(f"no checkpoint between the last fault (step {last}) and the end: {have}")
        copy = self.out / "resumed" / self.run_dir.name
        shutil.rmtree(copy.parent, ignore_errors=True)
        shutil.copytree(self.run_dir, copy, ignore=lambda d, names: [
            n for n in names if Path(d).name == "checkpoints" and n.startswith("step-") and n[5:].isdigit()
            and int(n[5:]) != start] + (["report"] if Path(d) == self.run_dir else []))
        server.kill()   # the same address (the run's config names it), an empty server: a clean restart
        for x in server.data_dir.iterdir():
            if x.name.endswith(".aof") or x.name == "appendonlydir":
                shutil.rmtree(x) if x.is_dir() else x.unlink()
        server.start()
        self.say(f"soak: resuming a copy of the run from step {start} with no faults")
        run = Run(self.out / "resumed", "--resume", str(copy), env={"FORKRL_REDIS_PASSWORD": server.password})
        try:   # not in self.runs: the ledger watcher times the soak's own steps only
            rc = run.wait(1800)
        finally:
            run.kill()
        if rc != 0:
            raise RunFailed(f"the clean resume exited {rc}:\n{run.log()[-5000:]}")
        a, b = (final_weights(d / "checkpoints" / f"step-{self.steps:06d}") for d in (self.run_dir, copy))
        assert a.keys() == b.keys(), (sorted(a.keys() ^ b.keys())[:5])
        diff = max(float((a[k] - b[k]).abs().max()) for k in a) if a else 0.0
        return {"resumed_from_step": start, "resumed_max_abs_diff": diff}

    def check(self) -> dict:
        """The ledger's proof. A pushed group that a process trained after the last ledger line it wrote
        (the driver killed between the update and its `trained` line) is found in the queue's trained set,
        read when the process stopped (`trained_unlogged`); its update is rolled back with the rest of that
        process's steps after its last checkpoint. The run ends at version `steps`, its last checkpoint is
        that step, and each segment's versions only move forward from its checkpoint's (the final weights
        are compared with a clean resume by `verify_resume`)."""
        evs = events(self.run_dir)
        ledger_checks(evs)
        segs: list[list[dict]] = []
        for e in evs:
            if e["event"] == "start":
                segs.append([])
            segs[-1].append(e)
        pushed: set[str] = set()
        for seg in segs:
            start = seg[0]
            versions = [e["version"] for e in seg if e["event"] == "trained"]
            assert all(b > a for a, b in zip(versions, versions[1:])), f"versions went backwards: {versions}"
            assert not versions or versions[0] == start["version"] + 1, (start, versions[:3])
            gen = {}
            for e in seg:
                if e["event"] == "generated":
                    gen[e["step"]] = e["ids"]
                elif e["event"] == "pushed" and e["step"] in gen:
                    pushed |= set(gen[e["step"]])
        trained = {i for e in evs if e["event"] == "trained" for i in e["ids"]}
        recs = rows(self.run_dir)
        train = [r for r in recs if "time/step_s" in r]
        stale = sum(max((r.get("queue/dropped_stale", 0) for r in part), default=0) for part in _parts(train))
        malformed = sum(max((r.get("queue/dropped_malformed", 0) for r in part), default=0)
                        for part in _parts(train))
        unlogged = (pushed - trained) & self.queue_trained   # trained by a process killed before its line
        lost = pushed - trained - unlogged
        assert len(lost) <= stale, f"pushed groups never trained nor dropped: {sorted(lost)[:10]} ({len(lost)})"
        assert malformed >= self.strangers, (malformed, self.strangers)
        last = segs[-1]
        assert [e for e in last if e["event"] == "trained"][-1]["version"] == self.steps
        assert max(int(r["step"]) for r in train) == self.steps
        ckpts = sorted(int(p.name[5:]) for p in (self.run_dir / "checkpoints").iterdir()
                       if p.name.startswith("step-") and p.name[5:].isdigit())
        assert ckpts and ckpts[-1] == self.steps, ckpts

        # time lost per fault: the gap around it minus the median gap between steps without a fault
        times = sorted(self.seen.values())
        gaps = [b - a for a, b in zip(times, times[1:])]
        hurt = set()
        for f in self.faults:
            before = max((t for t in times if t <= f.t), default=times[0])
            after = min((t for t in times if t > f.t), default=times[-1])
            hurt.add(before)
            f.lost_s = after - before
        clean = [b - a for a, b in zip(times, times[1:]) if a not in hurt] or gaps
        med = statistics.median(clean)
        for f in self.faults:
            f.lost_s = max(0.0, f.lost_s - med)
        recoveries = collections.Counter(e["kind"] for e in evs if e["event"] == "fault")
        by_kind = collections.defaultdict(list)
        for f in self.faults:
            by_kind[f.kind].append(f.lost_s)
        return {"steps": self.steps, "seed": self.seed, "faults": len(self.faults),
                "segments": len(segs), "median_step_s": round(med, 2),
                "faults_by_kind": {k: len(v) for k, v in sorted(by_kind.items())},
                "lost_s_by_kind": {k: round(statistics.mean(v), 1) for k, v in sorted(by_kind.items())},
                "recoveries": dict(sorted(recoveries.items())), "resumes": len(segs) - 1,
                "groups_pushed": len(pushed), "groups_trained": len(trained), "trained_unlogged": len(unlogged),
                "dropped_stale": stale,
                "dropped_malformed": malformed, "groups_lost": len(lost) - min(len(lost), stale)}


def final_weights(ckpt: Path) -> dict:
    """The fp32 parameters of a checkpoint (DeepSpeed's own consolidation, as `forkrl export`)."""
    import contextlib

    from cluster.driver.export import TAG

    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return {k: v.detach() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=TAG).items()}


def _parts(train: list[dict]) -> list[list[dict]]:
    """Metric rows split where a step number goes back (a resume): counters restart with each process."""
    parts: list[list[dict]] = [[]]
    for r in train:
        if parts[-1] and int(r["step"]) <= int(parts[-1][-1]["step"]):
            parts.append([])
        parts[-1].append(r)
    return parts


TABLE_START = "## Chaos soak"


def table(fig: dict, cmd: str) -> str:
    rec = ", ".join(f"{k} {v}" for k, v in fig["recoveries"].items()) or "none"
    lines = [TABLE_START, "",
             f"`{cmd}` (cluster/tools/soak.py): one run of the tiny model, {fig['steps']} steps, "
             f"{fig['faults']} faults at seeded random times (seed {fig['seed']}), {fig['resumes']} resumes; "
             f"{fig['wall_s']:.0f} s wall on the machine it ran on (median step {fig['median_step_s']} s). "
             f"Ledger: {fig['groups_pushed']} groups pushed, {fig['groups_trained']} trained, none twice "
             f"({fig['trained_unlogged']} more trained by a process killed before its ledger line, found "
             f"in the queue's trained set), "
             f"{fig['dropped_stale']} dropped stale, {fig['dropped_malformed']} malformed entries dropped, "
             f"**groups lost: {fig['groups_lost']}**; versions never went backwards within a segment; the "
             f"run ended at version {fig['steps']}. The driver's recovery events: {rec}. "
             + (f"Final weights against a clean run resumed from step {fig['resumed_from_step']} (no faults, "
                f"rollout.seeded): largest parameter difference {fig['resumed_max_abs_diff']:.3g}."
                if "resumed_from_step" in fig else ""), "",
             "| fault | injected | time lost per fault (mean, s) |", "|---|---|---|"]
    for k, n in fig["faults_by_kind"].items():
        lines.append(f"| {DESCRIBE[k]} | {n} | {fig['lost_s_by_kind'][k]} |")
    return "\n".join(lines) + "\n"


def write_doc(doc: Path, text: str) -> None:
    """Put the soak section at the end of docs/reliability.md (replacing the previous one); the fault
    tests' conftest keeps it when it rewrites the rest."""
    old = doc.read_text()
    head = old.split("\n" + TABLE_START)[0].rstrip("\n") + "\n"
    doc.write_text(head + "\n" + text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.tools.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--faults", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="work directory (default: a new one under /tmp)")
    ap.add_argument("--model", default=None, help="model directory (default: the tiny model, built if needed)")
    ap.add_argument("--doc", default=None, help="rewrite this file's soak table (docs/reliability.md)")
    a = ap.parse_args(argv)
    from cluster.runtime import cache_dir, setup_env

    setup_env()
    if a.model is None:
        from cluster.data.models import build_tiny

        a.model = str(build_tiny(str(cache_dir("models", "tiny-arith")), task="arith"))
    import tempfile

    out = Path(a.out or tempfile.mkdtemp(prefix="forkrl-soak-"))
    fig = Soak(a.model, a.steps, a.seed, a.faults, out).run()
    print(json.dumps(fig))
    if a.doc:
        write_doc(Path(a.doc), table(fig, f"make soak STEPS={a.steps} FAULTS={a.faults} SEED={a.seed}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
