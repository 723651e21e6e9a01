"""`forkrl bench loss`: the cost of the forking-token machinery on 8192 response tokens x vocab 49152
(SmolLM2's) float32 logits (1.5 GiB), on CPU.

loss.forking_overhead
  value    median seconds of one loss + backward of the DAPO loss (token-mean, clip 0.2/0.28) with the
           full-vocabulary entropy, the top-20% forking mask (micro scope) and every statistic
           (learner.losses.compute_loss, stats=True);
  baseline median seconds of the same DAPO loss + backward computing only the sampled-token log-probs
           (rho = 1, stats=False: no entropy, no mask, no statistics).
  Both run through the production kernels (learner.tokenstats.backend(): torch.compile'd chunks;
  chunk = LearnerConfig.logits_chunk) and write the logits gradient into one reused buffer, taken with
  torch.autograd.grad as the worker's lm_head matmul consumes it, on LearnerConfig.threads threads (a
  learner rank's OMP_NUM_THREADS). After two warm-up rounds (compilation) the rounds alternate (baseline,
  value); each side reports its median, and paired_ratio_median is the median of the per-round ratios,
  which cancels load changes between rounds. Target: ratio <= 1.05.

loss.entropy_peak_memory
  value    extra peak memory (MiB) of the chunked entropy: token_stats(with_entropy=True) under no_grad;
  baseline the same for the naive entropy as verl computes it (softmax over the full [N, V] logits, then
           logsumexp - sum(p * z)), which materialises [N, V] float32 temporaries.
  Method: every measurement runs in a fresh Python process, so no allocator cache or earlier peak of
  another measurement is counted. It fills the logits in place, runs the computation on a 64-token slice
  (so compilation is not counted, but every full-size allocation is), resets the kernel's peak-RSS counter
  (writing 5 to /proc/self/clear_refs sets VmHWM to the current VmRSS), runs it on all tokens and reports
  VmHWM - VmRSS read just before. RSS counts every page the process touches, torch's allocations included, which
  tracemalloc would not see. Target: ratio <= 0.125.

The machine is shared (2 cores): timings taken while other work runs are noisy; both sides of a ratio are
interleaved in the same run, which cancels slow drifts but not bursts.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import torch

from cluster.tools.bench import row

N_TOKENS, VOCAB = 8192, 49152
RESPONSE_LEN = 128
ROUNDS = 9
SHAPE = f"{N_TOKENS}x{VOCAB}-float32"
CASES = ("forking_overhead", "entropy_peak_memory")


def run(case: str | None = None) -> Iterator[dict]:
    if case is not None and case not in CASES:
        raise KeyError(f"unknown loss case {case!r}; choose from {', '.join(CASES)}")
    if case in (None, "entropy_peak_memory"):
        naive, chunked = _peak_in_subprocess("naive"), _peak_in_subprocess("chunked")
        eager = _peak_in_subprocess("chunked", FORKRL_COMPILE="0")   # the no-compiler fallback, for reference
        yield row("loss.entropy_peak_memory", chunked, naive, "MiB", SHAPE, "ratio <= 0.125",
                  method="VmHWM - VmRSS after clear_refs, fresh process per measurement",
                  eager_fallback_mib=eager)
    if case in (None, "forking_overhead"):
        threads = torch.get_num_threads()
        try:
            result = _forking_overhead()
        finally:
            torch.set_num_threads(threads)   # later benchmarks in this process keep their setting
        yield result


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N_TOKENS, VOCAB, generator=g).mul_(2.5)     # in place: no second 1.5 GiB tensor
    tokens = torch.randint(0, VOCAB, (N_TOKENS,), generator=g)
    return logits, tokens, g


def _forking_overhead() -> dict:
    from cluster.config import AlgorithmConfig, LearnerConfig
    from learner.losses import BatchCounts, compute_loss
    from learner.masks import selected_count
    from learner.tokenstats import backend, token_stats

    lc = LearnerConfig()
    chunk = lc.logits_chunk
    torch.set_num_threads(lc.threads)   # what a learner rank runs with (OMP_NUM_THREADS)
    logits, tokens, g = _inputs()
    with torch.no_grad():
        logp, _ = token_stats(logits, tokens, chunk=chunk, with_entropy=False)
    old_logp = logp + torch.randn(N_TOKENS, generator=g) * 0.1
    seq_ids = torch.arange(N_TOKENS) // RESPONSE_LEN
    advantages = torch.randn(int(seq_ids[-1]) + 1, generator=g)[seq_ids]
    buffer = torch.empty(N_TOKENS * VOCAB)
    x = logits.requires_grad_()

    dapo = AlgorithmConfig(loss_agg="token-mean", clip_low=0.2, clip_high=0.28)
    forking = dapo.model_copy(update={"top_entropy_ratio": 0.2, "entropy_scope": "micro"})
    n_sel = selected_count(N_TOKENS, 0.2)

    def step(cfg: AlgorithmConfig, stats: bool, n_selected: int) -> float:
        t0 = time.perf_counter()
        loss, _ = compute_loss(x, tokens, old_logp, advantages, seq_ids,
                               BatchCounts(N_TOKENS, n_selected, int(seq_ids[-1]) + 1, RESPONSE_LEN), cfg,
                               chunk=chunk, grad_buffer=buffer, stats=stats)
        torch.autograd.grad(loss, x)
        return time.perf_counter() - t0

    base, value = [], []
    for r in range(ROUNDS + 2):
        b = step(dapo, False, N_TOKENS)
        v = step(forking, True, n_sel)
        if r >= 2:
            base.append(b)
            value.append(v)
    paired = statistics.median(v / b for v, b in zip(value, base))
    return row("loss.forking_overhead", statistics.median(value), statistics.median(base), "s", SHAPE,
               "ratio <= 1.05", backend=backend(), threads=torch.get_num_threads(), chunk=chunk,
               paired_ratio_median=paired, value_rounds=[round(t, 4) for t in value],
               baseline_rounds=[round(t, 4) for t in base])


# ------------------------------------------------------------------------------------------------------
# Peak memory, one fresh process per measurement.

def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", open("/proc/self/status").read(), re.M).group(1))


def _naive_entropy(logits: torch.Tensor) -> torch.Tensor:
    """verl's entropy_from_logits: the whole [N, V] softmax at once."""
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - torch.sum(p * logits, dim=-1)


def _measure_peak(kind: str) -> float:
    """Extra peak RSS (MiB) of one entropy computation over the logits (run in a fresh process)."""
    from cluster.config import LearnerConfig
    from learner.tokenstats import token_stats

    logits, tokens, _ = _inputs()
    chunk = LearnerConfig().logits_chunk

    def compute(rows: int):
        with torch.no_grad():
            if kind == "naive":
                return _naive_entropy(logits[:rows])
            return token_stats(logits[:rows], tokens[:rows], chunk=chunk)[1]

    compute(64)          # warm on a small slice: compilation and one-time state, not the full-size buffers
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                           # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    out = compute(N_TOKENS)
    peak = _status_kib("VmHWM")
    del out
    return (peak - before) / 1024.0


def _peak_in_subprocess(kind: str, **env: str) -> float:
    proc = subprocess.run([sys.executable, "-m", "cluster.tools.bench.loss", "--peak", kind], capture_output=True,
                          text=True, timeout=900, env={**os.environ, **env})
    if proc.returncode != 0:
        raise RuntimeError(f"peak-memory measurement {kind!r} failed:\n{proc.stderr[-4000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["extra_peak_mib"])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peak" and sys.argv[2] in ("naive", "chunked"):
        print(json.dumps({"kind": sys.argv[2], "extra_peak_mib": _measure_peak(sys.argv[2])}))
    else:
        sys.exit("usage: python -m cluster.tools.bench.loss --peak naive|chunked")
