"""Generator actor: one generation engine per Ray actor, G sampled responses per prompt, versioned weights.

The engine is vLLM (the CPU build here, regular vLLM on GPUs). With `VLLM_ENABLE_V1_MULTIPROCESSING=0` it runs
inside the actor process (starts in seconds instead of ~15 s) and then owns that process's torch threads and
global RNG, which is why it lives in an actor of its own (docs/platform.md "The in-process engine pins threads and seeds the RNG"). `rollout.backend="hf"` selects
transformers `generate` instead: a comparison baseline that must be chosen explicitly, never a fallback.

Log-probs are the sampler's own for the sampled token. `rollout.logprobs_mode=processed_logprobs` (default)
gives log-probs of the distribution actually sampled from (after temperature and top-p), which is what the
importance ratio needs; vLLM's own default is the raw model distribution. With
`rollout.forking_temperature` the temperature is per position (actors/forking.py, a vLLM logits processor)
and the processed log-probs are those of that per-position distribution; each rollout's `timing` then also
carries the prompt's forking counts (`forking_positions`, `forking_high`, `forking_high_entropy_sum`,
`forking_entropy_sum`).

Weights arrive through cluster/transport/weightsync.py: `init_weight_sync` joins the private group (every vLLM worker
is one rank), then each `receive_weights` takes one versioned sync. Ray runs one method of an actor at a time,
so a sync always lands between two `generate` calls and every rollout carries exactly the version it was
sampled with.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from cluster.config import RolloutConfig
from cluster.runtime import MALLOC_KEEP, startup_gc
from cluster.types import Prompt, Response, Rollout

EXTENSION = "actors.vllm_ext.WeightSyncWorker"


def request_seed(eval_seed: int, prompt_id: str) -> int:
    """The sampling seed of one evaluation prompt (vLLM gives its k-th sample seed + k): a function of the
    evaluation's seed and the prompt alone, so an evaluation samples the same responses whatever the
    generator, the batch it is in or what the engine sampled before (in-run and `forkrl eval` alike)."""
    import zlib

    return zlib.crc32(f"{eval_seed}:{prompt_id}".encode()) & 0x3FFFFFFF


@dataclass(frozen=True)
class Forking:
    """Forking-aware sampling of one call (actors/forking.py): T_high where the entropy at temperature 1 is
    >= threshold, T_low elsewhere."""

    high: float
    low: float
    threshold: float

    def __post_init__(self):
        if not (self.high > 0 and self.low > 0 and self.threshold >= 0):
            raise ValueError(f"invalid forking sampling {self}: need high > 0, low > 0, threshold >= 0")


@dataclass(frozen=True)
class Sampling:
    """How to sample one call: n responses per prompt; temperature 0 is greedy (tests, references).
    `forking`: per-position temperatures instead of `temperature` (vLLM only)."""

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    forking: Forking | None = None

    def __post_init__(self):
        if self.n < 1 or self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise ValueError(f"invalid sampling {self}: need n >= 1, temperature >= 0, 0 < top_p <= 1, "
                             f"max_new_tokens >= 1")

    @classmethod
    def train(cls, r: RolloutConfig, threshold: float | None = None) -> "Sampling":
        """Training sampling; with rollout.forking_temperature on, `threshold` is the live one (None: the
        configured fixed value)."""
        f = r.forking_temperature
        forking = None
        if f.enabled:
            thr = threshold if threshold is not None else f.live_start if f.threshold == "live" else f.threshold
            forking = Forking(f.high, f.low if f.low is not None else r.temperature, float(thr))
        return cls(r.group_size, r.temperature, r.top_p, r.max_new_tokens, forking)

    @classmethod
    def eval(cls, r: RolloutConfig) -> "Sampling":
        return cls(r.eval_samples, r.eval_temperature, r.eval_top_p, r.max_new_tokens)


@dataclass
class _Sample:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str


# Test-only fault injection (tests/faults), off unless set in the driver's environment: a generator that holds
# this weights version never joins the next sync (it hangs in receive_weights until killed).
FAULT_HANG_SYNC = "FORKRL_FAULT_HANG_SYNC_AT_VERSION"
# Test-only, as above: "VERSION:PATH". The first vLLM worker to receive VERSION claims PATH (created once,
# holding its pid) and stops in the middle of that sync, after its first bucket is reloaded and while the
# rest is still on the wire, until it is killed (actors/vllm_ext.py; tests/faults kill it there).
FAULT_STALL_SYNC = "FORKRL_FAULT_STALL_SYNC"


def engine_env(r: RolloutConfig, gpus: float = 0.0) -> dict[str, str]:
    """Process environment of a generator actor (on top of cluster.runtime.runtime_env_vars()). On CPU with
    tensor parallelism each rank gets its own core (docs/platform.md "Tensor parallelism on CPU")."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": str(r.threads),
           "VLLM_LOGGING_LEVEL": "WARNING", "GLIBC_TUNABLES": MALLOC_KEEP}
    if r.tensor_parallel_size > 1 and not gpus:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(k) for k in range(r.tensor_parallel_size))
    for fault in (FAULT_HANG_SYNC, FAULT_STALL_SYNC):
        if os.environ.get(fault):
            env[fault] = os.environ[fault]
    return env


def engine_placement(r: RolloutConfig, max_model_len: int) -> dict[str, Any]:
    """The LLM(...) arguments that depend on the device: a GPU engine gets `gpu_memory_utilization` (vLLM's
    start-up check of free memory; the KV cache itself is `kv_cache_memory_bytes` on both devices).

    A CPU engine runs without chunked prefill: vLLM rewinds a seeded request's generator after each partial
    prefill with `Generator.set_offset`, which torch's CPU generator does not have ("CPU Generator does not
    use offset"), so a seeded evaluation whose prefill was chunked would crash. Every prompt fits one step's
    token budget instead (at least max_model_len tokens)."""
    from vllm.platforms import current_platform

    tp = r.tensor_parallel_size > 1
    if current_platform.is_cpu():   # TP workers spawned by vLLM's multiprocessing executor, one core each
        no_chunks = {"enable_chunked_prefill": False, "max_num_batched_tokens": max(2048, max_model_len)}
        return {**no_chunks, **({"distributed_executor_backend": "mp"} if tp else {})}
    # TP: vLLM's Ray executor in the actor's placement group, on the bundles VLLM_RAY_BUNDLE_INDICES names
    return {"gpu_memory_utilization": r.gpu_memory_utilization, **({"distributed_executor_backend": "ray"} if tp else {})}


def _eos_ids(model_path: str, tokenizer) -> list[int]:
    """Stop tokens of the checkpoint (generation_config.json) plus the tokenizer's EOS: both engines stop on
    the same set (vLLM is told not to read generation_config for sampling defaults)."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:   # no generation_config.json
        eos = None
    ids = set([eos] if isinstance(eos, int) else eos or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


class _VLLMEngine:
    def __init__(self, model_path: str, r: RolloutConfig, dtype: str, seed: int, max_model_len: int):
        from vllm import LLM

        forking = {}
        if r.forking_temperature.enabled:   # registered only when configured: the default path is vLLM's own
            from actors.forking import ForkingTemperature
            forking = {"logits_processors": [ForkingTemperature]}
        self.forking_counts: list[dict[str, float]] = []   # of the last call's prompts (forking sampling)
        self._calls = 0
        self.llm = LLM(model=model_path, **forking, dtype=dtype, seed=seed, max_model_len=max_model_len,
                       kv_cache_memory_bytes=int(r.kv_cache_gib * (1 << 30)), block_size=r.block_size,
                       enforce_eager=r.enforce_eager, **engine_placement(r, max_model_len),
                       tensor_parallel_size=r.tensor_parallel_size, max_num_seqs=r.max_num_seqs,
                       logprobs_mode=r.logprobs_mode, worker_extension_cls=EXTENSION,
                       # sampling comes only from our SamplingParams, never from generation_config.json
                       generation_config="vllm", disable_log_stats=True)
        self.tokenizer = self.llm.get_tokenizer()
        self.eos = _eos_ids(model_path, self.tokenizer)

    def generate(self, prompt_ids: list[list[int]], s: Sampling,
                 seeds: list[int] | None = None) -> list[list[_Sample]]:
        from vllm import SamplingParams

        # detokenize=False: vLLM would otherwise also decode every logprob token one by one (~15% of the
        # tiny model's throughput); one batch_decode at the end gives the same text.
        params = SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=0,
                                max_tokens=s.max_new_tokens, logprobs=0, flat_logprobs=True, detokenize=False,
                                stop_token_ids=self.eos)
        keys: list[str] = []
        if seeds is not None or s.forking is not None:   # one SamplingParams per prompt
            params = [params.clone() for _ in prompt_ids]
        if seeds is not None:   # a per-request generator each (the engine's global RNG is not touched)
            for p, seed in zip(params, seeds):
                p.seed = seed
        if s.forking is not None:   # the processor tempers the raw logits: the request's own T is 1
            from actors.forking import request_args

            self._calls += 1
            keys = [f"{self._calls}:{i}" for i in range(len(prompt_ids))]
            for p, key in zip(params, keys):
                p.temperature = 1.0
                p.extra_args = {**(p.extra_args or {}),
                                **request_args(key, s.forking.high, s.forking.low, s.forking.threshold)}
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        self.forking_counts = []
        if keys:   # every worker holds the same batch: the first one's counts
            got = self.llm.collective_rpc("forkrl_forking_counts", args=(keys,))[0]
            self.forking_counts = [got.get(k, {}) for k in keys]
        flat = [o for out in outs for o in out.outputs]
        texts = self.tokenizer.batch_decode([list(o.token_ids) for o in flat], skip_special_tokens=True)
        samples = []
        for o, text in zip(flat, texts):
            # logprobs=0 returns exactly the sampled token at each position (flat: one entry each)
            lp = o.logprobs
            if list(lp.token_ids) != list(o.token_ids):
                raise RuntimeError("vLLM returned logprobs that are not those of the sampled tokens")
            samples.append(_Sample(list(o.token_ids), list(lp.logprobs), o.finish_reason or "length", text))
        return [samples[i * s.n:(i + 1) * s.n] for i in range(len(outs))]

    def init_sync(self, host, port, rank_offset, world_size, sync: dict) -> list[int]:
        return self.llm.collective_rpc("forkrl_init_sync", args=(host, port, rank_offset, world_size, sync))

    def wait_manifest(self) -> dict:
        return self.llm.collective_rpc("forkrl_wait_manifest")[0]

    def reload(self) -> dict:
        out = self.llm.collective_rpc("forkrl_reload")
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        # with tensor parallelism the sync ends when its slowest rank does
        return {**out[0], **{k: max(o[k] for o in out) for k in ("receive_s", "apply_s")}}

    def close_sync(self) -> None:
        self.llm.collective_rpc("forkrl_close_sync")


class _HFEngine:
    """transformers `generate` (batched, KV cache): the comparison backend."""

    def __init__(self, model_path: str, r: RolloutConfig, dtype: str, seed: int, max_model_len: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(r.threads)
        torch.manual_seed(seed)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
        self.eos = set(_eos_ids(model_path, self.tokenizer))
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos)
        self.max_model_len = max_model_len
        self._rx = self._manifest = None

    def generate(self, prompt_ids: list[list[int]], s: Sampling,
                 seeds: list[int] | None = None) -> list[list[_Sample]]:
        import torch

        from cluster.data.sampling import cut_at_eos, hf_sample, left_pad

        if s.forking is not None:
            raise ValueError("forking-aware sampling needs the vLLM backend")
        if seeds:   # one batch, one generator: the same call samples the same (not per request, as vLLM)
            torch.manual_seed(seeds[0])
        with torch.inference_mode():
            out = hf_sample(self.model, left_pad(prompt_ids, self.pad), temperature=s.temperature, top_p=s.top_p,
                            n=s.n, max_new_tokens=s.max_new_tokens, eos_token_id=sorted(self.eos),
                            pad_token_id=self.pad, scores=True)
            seqs = out.tokens
            # scores are after temperature/top-p: their log_softmax is the sampling distribution
            lps = torch.stack([sc.float().log_softmax(-1).gather(-1, seqs[:, t, None])[:, 0]
                               for t, sc in enumerate(out.scores)], 1)
        groups = []
        for i in range(len(prompt_ids)):
            samples = []
            for j in range(i * s.n, (i + 1) * s.n):
                toks, stopped = cut_at_eos(seqs[j].tolist(), self.eos)
                samples.append(_Sample(toks, lps[j, :len(toks)].tolist(), "stop" if stopped else "length",
                                       self.tokenizer.decode(toks, skip_special_tokens=True)))
            groups.append(samples)
        return groups

    def init_sync(self, host, port, rank_offset, world_size, sync: dict) -> list[int]:
        from cluster.config import SyncConfig
        from cluster.transport.weightsync import WeightReceiver

        self.close_sync()
        self._rx = WeightReceiver(host, port, rank_offset, world_size, SyncConfig.model_validate(sync))
        return [rank_offset]

    def wait_manifest(self) -> dict:
        t0 = time.perf_counter()
        self._manifest = m = self._rx.receive_manifest()
        return {"version": m.version, "tensors": len(m.specs), "bytes": sum(x.nbytes for x in m.specs),
                "wait_s": time.perf_counter() - t0}

    def reload(self) -> dict:
        import torch

        manifest, self._manifest = self._manifest, None
        t0 = time.perf_counter()
        with torch.no_grad():
            for name, t in self._rx.tensors(manifest, copy=False):   # copied at once
                self.model.get_parameter(name).copy_(t)   # resolves a tied lm_head to the embedding
        return {"version": manifest.version, "receive_s": self._rx.timing.get("receive_s", float("nan")),
                "apply_s": time.perf_counter() - t0}

    def close_sync(self) -> None:
        if self._rx is not None:
            self._rx.close()
            self._rx = None


class Generator:
    """Body of a generator Ray actor; create it with `generator_actor`."""

    def __init__(self, generator_id: str, model_path: str, rollout: RolloutConfig, *, dtype: str = "float32",
                 seed: int = 0, max_model_len: int = 512, eval_seed: int | None = None):
        self.generator_id, self.rollout = generator_id, rollout
        self.eval_seed = seed if eval_seed is None else eval_seed   # `evaluate`'s per-prompt seeds
        self.train_seed = self.eval_seed + 0x5EED                    # rollout.seeded's, apart from eval's
        self.max_model_len = max_model_len
        engine = {"vllm": _VLLMEngine, "hf": _HFEngine}[rollout.backend]
        t0 = time.perf_counter()
        with startup_gc():
            self.engine = engine(model_path, rollout, dtype, seed, max_model_len)
        self.start_s = time.perf_counter() - t0
        self.version = 0          # the checkpoint the engine was started from
        self.broken: str | None = None
        self._sync_ok = False     # a joined weight-sync group that has not failed
        self._counter = 0
        self.forking_threshold: float | None = None   # threshold=live: the learner's tau of the last sync

    def info(self) -> dict:
        import torch

        return {"generator_id": self.generator_id, "backend": self.rollout.backend, "version": self.version,
                "start_s": self.start_s, "broken": self.broken, "threads": torch.get_num_threads(),
                "pid": os.getpid()}

    def generate(self, prompts: list[Prompt], sampling: Sampling | None = None) -> list[Rollout]:
        """One Rollout (G = sampling.n responses) per prompt, tagged with the current weights version."""
        s = sampling or Sampling.train(self.rollout, self.forking_threshold)
        seeds = None
        if self.rollout.seeded and sampling is None:   # rollout.seeded: a seed per prompt draw (reproducible)
            seeds = [request_seed(self.train_seed, f"{p.prompt_id}@{p.draw}") for p in prompts]
        return self._run(prompts, s, prefix="", seeds=seeds)

    def evaluate(self, prompts: list[Prompt]) -> list[Rollout]:
        """Eval sampling: rollout.eval_samples responses per prompt at eval_temperature / eval_top_p, each
        prompt seeded by `request_seed(eval_seed, prompt_id)` (reproducible: `forkrl eval`)."""
        return self._run(prompts, Sampling.eval(self.rollout), prefix="eval",
                         seeds=[request_seed(self.eval_seed, p.prompt_id) for p in prompts])

    def _run(self, prompts: list[Prompt], s: Sampling, prefix: str,
             seeds: list[int] | None = None) -> list[Rollout]:
        if self.broken:
            raise RuntimeError(f"generator {self.generator_id}: {self.broken}")
        ids = []
        for p in prompts:
            tokens = np.asarray(p.token_ids)
            if tokens.ndim != 1 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
                raise ValueError(f"prompt {p.prompt_id!r}: token_ids must be a non-empty 1-D integer array")
            if tokens.size + s.max_new_tokens > self.max_model_len:
                raise ValueError(f"prompt {p.prompt_id!r}: {tokens.size} prompt tokens + {s.max_new_tokens} new "
                                 f"tokens exceed the engine's max_model_len {self.max_model_len}")
            ids.append(tokens.astype(np.int64).tolist())
        t0 = time.perf_counter()
        groups = self.engine.generate(ids, s, seeds) if ids else []
        seconds = time.perf_counter() - t0
        batch_tokens = sum(len(x.token_ids) for g in groups for x in g)
        forking = getattr(self.engine, "forking_counts", []) if s.forking is not None else []
        out = []
        for k, (p, samples) in enumerate(zip(prompts, groups)):
            self._counter += 1
            # forking-aware sampling: this prompt's positions, those at T_high, and the entropy sums
            fork = {f"forking_{name}": float(v) for name, v in (forking[k] if k < len(forking) else {}).items()}
            responses = [Response(np.asarray(x.token_ids, dtype=np.int32), np.asarray(x.logprobs, dtype=np.float32),
                                  x.text, x.finish_reason) for x in samples]
            out.append(Rollout(
                group_id=f"{self.generator_id}-{prefix}{self._counter}", prompt_id=p.prompt_id,
                prompt_ids=np.asarray(p.token_ids, dtype=np.int32), prompt=p.text, responses=responses,
                version=self.version, generator_id=self.generator_id, gold=p.gold, meta=dict(p.meta),
                timing={"generate_s": seconds, "tokens": float(sum(len(r.token_ids) for r in responses)),
                        "batch_tokens": float(batch_tokens), **fork}))
        return out

    # ----------------------------------------------------------------------------- weight sync

    def sync_ranks(self) -> int:
        """Ranks this generator takes in the sync group (one per vLLM worker)."""
        return self.rollout.tensor_parallel_size if self.rollout.backend == "vllm" else 1

    def init_weight_sync(self, host: str, port: int, rank_offset: int, world_size: int,
                         sync: dict[str, Any]) -> list[int]:
        """Join the sync group as ranks rank_offset .. rank_offset + sync_ranks() - 1 (blocks until all
        ranks, the learner's rank 0 included, have joined or sync.timeout_s passed). `sync`: the run's
        SyncConfig as a dict (it crosses into vLLM's worker processes)."""
        self._sync_ok = False
        ranks = self.engine.init_sync(host, port, rank_offset, world_size, sync)
        self._sync_ok = True
        return ranks

    def receive_weights(self, forking_threshold: float | None = None) -> dict:
        """Take one sync: wait for the learner's manifest, receive and reload, drop the prefix cache.
        `forking_threshold`: the learner's tau for rollout.forking_temperature.threshold=live (None or NaN:
        keep the current one), used from this version on.

        Returns {"version", "tensors", "bytes", "wait_s", "receive_s", "apply_s"} (seconds; apply_s is the
        overlapped receive + reload). A failure before any weight arrived keeps the old weights usable; one
        during the reload leaves the engine refusing to generate until it is restarted.
        """
        if self.broken:
            raise RuntimeError(f"generator {self.generator_id}: {self.broken}")
        if not self._sync_ok:
            raise RuntimeError(f"generator {self.generator_id}: no usable weight-sync group (a sync failed or "
                               f"none was joined): call init_weight_sync on every rank again")
        if os.environ.get(FAULT_HANG_SYNC) == str(self.version):
            time.sleep(1 << 30)
        self._sync_ok = False   # until this sync completes: after any failure the group's ranks are out of step
        head = self.engine.wait_manifest()
        try:
            done = self.engine.reload()
        except BaseException as e:
            self.broken = f"weights partially reloaded by a failed sync to version {head['version']}: {e}"
            raise
        self.version = done["version"]
        self._sync_ok = True
        if forking_threshold is not None and forking_threshold == forking_threshold:
            self.forking_threshold = float(forking_threshold)
        return {**head, **done}

    def close_weight_sync(self) -> None:
        self._sync_ok = False
        self.engine.close_sync()


def generator_actor(generator_id: str, model_path: str, rollout: RolloutConfig, *, dtype: str = "float32",
                    seed: int = 0, max_model_len: int = 512, num_cpus: float = 1.0, num_gpus: float = 0.0,
                    gpus: float | None = None, extra_env: dict[str, str] | None = None,
                    eval_seed: int | None = None, **actor_options):
    """Start one generator Ray actor with the engine environment (docs/platform.md "Environment variables of actors") merged into forkrl's;
    actor_options (e.g. a placement-group scheduling_strategy) go to Ray's `.options`."""
    import ray

    from cluster.runtime import runtime_env_vars

    env = {**runtime_env_vars(), **engine_env(rollout, num_gpus if gpus is None else gpus), **(extra_env or {})}
    cls = ray.remote(Generator).options(num_cpus=num_cpus, num_gpus=num_gpus, runtime_env={"env_vars": env},
                                        **actor_options)
    return cls.remote(generator_id, str(model_path), rollout, dtype=dtype, seed=seed, max_model_len=max_model_len,
                      eval_seed=eval_seed)

