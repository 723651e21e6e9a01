"""Process-level environment: caches in one directory we control, offline hub, quiet telemetry.

docs/platform.md "Point every cache at a known directory": point every cache somewhere known (vLLM, DeepSpeed's JIT ops, HF) or they land in the home
directory and /tmp; nothing may be fetched from a model hub at run time.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("FORKRL_CACHE") or Path.home() / ".cache" / "forkrl")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def runtime_env_vars() -> dict[str, str]:
    """Variables every forkrl process (driver and Ray actors) runs with."""
    root = cache_dir()
    return {
        "FORKRL_CACHE": str(root),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(root / "hf"),
        "VLLM_CACHE_ROOT": str(root / "vllm"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "TORCH_EXTENSIONS_DIR": str(root / "torch_extensions"),
        "TRITON_CACHE_DIR": str(root / "triton"),
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }


def setup_env() -> None:
    for k, v in runtime_env_vars().items():
        os.environ.setdefault(k, v)
