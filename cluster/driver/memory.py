"""Per-GPU memory arithmetic of a GPU config: does every generator worker and every learner rank fit its GPU?

`forkrl check` (and `forkrl train`, before any actor starts) adds up, per GPU, in GiB:

- a generator worker (one GPU per tensor-parallel rank): its shard of the weights (P x dtype bytes / TP), the
  KV cache (`rollout.kv_cache_gib`, given to vLLM as `kv_cache_memory_bytes`), and the weight-sync receive
  buffers (`receive_slots` x the largest bucket: `sync.bucket_mb`, or the largest single tensor, the
  embedding, when that is bigger; every TP rank receives whole tensors and its weight loader keeps its shard).
  The sum must stay within `rollout.gpu_memory_utilization` x `cluster.gpu_memory_gib`.
- a learner rank: weights, gradients and AdamW state as the ZeRO paper counts them (Rajbhandari et al. 2020:
  2 + 2 + 12 bytes per parameter in mixed precision, 4 + 4 + 8 in float32), stage 1 partitioning the optimizer
  state over `learner.num_ranks`, stage 2 the gradients too, stage 3 the weights too; the sender's two
  bucket buffers on rank 0; activations of one micro-batch (`learner.micro_batch_tokens`): with gradient
  checkpointing one hidden state per layer plus one layer recomputed in full (34 s h bytes in bf16,
  Korthikanti et al. 2022, flash attention), without it 34 s h per layer; the chunked logits
  (`learner.logits_chunk` x vocabulary, float32, three live copies); and a CUDA context.
- colocated (a fractional `cluster.generator_gpus` / `cluster.learner_gpus`: one GPU holds both): vLLM's
  start-up check wants `gpu_memory_utilization` x the GPU free while the learner holds its share, so
  learner + utilisation x GPU must fit the GPU.

The model's shape comes from `model.path`/config.json when that is a local directory, else from `KNOWN` keyed
by the directory's name (the recipes' models), else from `model.num_params` alone (activations and the
largest tensor then cannot be counted: a note says so). Estimates, not measurements: they catch a recipe
that cannot fit (a whole-model receive copy, TP too small, a KV cache too big), not the last GiB.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from cluster.config import Config, ConfigError, shares_gpu
from cluster.transport.weightsync import receive_slots

GIB = float(1 << 30)
CUDA_CONTEXT_GIB = 1.0   # CUDA context, cuBLAS workspace and NCCL buffers of one process (order of magnitude)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class Shape:
    """What the arithmetic needs of a decoder-only transformer (the HF config.json names)."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool

    @classmethod
    def of(cls, c: dict) -> "Shape":
        heads = c["num_attention_heads"]
        return cls(c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], heads,
                   c.get("num_key_value_heads") or heads, c.get("head_dim") or c["hidden_size"] // heads,
                   c["vocab_size"], bool(c.get("tie_word_embeddings", False)))

    @property
    def num_params(self) -> int:
        """Embedding, attention (q, k, v, o), gated MLP (gate, up, down), norms, head (biases ignored)."""
        h, hd = self.hidden_size, self.head_dim
        attn = h * self.num_attention_heads * hd * 2 + h * self.num_key_value_heads * hd * 2
        layer = attn + 3 * h * self.intermediate_size + 2 * h
        embed = self.vocab_size * h
        return embed * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + h


# The shapes of the recipes' models, copied from their config.json (Hugging Face model cards), keyed by the
# name of the model.path directory (lower case). Base and instruct checkpoints share a shape.
_QWEN3 = dict(num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False)
_QWEN25_7B = Shape(3584, 28, 18944, 28, 4, 128, 152064, False)
KNOWN: dict[str, Shape] = {
    "qwen3-8b": Shape(4096, 36, 12288, **_QWEN3),
    "qwen3-14b": Shape(5120, 40, 17408, **{**_QWEN3, "num_attention_heads": 40}),
    "qwen3-32b": Shape(5120, 64, 25600, **{**_QWEN3, "num_attention_heads": 64}),
    "qwen2.5-7b": _QWEN25_7B,
    "qwen2.5-math-7b": _QWEN25_7B,
    "qwen2.5-32b": Shape(5120, 64, 27648, 40, 8, 128, 152064, False),
}


def model_shape(cfg: Config) -> Shape | None:
    """The shape from a local config.json, else from KNOWN by directory name; None when neither has it."""
    p = Path(cfg.model.path)
    if not cfg.model.path.startswith("builtin:") and (p / "config.json").is_file():
        c = json.loads((p / "config.json").read_text())
        c = c.get("text_config", c)
        try:
            return Shape.of(c)
        except KeyError:
            return None
    name = p.name.lower().removesuffix("-base").removesuffix("-instruct")
    return KNOWN.get(name)


@dataclass(frozen=True)
class Budget:
    """GiB per GPU, term by term, and the limit it must fit."""

    who: str
    terms: dict[str, float]
    limit: float
    limit_desc: str

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    def line(self) -> str:
        parts = " + ".join(f"{k} {v:.1f}" for k, v in self.terms.items() if v)
        return f"{self.who}: {parts} = {self.total:.1f} GiB > {self.limit_desc} = {self.limit:.1f} GiB"


def budgets(cfg: Config) -> tuple[list[Budget], list[str]]:
    """The per-GPU budgets of the config's GPU actors (none when it uses no GPU) and notes on what was not
    counted. Raises ConfigError when the model's size is unknown."""
    c, r, lr = cfg.cluster, cfg.rollout, cfg.learner
    if not (c.generator_gpus or c.learner_gpus):
        return [], []
    shape = model_shape(cfg)
    params = cfg.model.num_params or (shape.num_params if shape else None)
    if params is None:
        raise ConfigError(f"the GPU memory arithmetic needs the size of model.path {cfg.model.path!r}: make it a "
                          f"local HF directory with a config.json, or set model.num_params (e.g. 8.19e9)")
    notes = [] if shape else [f"model.num_params={params:.3g} alone: learner activations and the largest tensor "
                              f"are not counted"]
    b = DTYPE_BYTES[cfg.model.dtype]
    largest = shape.vocab_size * shape.hidden_size * b if shape else 0
    bucket = max(cfg.sync.bucket_mb * (1 << 20), largest)
    gpu = c.gpu_memory_gib
    out = []
    gen = None
    if c.generator_gpus:
        tp = r.tensor_parallel_size
        gen = {"weights/TP": params * b / tp / GIB, "kv cache": r.kv_cache_gib,
               "receive buffers": receive_slots(cfg.sync, max(1, math.ceil(params * b / bucket)), params * b)
               * bucket / GIB}
        out.append(Budget(f"generator worker (rollout.tensor_parallel_size={tp}, model.dtype={cfg.model.dtype})",
                          gen, r.gpu_memory_utilization * gpu,
                          "rollout.gpu_memory_utilization x cluster.gpu_memory_gib"))
    if c.learner_gpus:
        n, z = lr.num_ranks, lr.zero_stage
        w, g, o = (2, 2, 12) if b == 2 else (4, 4, 8)
        per = w / (n if z >= 3 else 1) + g / (n if z >= 2 else 1) + o / (n if z >= 1 else 1)
        terms = {f"weights+grads+adam (ZeRO-{z} over learner.num_ranks={n})": params * per / GIB,
                 "sender buffers": 2 * bucket / GIB}
        if shape:
            s, h, layers = lr.micro_batch_tokens, shape.hidden_size, shape.num_hidden_layers
            full_layer = 34 * s * h * b / 2
            act = s * h * b * layers + full_layer if lr.gradient_checkpointing else full_layer * layers
            terms["activations"] = act / GIB
            terms["logits chunks"] = 3 * lr.logits_chunk * shape.vocab_size * 4 / GIB
        terms["cuda context"] = CUDA_CONTEXT_GIB
        if shares_gpu(c) and gen is not None:
            terms["vLLM share"] = r.gpu_memory_utilization * gpu
            out.append(Budget("colocated learner rank + generator", terms, gpu, "cluster.gpu_memory_gib"))
        else:
            out.append(Budget("learner rank", terms, gpu, "cluster.gpu_memory_gib"))
    return out, notes


def check_gpu_memory(cfg: Config) -> list[str]:
    """Raise ConfigError (one line, naming the fields) when a GPU actor does not fit its GPU; return notes."""
    found, notes = budgets(cfg)
    over = [x for x in found if x.total > x.limit]
    if over:
        raise ConfigError("does not fit in GPU memory: " + "; ".join(x.line() for x in over)
                          + " (lower rollout.kv_cache_gib or sync.bucket_mb, raise rollout.tensor_parallel_size, "
                            "learner.num_ranks or learner.zero_stage, or set cluster.gpu_memory_gib to your GPUs)")
    return notes
