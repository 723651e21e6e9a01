"""`forkrl bench learner-memory`: the learner at length, on the tiny model (random weights), one learner step
each: the old-log-prob pass (no grad) + forward + backward + optimizer step of a real 1-rank DeepSpeed
ZeRO-2 `Trainer` (learner.worker), with learner.micro_batch_tokens large enough that the step is ONE
micro-batch (the attention layout is what is measured, not the splitting), algorithm.tis_cap set so the
old-log-prob pass runs (learner.step.single_pass is off).

learner.memory_growth
  value    peak resident memory per token of a step whose micro-batch holds ONE 32,768-token row (a 64-token
           prompt and one response);
  baseline the same for 32 rows of 1,024 tokens (a 64-token prompt and one response each): the same tokens.
  Method: each side in a fresh Python process; after set-up and a warm-up step on a small batch, writing 5
  to /proc/self/clear_refs sets VmHWM to VmRSS, the step runs, and VmHWM - VmRSS (read just before) is its
  peak, divided by the step's tokens. A dense [B, 1, L, L] mask grows this with L (32x for these rows);
  linear attention memory keeps it flat. Target: ratio <= 1.5.

learner.shared_prompt_speedup
  value    response tokens per second of a step on ONE row holding a 512-token prompt and 15 responses of
           ~1,000 tokens (lengths 960-1,040; block-sparse: each response attends to the prompt and itself);
  baseline the same 15 (prompt, response) sequences as 15 separate rows (15 groups of one response).
  Method: both batches in one process, after a warm-up step of each; ROUNDS rounds alternate (baseline,
  value), each side reports its median and paired_ratio_median is the median of the per-round ratios (cancels
  load drifts between rounds). The packed row does strictly less work (the prompt's projections and MLPs
  once, not 15 times); a kernel that computed the 15.5k x 15.5k square would lose. Target: ratio >= 1.0.

The machine is shared (2 cores): run it when the box is quiet; the load average is reported in each row.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

from cluster.tools.bench import row

CASES = ("memory_growth", "shared_prompt_speedup")
LONG, SHORT, PROMPT = 32768, 1024, 64
ROUNDS = 3


def run(case: str | None = None) -> Iterator[dict]:
    if case is not None and case not in CASES:
        raise KeyError(f"unknown learner-memory case {case!r}; choose from {', '.join(CASES)}")
    if case in (None, "memory_growth"):
        long, short = _child("memory", "long"), _child("memory", "short")
        yield row("learner.memory_growth", long["kib_per_token"], short["kib_per_token"], "KiB/token",
                  f"1x{LONG} vs {LONG // SHORT}x{SHORT} tokens, tiny model, fwd+bwd+old-logp", "ratio <= 1.5",
                  peak_mib={"long": long["peak_kib"] / 1024, "short": short["peak_kib"] / 1024},
                  step_s={"long": long["step_s"], "short": short["step_s"]}, load=os.getloadavg()[0])
    if case in (None, "shared_prompt_speedup"):
        res = _child("speed", "both")
        yield row("learner.shared_prompt_speedup", res["packed_tps"], res["separate_tps"], "response tokens/s",
                  "512-token prompt + 15 x ~1k responses: one row vs 15 rows, tiny model, fwd+bwd+old-logp",
                  "ratio >= 1.0", paired_ratio_median=res["paired_ratio_median"], rounds=ROUNDS,
                  load=os.getloadavg()[0])


def _child(kind: str, which: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "cluster.tools.bench.learner_memory", kind, which],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"learner-memory {kind} {which} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- the child

def _groups(prompt_len: int, lengths: list[list[int]], seed: int = 0, same_prompt: bool = False):
    """ScoredGroups: group k has responses of lengths[k] tokens (on one shared prompt when same_prompt)."""
    import numpy as np

    from cluster.types import Response, Rollout, ScoredGroup

    rng = np.random.default_rng(seed)
    shared = rng.integers(3, 250, prompt_len).astype(np.int32)
    out = []
    for k, lens in enumerate(lengths):
        prompt = shared if same_prompt else rng.integers(3, 250, prompt_len).astype(np.int32)
        resps = [Response(rng.integers(3, 250, n).astype(np.int32), np.full(n, -5.0, np.float32)) for n in lens]
        adv = np.where(np.arange(len(lens)) % 2 == 0, 1.0, -1.0).astype(np.float32)
        out.append(ScoredGroup(Rollout(f"g{k}", f"p{k}", prompt, "", resps, 0), np.zeros(len(lens), np.float32),
                               adv, [None] * len(lens)))
    return out


def _trainer(max_len: int):
    from cluster.config import Config
    from cluster.data.models import build_tiny
    from cluster.runtime import cache_dir, setup_env
    from cluster.transport.weightsync import free_port
    from learner.worker import Trainer

    setup_env()
    model = str(build_tiny(str(cache_dir("models", "tiny-random")), task="arith", sft_steps=0))
    cfg = Config()
    cfg.learner.micro_batch_tokens = 40_000          # the whole step in one micro-batch
    cfg.learner.zero_stage, cfg.learner.lr = 2, 1e-4
    cfg.algorithm.tis_cap = 2.0                      # the old-log-prob pass runs
    cfg.rollout.max_new_tokens = max_len
    t = Trainer(cfg, model, 0, 1, "127.0.0.1", free_port("127.0.0.1"))
    t.setup()
    return t


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _memory(which: str) -> dict:
    if which == "long":
        groups = _groups(PROMPT, [[LONG - PROMPT + 1]])
    else:
        groups = _groups(PROMPT, [[SHORT - PROMPT + 1] for _ in range(LONG // SHORT)])
    t = _trainer(LONG)
    t.train_on(_groups(PROMPT, [[200], [150]], seed=1))   # warm-up: allocator, first-call costs
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                       # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    t.train_on(groups)
    step_s = time.perf_counter() - t0
    peak = _status_kib("VmHWM") - before
    return {"peak_kib": peak, "kib_per_token": peak / LONG, "step_s": step_s}


def _speed() -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    lens = [int(n) for n in rng.integers(960, 1041, 15)]
    packed = _groups(512, [lens], same_prompt=True)
    separate = _groups(512, [[n] for n in lens], same_prompt=True)
    resp_tokens = sum(lens)
    t = _trainer(max(lens))
    t.train_on(packed)
    t.train_on(separate)                                   # warm-up of both shapes
    sep_s, pk_s = [], []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        t.train_on(separate)
        sep_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        t.train_on(packed)
        pk_s.append(time.perf_counter() - t0)
    return {"packed_tps": resp_tokens / statistics.median(pk_s), "separate_tps": resp_tokens / statistics.median(sep_s),
            "paired_ratio_median": statistics.median(s / p for s, p in zip(sep_s, pk_s))}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "memory" and sys.argv[2] in ("long", "short"):
        print(json.dumps(_memory(sys.argv[2])))
    elif len(sys.argv) == 3 and sys.argv[1] == "speed":
        print(json.dumps(_speed()))
    else:
        sys.exit("usage: python -m cluster.tools.bench.learner_memory memory long|short | speed both")
