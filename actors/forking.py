"""Forking-aware sampling (issue 24, docs/algorithms.md 9.3): a vLLM v1 logits processor that samples each
position at T_high when the policy's entropy there is at or above a threshold, at T_low elsewhere.

Where it runs in vLLM's sampler (vllm/v1/sample/sampler.py, read for 0.32): `Sampler.forward` converts the
logits to float32, applies the allowed-token mask, bad words, the NON-argmax-invariant processors and the
penalties, then `sample` divides by the request's temperature, applies the ARGMAX-INVARIANT processors, then
top-k/top-p (`TopKTopPSampler`), whose `processed_logprobs` are the log_softmax of exactly the logits it
samples from. This processor declares itself argmax-invariant (dividing a row by a positive number does not
move its argmax), so it runs after the temperature division and before top-p, and the processed log-probs
the generator stores are those of the per-position tempered (then nucleus-restricted) distribution that was
sampled: what the importance ratio needs.

A request opts in through `SamplingParams.extra_args[KEY] = {"key", "high", "low", "threshold"}` and is sent
with temperature 1.0, so the logits the processor sees are the raw model logits (no penalties are used):
the entropy that decides is that of softmax(z) at temperature 1 over the full vocabulary. Rows of other
requests (evaluation, greedy references) are left untouched; with no opted-in request in the batch the
processor does nothing.

Counts. For the generator's statistics the processor counts, per `key` (one per prompt of a call, all its
samples together), the positions sampled, those at T_high, and the sums of the deciding entropy over both.
A position is counted once: a row is identified by its batch index and its position by the length of the
request's output so far (the live list vLLM hands to `update_state`), so the rows of a prompt's partial
prefill chunks, which reach the sampler but whose tokens are discarded, collapse into the position they
precede. `pop_counts` (called by the generator actor through `collective_rpc` right after a call) returns
and forgets the counts of its keys. The per-row flags cost one device-to-host copy per engine step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

KEY = "forkrl_forking"
COUNTS = ("positions", "high", "high_entropy_sum", "entropy_sum")


@dataclass
class _Row:
    key: str
    high: float
    low: float
    threshold: float
    output: list[int]                  # vLLM's live list of the request's generated tokens
    pos: int = -1                      # the position of the pending decision
    pending: tuple[bool, float] | None = None


@dataclass
class _Batch:
    """Device tensors of the opted-in rows, rebuilt when the batch changes."""

    index: torch.Tensor
    high: torch.Tensor
    low: torch.Tensor
    threshold: torch.Tensor
    order: list[int] = field(default_factory=list)


def request_args(key: str, high: float, low: float, threshold: float) -> dict:
    """The `extra_args` entry that opts a request in."""
    return {KEY: {"key": key, "high": float(high), "low": float(low), "threshold": float(threshold)}}


def entropy_t1(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary entropy of softmax(logits) per row (nats), float32; -inf entries contribute 0."""
    logp = logits.float().log_softmax(-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros((), device=logits.device)).sum(-1)


class ForkingTemperature(LogitsProcessor):
    """Per-position temperature: logits / (T_high if H(softmax(logits)) >= threshold else T_low)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.rows: dict[int, _Row] = {}
        self.counts: dict[str, list[float]] = {}
        self._batch: _Batch | None = None

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        spec = (sampling_params.extra_args or {}).get(KEY)
        if spec is None:
            return
        if not {"key", "high", "low", "threshold"} <= set(spec):
            raise ValueError(f"{KEY} needs key, high, low and threshold, got {sorted(spec)}")
        if not (spec["high"] > 0 and spec["low"] > 0):
            raise ValueError(f"{KEY}: temperatures must be > 0, got high={spec['high']} low={spec['low']}")
        if abs(sampling_params.temperature - 1.0) > 1e-12:
            raise ValueError(f"{KEY}: the request's own temperature must be 1.0 (the processor applies "
                             f"T_high/T_low to the raw logits), got {sampling_params.temperature}")

    def is_argmax_invariant(self) -> bool:
        return True

    # ------------------------------------------------------------------ batch bookkeeping
    def _commit(self, row: _Row | None) -> None:
        if row is None or row.pending is None:
            return
        high, h = row.pending
        c = self.counts.setdefault(row.key, [0.0] * len(COUNTS))
        c[0] += 1
        c[1] += high
        c[2] += h if high else 0.0
        c[3] += h
        row.pending = None

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for i in batch_update.removed:
            self._commit(self.rows.pop(i, None))
        for index, params, _prompt, output in batch_update.added:
            self._commit(self.rows.pop(index, None))
            spec = (params.extra_args or {}).get(KEY) if params is not None else None
            if spec is not None:
                self.rows[index] = _Row(str(spec["key"]), float(spec["high"]), float(spec["low"]),
                                        float(spec["threshold"]), output)
        for a, b, direction in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if rb is not None:
                if direction == MoveDirectionality.SWAP:
                    self.rows[a] = rb
                else:
                    self._commit(rb)
        self._batch = None

    def _device_batch(self) -> _Batch:
        if self._batch is None:
            order = sorted(self.rows)
            rows = [self.rows[i] for i in order]

            def vec(values, dtype):
                return torch.tensor(values, dtype=dtype, device=self.device)

            self._batch = _Batch(vec(order, torch.long), vec([r.high for r in rows], torch.float32),
                                 vec([r.low for r in rows], torch.float32),
                                 vec([r.threshold for r in rows], torch.float32), order)
        return self._batch

    # ------------------------------------------------------------------ the processor
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        b = self._device_batch()
        z = logits.index_select(0, b.index)
        h = entropy_t1(z)
        high = h >= b.threshold
        t = torch.where(high, b.high, b.low)
        logits.index_copy_(0, b.index, z / t.to(z.dtype)[:, None])
        for i, flag, value in zip(b.order, high.tolist(), h.tolist()):
            row = self.rows[i]
            pos = len(row.output)
            if pos != row.pos:
                self._commit(row)
                row.pos = pos
            row.pending = (bool(flag), float(value))
        return logits

    def pop_counts(self, keys: list[str]) -> dict[str, dict[str, float]]:
        """The counts of `keys` (their pending last positions included), forgotten here afterwards."""
        wanted = set(keys)
        for row in self.rows.values():
            if row.key in wanted:
                self._commit(row)
        return {k: dict(zip(COUNTS, self.counts.pop(k))) for k in keys if k in self.counts}


def find(worker) -> ForkingTemperature | None:
    """The processor instance inside a vLLM worker (its model runner's persistent batch), or None."""
    batch = getattr(getattr(worker, "model_runner", None), "input_batch", None)
    procs = getattr(batch, "logitsprocs", None)
    for p in (procs.all if procs is not None else ()):
        if isinstance(p, ForkingTemperature):
            return p
    return None
