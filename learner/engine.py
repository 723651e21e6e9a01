"""One rank's DeepSpeed engine: its config, the learning-rate schedule, setting it up (process group, seeds,
the model partitioned at load time under ZeRO-3, the optimizer, the reference policy) and its checkpoint.

Gradient accumulation is unmanaged (`managed_gradient_accumulation: false`): each mini-batch is one
`engine.step()` whatever its number of micro-batches (learner.step). Dropout is off in every pass
(`disable_dropout`).
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cluster.config import Config
from learner.attention import KWARG as ATTN_KWARG
from learner.attention import AttentionLayout, build_layout
from learner.attention import register as register_attention
from learner.batching import MicroBatch

CKPT_TAG = "ds"   # DeepSpeed's tag directory inside a checkpoint directory
SHM_COMM_OP = "deepspeed_shm_comm"   # ShareMemCommBuilder.NAME: DeepSpeed's CPU shared-memory all-reduce op


class Policy(torch.nn.Module):
    """Causal LM returning logits only at the gathered (response-predicting) positions: [N, V]."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, layout: AttentionLayout, position_ids: torch.Tensor,
                gather: torch.Tensor):
        """position_ids [B, L] and `layout`: a shared-prompt block (learner.batching), attended by
        learner.attention (the model must be loaded with attn_implementation=learner.attention.NAME)."""
        h = self.lm.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                               **{ATTN_KWARG: layout})[0]
        h = h.reshape(-1, h.shape[-1]).index_select(0, gather)
        return self.lm.get_output_embeddings()(h)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in every pass (verl and OpenRLHF do the same): the old log-probs, the ratio's numerator
    and the reference must be one deterministic function of the weights."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):  # HF attention modules
            m.attention_dropout = 0.0


def ds_config(cfg: Config, world: int) -> dict[str, Any]:
    """The DeepSpeed config: one caller-owned accumulation boundary per `engine.step()`."""
    lc = cfg.learner
    zero: dict[str, Any] = {"stage": lc.zero_stage}
    if lc.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=lc.stage3_param_persistence_threshold,
                    stage3_gather_16bit_weights_on_model_save=False)
    if lc.zero_stage in (1, 2):
        zero.update(overlap_comm=False, contiguous_gradients=True)
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "managed_gradient_accumulation": False,
        "gradient_clipping": lc.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(cfg: Config, total_updates: int) -> Callable[[int], float]:
    """Multiplier of learner.lr at optimizer update `step` (0-based): linear warm-up over warmup_steps
    updates (the first update uses lr/warmup_steps), then constant, cosine to 0 or linear to 0 at
    `total_updates`."""
    lc = cfg.learner

    def f(step: int) -> float:
        if step < lc.warmup_steps:
            return (step + 1) / lc.warmup_steps
        if lc.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - lc.warmup_steps) / max(1, total_updates - lc.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress)) if lc.schedule == "cosine" else 1.0 - progress
    return f


def build_locks(root: str | Path | None = None) -> list[tuple[Path, list[int]]]:
    """The JIT build locks under TORCH_EXTENSIONS_DIR and the ids of the processes that hold each open.

    DeepSpeed builds its ops with torch.utils.cpp_extension, which serialises builders with a FileBaton:
    `<TORCH_EXTENSIONS_DIR>/<op>/lock`, created with O_EXCL and held open by the building process until it
    removes it. Every load of the op takes it, even when nothing needs building, and one that finds it
    waits while it exists, without a timeout. So a lock no process holds open was left by a build that was
    killed (SIGKILL, OOM, the terminal's Ctrl-C) and would hold every later run forever. Holders are
    found in /proc (this machine; processes of other users that cannot be read are not seen)."""
    root = Path(root or os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    locks = sorted({*root.glob("*/lock"), *root.glob("*/*/lock")})
    if not locks:
        return []
    targets = {str(p.resolve()): p for p in locks}
    holders: dict[Path, list[int]] = {p: [] for p in locks}
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in os.scandir(fd_dir):
                try:
                    hit = targets.get(os.readlink(fd.path))
                except OSError:
                    continue
                if hit is not None:
                    holders[hit].append(int(fd_dir.parent.name))
        except OSError:   # the process exited, or belongs to another user
            continue
    return [(p, sorted(set(h))) for p, h in holders.items()]


def remove_stale_build_locks(root: str | Path | None = None) -> list[Path]:
    """Remove the JIT build locks that no live process holds (`build_locks`); returns them. Linux only
    (elsewhere nothing is removed: a holder cannot be seen)."""
    import logging

    if not Path("/proc/self/fd").is_dir():
        return []
    removed = []
    for path, holders in build_locks(root):
        if holders:
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue   # its builder finished, or another rank removed it first
        logging.getLogger("forkrl").warning("removed %s: a DeepSpeed/torch JIT build lock that no process "
                                            "holds (left by a killed build; the next load rebuilds)", path)
        removed.append(path)
    return removed


def loopback_interface(host: str) -> str | None:
    """The name of the network interface holding `host` when it is a loopback address (`lo`), else None."""
    import ipaddress

    import psutil

    try:
        if not ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:   # a host name: a cluster's, not this machine's loopback
        return None
    return next((name for name, addrs in psutil.net_if_addrs().items()
                 if any(a.address.split("%")[0] == host for a in addrs)), None)


def init_process_group(cfg: Config, rank: int, world: int, master: tuple[str, int]) -> None:
    """Join the learner's default process group (NCCL with GPUs, else gloo), without DeepSpeed's CPU
    shared-memory op. A JIT build lock a killed build left behind is removed first (no op the default learner
    uses is JIT-built; an op a DeepSpeed feature builds later takes the same kind of lock)."""
    import deepspeed

    import torch.distributed as dist

    from cluster.transport.weightsync import rendezvous_store

    os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_SIZE="1")
    gpu = torch.cuda.is_available() and cfg.cluster.learner_gpus > 0
    backend = "nccl" if gpu else "gloo"
    if backend == "gloo" and (lo := loopback_interface(master[0])):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", lo)   # gloo's pairs listen there, not on the hostname's address
    remove_stale_build_locks()
    if backend == "gloo":
        # ZeRO training never calls DeepSpeed's CPU shared-memory all-reduce (only its inference_all_reduce
        # does), yet its TorchBackend JIT-builds that op at init (~50 s on 2 cores, again for every new venv path:
        # the include paths are in the build's hash) and maps a 69 MB /dev/shm segment per group. Mark the op
        # unavailable; deepspeed.ops keeps one __compatible_ops__ dict per process, so the edit holds.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    # a rank whose queue read returned waits in train_step's agreement for the slowest read, which
    # gives up after queue.read_timeout_s: the collectives must outwait it
    timeout = timedelta(seconds=cfg.queue.read_timeout_s + 120)
    # the default group on a store whose listener binds MASTER_ADDR only (DeepSpeed then takes the group as
    # it is: "the user initialized torch.dist themselves"); env:// would listen on every interface
    if not dist.is_initialized():   # idempotent, as deepspeed.init_distributed is: a process may set up again
        dist.init_process_group(backend, store=rendezvous_store(master[0], master[1], rank, world, timeout),
                                rank=rank, world_size=world, timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)


@dataclass
class Engine:
    """What `build_engine` returns: the DeepSpeed engine around the `Policy`, its optimizer and schedule,
    the reference policy (a plain `Policy` outside DeepSpeed, when algorithm.kl_coef > 0) and the model's
    facts the step needs."""

    engine: Any
    optimizer: Any
    scheduler: Any
    ref: Policy | None
    device: torch.device
    pad_id: int
    vocab_size: int
    params: int

    def logits(self, mb: MicroBatch | None) -> torch.Tensor:
        """[N, V] at the micro-batch's response positions; None is the empty pass (a 2-token forward): every
        rank must run the same forwards (ZeRO-3 gathers parameters inside each)."""
        if mb is None:
            ids = torch.full((1, 2), self.pad_id, dtype=torch.long, device=self.device)
            return self.engine(ids, build_layout([(0, 2, [])], 2).to(self.device),
                               torch.arange(2, device=self.device)[None],
                               torch.zeros(1, dtype=torch.long, device=self.device))
        return self.engine(mb.input_ids, mb.layout, mb.position_ids, mb.gather)

    @property
    def lm(self) -> torch.nn.Module:
        """The trained HF model (its parameters are ZeRO-3 partitions under stage 3)."""
        return self.engine.module.lm


def build_engine(cfg: Config, model_path: str, world: int) -> Engine:
    """Load the model (partitioned at load time under ZeRO-3) and build the DeepSpeed engine; the process
    group must exist (`init_process_group`)."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    lc = cfg.learner
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    dsc = ds_config(cfg, world)
    # ZeRO-3: HfDeepSpeedConfig makes from_pretrained partition the weights while loading
    # (docs/platform.md "ZeRO-3 and from_pretrained"); it must be gone before any other from_pretrained
    # (the reference), which would become a collective.
    hf_ds = HfDeepSpeedConfig(dsc) if lc.zero_stage == 3 else None
    try:
        lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=register_attention())
    finally:
        del hf_ds
        unset_hf_deepspeed_config()
    disable_dropout(lm)
    lm.train()  # from_pretrained returns eval mode, in which HF skips gradient checkpointing
    if lc.gradient_checkpointing:
        lm.gradient_checkpointing_enable()
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=lc.lr, betas=lc.betas,
                            weight_decay=lc.weight_decay)
    total = cfg.run.steps * lc.mini_batches * lc.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))
    engine, optimizer, _, scheduler = deepspeed.initialize(model=Policy(lm), optimizer=opt, lr_scheduler=sched,
                                                           config=dsc)
    ref = None
    if cfg.algorithm.kl_coef > 0:
        ref = Policy(AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype,
                                                          attn_implementation=register_attention()))
        ref = ref.to(engine.device).eval()
        ref.requires_grad_(False)
    return Engine(engine, optimizer, scheduler, ref, engine.device, int(lm.config.pad_token_id or 0),
                  int(lm.config.vocab_size), sum(getattr(p, "ds_numel", p.numel()) for p in lm.parameters()))


def seed_everything(seed: int, rank: int) -> tuple[torch.Generator, torch.Generator]:
    """Seed python, numpy and torch; returns (the rank's generator: Clip-Cov and micro/mini random masks,
    the generator in the same state on every rank: global random masks)."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed * 7919 + 1 + rank), torch.Generator().manual_seed(seed * 7919)


# ---------------------------------------------------------------------------------------------- checkpoint

def save_checkpoint(eng: Engine, ckpt_dir: str, rank: int, world: int, client: dict[str, int],
                    gens: dict[str, torch.Generator], extra: dict[str, Any]) -> None:
    """Collective: the DeepSpeed checkpoint (weights, optimizer, scheduler; each rank its shards, with
    `client`) in ckpt_dir/ds, plus this rank's RNG states (python, numpy, torch and `gens`) and `extra` in
    ckpt_dir/rank<r>.json."""
    eng.engine.save_checkpoint(ckpt_dir, tag=CKPT_TAG, client_state=client)
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "rank": rank, "world": world, "torch": torch.get_rng_state().tolist(),
        **{name: g.get_state().tolist() for name, g in gens.items()},
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        **extra,
    }
    Path(ckpt_dir, f"rank{rank}.json").write_text(json.dumps(state))


def load_checkpoint(eng: Engine, ckpt_dir: str, rank: int, world: int,
                    gens: dict[str, torch.Generator]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Collective: restore what `save_checkpoint` wrote (same world size and ZeRO stage), the RNG states
    included; returns (client, this rank's state with the `extra` keys)."""
    path = Path(ckpt_dir, f"rank{rank}.json")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no learner state for rank {rank} (saved with another world size?)")
    state = json.loads(path.read_text())
    if state["world"] != world:
        raise ValueError(f"{ckpt_dir} was saved by {state['world']} learner ranks, this group has {world}")
    loaded, client = eng.engine.load_checkpoint(ckpt_dir, tag=CKPT_TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if loaded is None:
        raise FileNotFoundError(f"{ckpt_dir}/{CKPT_TAG}: no DeepSpeed checkpoint")
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    for name, g in gens.items():
        g.set_state(torch.tensor(state[name], dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    return client, state
