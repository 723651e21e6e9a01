"""`forkrl export RUN_DIR [--step N] OUT_DIR`: the policy at a checkpoint as a Hugging Face model directory.

The weights come from the checkpoint's DeepSpeed shards (ZeRO-0..3, any number of ranks) through DeepSpeed's
own consolidation (`deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`: the fp32 master
weights); the architecture, tokenizer (with its chat template) and generation config come from the run's base
model. OUT_DIR gets `model.safetensors`, `config.json`, `generation_config.json`, the tokenizer files and
`forkrl_export.json` (run, step, weights version, source checkpoint). verl `model_merger`, OpenRLHF
`--save_hf_ckpt` are the equivalents; `checkpoint.save_hf: true` writes one beside every checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from cluster.config import ConfigError, load_config
from cluster.driver.rundir import CHECKPOINTS, RUN_STATE, latest_checkpoint, run_state

log = logging.getLogger("forkrl")

HF_DIR = "hf"          # checkpoint.save_hf: checkpoints/step-NNNNNN/hf/
TAG = "ds"             # learner.engine.CKPT_TAG: DeepSpeed's tag directory inside a checkpoint
PREFIX = "lm."         # the DeepSpeed module is learner.engine.Policy around the HF model `lm`
INFO = "forkrl_export.json"


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """checkpoints/step-NNNNNN of the run (the last one when step is None); a ConfigError names what exists."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a forkrl run directory (no config.yaml)")
    have = sorted(int(p.name.split("-")[1]) for p in (run_dir / CHECKPOINTS).glob("step-*") if (p / RUN_STATE).is_file())
    if step is None:
        ck = latest_checkpoint(run_dir)
        if ck is None:
            raise ConfigError(f"{run_dir}: no checkpoint yet")
        return ck
    if step not in have:
        raise ConfigError(f"--step {step}: {run_dir} has no checkpoint at that step (it has {have or 'none'})")
    return run_dir / CHECKPOINTS / f"step-{step:06d}"


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, model_path: str | Path, dtype: str = "float32",
                      info: dict | None = None) -> Path:
    """Write the HF directory of one checkpoint (`ckpt` holds DeepSpeed's `ds/` tag) built on `model_path`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    ckpt, out = Path(ckpt), Path(out_dir)
    if not (ckpt / TAG).is_dir():
        raise ConfigError(f"{ckpt}: no DeepSpeed checkpoint ({TAG}/) in it")
    with contextlib.redirect_stdout(sys.stderr):   # DeepSpeed prints its progress; stdout is the command's
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=TAG)
    state = {k.removeprefix(PREFIX): v for k, v in state.items()}
    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{ckpt}: the checkpoint does not match {model_path}: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    model.tie_weights()
    model = model.to(torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(tmp)   # with the chat template
    try:
        gen = GenerationConfig.from_pretrained(model_path)
    except OSError:
        gen = GenerationConfig.from_model_config(config)
    gen.save_pretrained(tmp)
    (tmp / INFO).write_text(json.dumps({"checkpoint": str(ckpt), "base_model": str(model_path), "dtype": dtype,
                                        **(info or {})}, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> Path:
    """`forkrl export`: the run's checkpoint at `step` (default: the last) as an HF directory in out_dir."""
    from cluster.data.models import resolve_model

    run_dir = Path(run_dir).resolve()
    ck = find_checkpoint(run_dir, step)
    cfg = load_config(run_dir / "config.yaml")
    state = run_state(ck)
    return export_checkpoint(ck, out_dir, resolve_model(cfg.model.path, cfg.data.task), cfg.model.dtype,
                             {"run": run_dir.name, "step": int(state["step"]), "version": int(state["version"])})
