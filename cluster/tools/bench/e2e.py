"""`forkrl bench e2e`: whole RL steps of `forkrl train`, timed from its own metrics.jsonl.

e2e.async_overlap (case tiny): generators and the learner on disjoint cores (one each, as a GPU cluster
gives them disjoint GPUs; every thread of the generator actor is pinned to core 0, of the learner rank to
core 1). The async loop (max_staleness 1) runs; value = its mean step time, baseline = the mean over the same
steps of max(generation time, training time) measured in that run (generation: the vLLM generate call inside
the actor; training: the learner's train phase). Target <= 1.10. The sync loop on the same placement is
reported beside it (about generation + training).

e2e.vs_trl (cases tiny, smollm2): trained response tokens per second of a whole step, forkrl (sync loop,
on-policy, vLLM generation + packed training, 2 threads per actor) over TRL's GRPOTrainer (pinned in the
`bench` extra; HF generate + padded training, all cores) on the same CPU, model, float32, prompts (16 arith
problems per step), group size 8, at most 64 completion tokens, one optimizer update per step, no KL, no
dynamic sampling. Both count every response token of the 128 completions of a step; the first step is
warm-up and not counted. Target >= 2.0 for smollm2; tiny is reported.

Each side runs in its own subprocess (its own Ray, its own torch threads).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cluster.tools.bench import row

PROMPTS, GROUP, NEW_TOKENS = 16, 8, 64
STEPS = {"tiny": 6, "smollm2": 3}       # forkrl steps per run (the first is warm-up)
TRL_STEPS = {"tiny": 3, "smollm2": 2}   # TRL takes ~166 s per step on SmolLM2-135M here
TARGETS = {"smollm2": ">= 2.0", "tiny": "report"}
COMMON = ["run.eval_every=0", "checkpoint.every=0", "reward.dynamic_sampling=false", "model.dtype=float32",
          f"rollout.prompts_per_step={PROMPTS}", f"rollout.group_size={GROUP}",
          f"rollout.max_new_tokens={NEW_TOKENS}", "learner.mini_batches=1", "learner.epochs=1"]
SYNC_LOOP = ["run.max_staleness=0", "rollout.threads=2", "learner.threads=2"]   # vs_trl's forkrl side


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
    yield row("e2e.async_overlap", step, bound, "s/step", "tiny", "<= 1.10",
              generate_s=round(_mean(a, "generator/seconds"), 3), train_s=round(_mean(a, "time/train_s"), 3),
              phases=parts, sync_loop_step_s=round(_mean(s, "time/step_s"), 3),
              sync_loop_generate_plus_train_s=round(_mean(s, "generator/seconds") + _mean(s, "time/train_s"), 3))


def _trl_child(model: str, steps: int, out: str) -> None:
    """The TRL side (runs in its own process): GRPOTrainer on the same prompts; writes step times and tokens."""
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
                      use_cpu=True, bf16=False, max_steps=steps, logging_steps=1, report_to="none",
                      save_strategy="no", shuffle_dataset=False, seed=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
                          reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    lengths = [float(h["completions/mean_length"]) for h in trainer.state.log_history if "completions/mean_length" in h]
    times = np.diff([t0] + [m[0] for m in marks])
    Path(out).write_text(json.dumps({"step_s": times.tolist(), "mean_length": lengths}))


def vs_trl(case: str, model: str) -> Iterator[dict]:
    with tempfile.TemporaryDirectory() as d:
        rows = train_run(model, [f"run.steps={STEPS[case]}", *SYNC_LOOP], Path(d) / "f")[1:]
        out = Path(d) / "trl.json"
        subprocess.run([sys.executable, "-m", "cluster.tools.bench.e2e", "trl", model, str(TRL_STEPS[case]), str(out)],
                       check=True)
        trl = json.loads(out.read_text())
    ours = sum(r["learner/tokens"] for r in rows) / sum(r["time/step_s"] for r in rows)
    steps, lengths = trl["step_s"][1:], trl["mean_length"][1:]
    theirs = sum(n * PROMPTS * GROUP for n in lengths) / sum(steps)
    yield row("e2e.vs_trl", ours, theirs, "trained tokens/s", case, TARGETS[case],
              forkrl_step_s=round(_mean(rows, "time/step_s"), 2), trl_step_s=round(float(np.mean(steps)), 2),
              forkrl_phases={k: round(_mean(rows, f"time/{k}_s"), 2) for k in ("generate", "grade", "train", "sync")})


def run(case: str | None = None) -> Iterator[dict]:
    from cluster.tools.bench.generate import bench_model

    cases = [case] if case else ["tiny", "smollm2"]
    for c in cases:
        if c not in TARGETS:
            raise KeyError(f"unknown case {c!r}; choose from {', '.join(TARGETS)}")
        model = bench_model(c)
        if c == "tiny":
            yield from async_overlap(model)
        yield from vs_trl(c, model)


if __name__ == "__main__" and sys.argv[1:2] == ["trl"]:
    _trl_child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
