"""`forkrl bench generate`: rollout throughput of the vLLM generator actor against transformers `generate`.

Both run as generator actors (actors/generator.py) on the same model, dtype, prompts and sampling
(16 arith prompts x 8 samples x up to 64 new tokens, T=1, float32): vLLM warmed with one full batch first
(docs/platform.md "Warm up before timing generation": the first large generate is ~5x slower), transformers at its best thread setting. Tokens/s counts
generated tokens (EOS included), timed around the actor call. Achieved GFLOP/s counts 2 FLOPs per weight of
every matrix multiply (lm_head included) per generated token and per distinct prompt token; the ceiling is a
float32 matrix multiply of the decode shape [prompts x samples, hidden] x [hidden, intermediate] on the
thread count as vLLM's best, measured in the same run. Each engine runs at its best of 1 thread and all cores.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

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


def _timed(gen, prompts, sampling, repeats: int) -> tuple[float, float]:
    """(generated tokens, seconds) over `repeats` calls."""
    import ray

    tokens, seconds = 0.0, 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        rollouts = ray.get(gen.generate.remote(prompts, sampling))
        seconds += time.perf_counter() - t0
        tokens += sum(len(x.token_ids) for r in rollouts for x in r.responses)
    return tokens, seconds


def _throughput(model_dir: str, backend: str, threads: int, prompts, repeats: int) -> tuple[float, float]:
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
        tokens, seconds = _timed(gen, prompts, sampling, repeats)
        return tokens / seconds, tokens
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
        vllm_tps, tokens = runs[best["vllm"]]
        yield row("generate.vllm_vs_hf", vllm_tps, runs[best["hf"]][0], "tokens/s", c, TARGETS[c],
                  vllm_threads=best["vllm"][1], hf_threads=best["hf"][1], tokens_per_call=tokens / repeats,
                  by_threads={f"{b}{t}": round(v[0], 1) for (b, t), v in runs.items()})

        cfg = AutoConfig.from_pretrained(model_dir)
        params = sum(p.numel() for p in _meta_model(cfg).parameters())
        # embeddings are a lookup, not a multiply; a tied lm_head multiplies by them once more
        matmul_params = params - cfg.vocab_size * cfg.hidden_size * (0 if cfg.tie_word_embeddings else 1)
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        flops_per_call = 2 * matmul_params * (tokens / repeats + prompt_tokens)
        achieved = vllm_tps / (tokens / repeats) * flops_per_call / 1e9
        ceiling = matmul_ceiling(PROMPTS * SAMPLES, cfg.hidden_size, cfg.intermediate_size, best["vllm"][1])
        yield row("generate.ceiling_fraction", achieved, ceiling, "GFLOP/s", c, CEILING_TARGETS[c],
                  note="vLLM achieved GFLOP/s over a float32 decode-shape matmul ceiling, same run")


def _meta_model(cfg):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)
