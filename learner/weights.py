"""The learner's weights leaving the learner: gathered by HF name (module by module under ZeRO-3) and
published to the generators through learner rank 0's `WeightSender` (cluster.transport.weightsync)."""

from __future__ import annotations

import time
from typing import Callable, Iterator

import torch

from cluster.config import SyncConfig
from cluster.transport.weightsync import TensorSpec, WeightSender


def module_params(lm: torch.nn.Module) -> list[tuple[str, list[tuple[str, torch.nn.Parameter]]]]:
    """[(module name, [(HF name, parameter)])], each parameter once: a tied weight under its first name
    (the tied lm_head is not listed; vLLM ties it back). The input embedding comes last: it is the largest
    tensor (SmolLM2: 113 of 540 MB) and its reload is a plain copy, so sent first it would fill the first
    bucket and hold back the start of the layer-wise reload that the rest of the sync overlaps with."""
    out, last, seen = [], [], set()
    embed = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
    for mod_name, mod in lm.named_modules():
        params = [(f"{mod_name}.{n}" if mod_name else n, p) for n, p in mod.named_parameters(recurse=False)
                  if id(p) not in seen]
        seen.update(id(p) for _, p in params)
        if params:
            (last if mod is embed else out).append((mod_name, params))
    return out + last


def named_weights(lm: torch.nn.Module, zero3: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full weight) in a fixed order; under ZeRO-3 each module's weights are gathered while its
    items are consumed and released after, so EVERY rank must iterate to the end (the gathers are
    collectives). The tensors are live views: copy them before the next item."""
    for _, params in module_params(lm):
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                yield from ((n, p.data) for n, p in params)
        else:
            yield from ((n, p.data) for n, p in params)


def weight_specs(lm: torch.nn.Module) -> list[TensorSpec]:
    """The TensorSpec of every item of `named_weights`, in order, without gathering."""
    return [TensorSpec(n, tuple(getattr(p, "ds_shape", p.shape)), str(p.dtype).removeprefix("torch."))
            for _, params in module_params(lm) for n, p in params]


class Publisher:
    """Learner rank 0's end of the weight-sync group (None on the other ranks until `open`)."""

    def __init__(self, sync: SyncConfig):
        self.sync = sync
        self.sender: WeightSender | None = None

    def open(self, host: str, port: int, world_size: int) -> None:
        """Join the weight-sync group as its rank 0 (blocks until the generators joined)."""
        self.close()   # re-initialising after a failed sync or a replaced generator
        self.sender = WeightSender(host, port, world_size, self.sync)

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
            self.sender = None

    def publish(self, version: int, lm: torch.nn.Module, zero3: bool, rank: int,
                all_ok: Callable[[bool], bool]) -> dict[str, float]:
        """Publish the weights as `version`: rank 0 broadcasts them to the generators while every rank takes
        part in the ZeRO-3 gathers (call it on all ranks at once). If rank 0's send fails it still finishes
        the gathers, so the other ranks return, then raises."""
        t0 = time.perf_counter()
        if not all_ok(rank != 0 or self.sender is not None):
            raise RuntimeError("sync_weights before init_sender on learner rank 0")
        weights = named_weights(lm, zero3)
        if rank != 0:
            for _ in weights:
                pass
            return {"total_s": time.perf_counter() - t0}
        try:
            out = self.sender.send(version, weights, specs=weight_specs(lm))
        except BaseException:
            for _ in weights:
                pass
            raise
        return {**out, "total_s": time.perf_counter() - t0}
