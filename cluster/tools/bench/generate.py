"""`forkrl bench generate`: rollout throughput of the vLLM generator actor against transformers `generate`.

Both run as generator actors (actors/generator.py) on the same model, dtype, prompts and sampling
(16 arith prompts x 8 samples x up to 64 new tokens, T=1, float32): vLLM warmed with one full batch first
(docs/platform.md "Warm up before timing generation": the first large generate is ~5x slower), transformers at its best thread setting. Tokens/s counts
generated tokens (EOS included), timed around the actor call. Achieved GFLOP/s counts 2 FLOPs per weight of
every matrix multiply (lm_head included) per generated token and per distinct prompt token; the ceiling is a
float32 matrix multiply of the decode shape [prompts x samples, hidden] x [hidden, intermediate] on the
thread count as vLLM's best, measured in the same run. Each engine runs at its best of 1 thread and all cores.

The ceiling row also says where the rest goes (`shape_bound`): the batch a decode step multiplies shrinks as
responses end (16 x 8 rows at the first step, one at the longest response's last), and a small batch cannot
reach the ceiling (at one row every weight is read from memory for 2 FLOPs each). From the lengths of the
timed call's responses, active(t) = the responses longer than t; the shape bound is the time of the model's
matrix multiplies alone at those shapes: one pass of [M, in] x [in, out] over distinct weights of every
Linear of the model (as many bytes as the real ones, so they stream from memory as in the model) at
M = the distinct prompt tokens (the prefill) and at M = active(t) for every decode step t >= 1, each M timed
(best of 3) at powers of two and interpolated linearly between them. `shape_fraction` = shape bound / the
call's time: the part of the call that is matrix multiplies at shapes the workload dictates; the rest is
attention, sampling and log-probs, the scheduler and Python. `shape_ceiling_fraction` = the FLOPs over the
shape bound's time over the ceiling: what ceiling_fraction would be if the call were only those matmuls.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import numpy as np
import torch

from cluster.tools.bench import row

PROMPTS, SAMPLES, NEW_TOKENS = 16, 8, 64
TARGETS = {"smollm2": ">= 2.5", "tiny": "report"}
CEILING_TARGETS = {"smollm2": ">= 0.65", "tiny": "report"}   # generate.ceiling_fraction (issue 23 item 3)


def bench_model(case: str) -> str:
    from cluster.data.models import resolve_model

    return str(resolve_model({"tiny": "builtin:tiny", "smollm2": "builtin:smollm2"}[case]))


def bench_prompts(model_dir: str, n: int = PROMPTS):
    from transformers import AutoTokenizer

    from cluster.config import DataConfig
    from cluster.data.tasks import render_prompts, synthetic_problems

    tok = AutoTokenizer.from_pretrained(model_dir)
    return render_prompts(synthetic_problems("arith", n, "eval", seed=0), tok, DataConfig(), "eval")


def ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)


def matmul_ceiling(m: int, k: int, n: int, threads: int, seconds: float = 1.0) -> float:
    """Best float32 GFLOP/s of [m, k] x [k, n] on `threads` threads."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(m, k), torch.randn(k, n)
        out = torch.empty(m, n)
        for _ in range(3):
            torch.mm(a, b, out=out)
        best, t_end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            for _ in range(10):
                torch.mm(a, b, out=out)
            best = max(best, 10 * 2 * m * k * n / (time.perf_counter() - t0) / 1e9)
        return best
    finally:
        torch.set_num_threads(prev)


def _timed(gen, prompts, sampling, repeats: int) -> tuple[float, float, list[int]]:
    """(generated tokens, seconds) over `repeats` calls, and the response lengths of the last call."""
    import ray

    tokens, seconds, lengths = 0.0, 0.0, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rollouts = ray.get(gen.generate.remote(prompts, sampling))
        seconds += time.perf_counter() - t0
        lengths = [len(x.token_ids) for r in rollouts for x in r.responses]
        tokens += sum(lengths)
    return tokens, seconds, lengths


def decode_batches(lengths: list[int]) -> list[int]:
    """Rows of each decode step after the prefill (which samples every response's first token): step t >= 1
    multiplies the responses longer than t."""
    return [sum(n > t for n in lengths) for t in range(1, max(lengths, default=0))]


def interpolate(points: dict[int, float], m: int) -> float:
    """Linear interpolation of `points` {M: seconds} at m (clamped to the measured range)."""
    xs = sorted(points)
    return float(np.interp(m, xs, [points[x] for x in xs]))


def matmul_pass_s(weights: list[torch.Tensor], m: int, threads: int, repeats: int = 3) -> float:
    """Best seconds of one pass of [m, in] x weight [in, out] over every weight, in order, on `threads`
    threads (distinct weights as big as a model's outlast the caches: they stream from memory as its do)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        xs = {w.shape[0]: torch.randn(m, w.shape[0]) for w in weights}
        outs = {w.shape[1]: torch.empty(m, w.shape[1]) for w in weights}
        best = float("inf")
        for _ in range(repeats + 1):   # the first pass is warm-up
            t0 = time.perf_counter()
            for w in weights:
                torch.mm(xs[w.shape[0]], w, out=outs[w.shape[1]])
            best = min(best, time.perf_counter() - t0)
        return best
    finally:
        torch.set_num_threads(prev)


def shape_bound(shapes: list[tuple[int, int]], lengths: list[int], prefill_rows: int, threads: int) -> dict:
    """The time of the model's matmuls alone at the call's shapes (module docstring), and what it is made of."""
    batches = decode_batches(lengths)
    ms = sorted({1 << k for k in range(max(prefill_rows, *batches, 1).bit_length() + 1)}
                | {prefill_rows, max(batches, default=1)})
    weights = [torch.randn(i, o) for i, o in shapes]
    points = {m: matmul_pass_s(weights, m, threads) for m in ms if m >= 1}
    prefill = interpolate(points, prefill_rows)
    decode = sum(interpolate(points, m) for m in batches)
    return {"shape_bound_s": prefill + decode, "prefill_s": prefill, "decode_s": decode,
            "decode_steps": len(batches), "mean_decode_rows": sum(batches) / len(batches) if batches else 0.0,
            "pass_s_by_rows": {m: round(t, 5) for m, t in points.items()}}


def linear_shapes(model) -> list[tuple[int, int]]:
    """(in, out) of every Linear of a (meta) model, lm_head included: the matrix multiplies of a token."""
    return [(mod.in_features, mod.out_features) for mod in model.modules() if isinstance(mod, torch.nn.Linear)]


def _throughput(model_dir: str, backend: str, threads: int, prompts, repeats: int) -> tuple[float, float, list[int]]:
    import ray

    from actors.generator import Sampling, generator_actor
    from cluster.config import RolloutConfig

    r = RolloutConfig(backend=backend, threads=threads, group_size=SAMPLES, max_new_tokens=NEW_TOKENS,
                      kv_cache_gib=1.0)
    gen = generator_actor(f"bench-{backend}{threads}", model_dir, r, max_model_len=512, num_cpus=1)
    try:
        ray.get(gen.info.remote())
        sampling = Sampling.train(r)
        # vLLM: one full warm-up batch; transformers has no such effect, a small call loads its kernels
        _timed(gen, prompts if backend == "vllm" else prompts[:2], sampling, 1)
        tokens, seconds, lengths = _timed(gen, prompts, sampling, repeats)
        return tokens / seconds, tokens, lengths
    finally:
        ray.kill(gen)


def run(case: str | None = None) -> Iterator[dict]:
    from transformers import AutoConfig

    cases = [case] if case else ["tiny", "smollm2"]
    for c in cases:
        if c not in TARGETS:
            raise KeyError(f"unknown generate case {c!r}; choose from {', '.join(TARGETS)}")
    ensure_ray()
    threads = os.cpu_count() or 1
    for c in cases:
        model_dir = bench_model(c)
        prompts = bench_prompts(model_dir)
        repeats = 3 if c == "tiny" else 1
        # each engine at its best thread count (1 or all cores), so neither side is handicapped
        runs = {(b, t): _throughput(model_dir, b, t, prompts, repeats)
                for b in ("vllm", "hf") for t in sorted({1, threads})}
        best = {b: max((k for k in runs if k[0] == b), key=lambda k: runs[k][0]) for b in ("vllm", "hf")}
        vllm_tps, tokens, lengths = runs[best["vllm"]]
        yield row("generate.vllm_vs_hf", vllm_tps, runs[best["hf"]][0], "tokens/s", c, TARGETS[c],
                  vllm_threads=best["vllm"][1], hf_threads=best["hf"][1], tokens_per_call=tokens / repeats,
                  by_threads={f"{b}{t}": round(v[0], 1) for (b, t), v in runs.items()})

        cfg = AutoConfig.from_pretrained(model_dir)
        meta = _meta_model(cfg)
        params = sum(p.numel() for p in meta.parameters())
        # embeddings are a lookup, not a multiply; a tied lm_head multiplies by them once more
        matmul_params = params - cfg.vocab_size * cfg.hidden_size * (0 if cfg.tie_word_embeddings else 1)
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        flops_per_call = 2 * matmul_params * (tokens / repeats + prompt_tokens)
        achieved = vllm_tps / (tokens / repeats) * flops_per_call / 1e9
        ceiling = matmul_ceiling(PROMPTS * SAMPLES, cfg.hidden_size, cfg.intermediate_size, best["vllm"][1])
        call_s = tokens / repeats / vllm_tps
        bound = shape_bound(linear_shapes(meta), lengths, prompt_tokens, best["vllm"][1])
        yield row("generate.ceiling_fraction", achieved, ceiling, "GFLOP/s", c, CEILING_TARGETS[c],
                  note="vLLM achieved GFLOP/s over a float32 decode-shape matmul ceiling, same run",
                  call_s=round(call_s, 3), shape_fraction=round(bound["shape_bound_s"] / call_s, 3),
                  shape_ceiling_fraction=round(flops_per_call / bound["shape_bound_s"] / 1e9 / ceiling, 3),
                  **{k: round(v, 3) if isinstance(v, float) else v for k, v in bound.items()})


def _meta_model(cfg):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)
