"""Process-level environment: caches in one directory we control, offline hub, quiet telemetry.

docs/platform.md "Point every cache at a known directory": point every cache somewhere known (vLLM, DeepSpeed's JIT ops, HF) or they land in the home
directory and /tmp; nothing may be fetched from a model hub at run time.
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# CPU features that change what torch.compile's C++ backend emits (vector width, VNNI/BF16/FP16/AMX paths).
_ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
              "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


# glibc serves every block over its mmap threshold (at most 32 MiB: a step's logits, a layer's activations, a
# weight's fresh reload tensor) with a new mmap and unmaps it at free, so the next step faults the same pages in
# again: ~1.8M page faults a SmolLM2 learner step; its train phase in the Ray actor went 46.9 -> 37.6 s without
# them, vLLM's reload 0.87 -> 0.4 s. arena_max=1: a thread that is not the main one (a Ray actor's methods with
# concurrency groups, the weight-receive thread) has its own arena, which mmaps any block over 64 MiB whatever
# mmap_max says. Freed blocks stay in the heap, so the peak RSS is ~1.2 GB higher for SmolLM2's learner.
# Read by ld.so at exec: it goes into the environment a process starts with (docs/performance.md "The
# learner's allocator").
MALLOC_KEEP = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


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
        "TORCHINDUCTOR_CACHE_DIR": str(inductor_cache_dir()),
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (x86 `flags`, Arm `Features`); empty where it is
    unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def inductor_cache_key() -> str:
    """Names the code torch.compile generates in this process: torch version, ATen's CPU capability (which
    ATEN_CPU_CAPABILITY overrides) and the CPU's vector features.

    Inductor's cache does not key its generated C++ by the vector ISA it was generated for: a kernel written
    for AVX-512 (16-lane loops) and reloaded in a process that compiles for AVX2 (8-lane vectors), or the
    reverse, reads and writes past its buffers, giving wrong values, NaN or heap corruption (docs/platform.md
    "One torch.compile cache per vector ISA"). So every ISA gets its own directory.
    """
    import torch

    flags = cpu_flags()
    features = " ".join(f for f in _ISA_FLAGS if f in flags)
    digest = hashlib.sha256(features.encode()).hexdigest()[:10]
    return f"torch-{torch.__version__}-{torch.backends.cpu.get_cpu_capability().lower()}-{digest}"


def inductor_cache_dir() -> Path:
    """$FORKRL_CACHE/inductor/<inductor_cache_key()>."""
    return cache_dir("inductor", inductor_cache_key())


def pin_inductor_cache() -> None:
    """Point TORCHINDUCTOR_CACHE_DIR at this process's ISA directory; call it before anything is compiled.
    runtime_env_vars() computes the directory in the driver, and a Ray actor may run on another machine or
    with another ATEN_CPU_CAPABILITY, so the process that compiles sets it again for itself."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir())


def setup_env() -> None:
    for k, v in runtime_env_vars().items():
        os.environ.setdefault(k, v)
    pin_inductor_cache()


@contextmanager
def startup_gc() -> Iterator[None]:
    """The cyclic garbage collector off while a process starts (imports, model and engine set-up), then
    `gc.freeze()` and on again: what start-up built is never scanned again.

    Start-up allocates about a million long-lived objects (torch, vLLM, DeepSpeed, transformers), and with the
    collector on, every generation-2 pass rescans all of them: importing vLLM, DeepSpeed and transformers takes
    ~30% less CPU with it off (docs/performance.md "Start-up CPU"). No collection before the freeze: it would
    cost ~1 s of the saving, and start-up's cyclic garbage (~17k objects, no measurable RSS) stays. The
    objects are unfrozen at exit, so interpreter shutdown frees them as it would have (nanobind checks that).
    Nested uses are no-ops."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()
        atexit.unregister(gc.unfreeze)
        atexit.register(gc.unfreeze)
