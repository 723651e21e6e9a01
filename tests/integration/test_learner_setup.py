"""LearnerGroup set-up on a real local Ray (the tiny model): set-up JIT-builds no DeepSpeed op on CPU (its
shared-memory all-reduce is off), a JIT build lock that a killed build left behind is removed, a lock that a live
process holds is named with its holder by the rank's progress probe and kept; a rank that cannot be placed makes
set-up fail at learner.setup_timeout_s with an error naming the rank and what it waits for. A rank's process
starts with glibc's allocator told to keep freed blocks (cluster.runtime.MALLOC_KEEP).

The lock is torch's own FileBaton (what a DeepSpeed op build takes) in a private TORCH_EXTENSIONS_DIR:
$FORKRL_CACHE points at a directory whose other caches link to the real ones."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from cluster.config import Config
from cluster.runtime import MALLOC_KEEP, cache_dir
from tests.integration.test_grader_workers import wait_gone
from tests.integration.test_learner_zero import shm_segments

HOLD = ("import sys, time\nfrom torch.utils.file_baton import FileBaton\n"
        "assert FileBaton(sys.argv[1]).try_acquire()\nprint('held', flush=True)\ntime.sleep(900)\n")


@pytest.fixture
def private_extensions(tmp_path, monkeypatch) -> Path:
    real = cache_dir()
    root = tmp_path / "cache"
    root.mkdir()
    for child in real.iterdir():
        if child.name != "torch_extensions":
            (root / child.name).symlink_to(child)
    ext = root / "torch_extensions"
    for op in ("cpu_adam", "fused_adam"):   # ops DeepSpeed JIT-builds (CPU offload, GPU Adam)
        (ext / op).mkdir(parents=True)
    monkeypatch.setenv("FORKRL_CACHE", str(root))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    return ext


@pytest.fixture
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def hold(lock: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held" and lock.exists()
    return p


def mmapped_blocks_holding(size: int) -> int:
    """glibc's count of live mmapped blocks (mallinfo2().hblks) while this process holds a malloc of size bytes."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.mallinfo2.restype = ctypes.c_void_p, MallInfo2
    block = libc.malloc(size)
    try:
        return libc.mallinfo2().hblks
    finally:
        libc.free(ctypes.c_void_p(block))


def group(model: str, timeout_s: float):
    from learner.worker import LearnerGroup

    cfg = Config()
    cfg.learner.setup_timeout_s = timeout_s
    return LearnerGroup(cfg, model)


@pytest.mark.timeout(600)
def test_set_up_builds_no_op_removes_a_dead_builds_lock_and_names_a_live_one(private_extensions, ray_local,
                                                                             untrained_tiny_model_dir):
    stale = private_extensions / "cpu_adam" / "lock"
    builder = hold(stale)
    builder.send_signal(signal.SIGKILL)
    builder.wait()
    assert stale.exists()           # what a killed build leaves behind
    g = group(untrained_tiny_model_dir, 480)
    live = private_extensions / "fused_adam" / "lock"
    holder = None
    try:
        assert [i["rank"] for i in g.info] == [0] and not stale.exists()
        # nothing was JIT-built (DeepSpeed's shared-memory op used to be: ~50 s for every new venv path)
        assert sorted(p.name for p in private_extensions.iterdir()) == ["cpu_adam", "fused_adam"]
        assert not any(p.is_file() for p in private_extensions.rglob("*")), list(private_extensions.rglob("*"))
        assert shm_segments(g.master[1]) == []
        # the rank's process started with glibc keeping every block in its heap (learner.worker.rank_env):
        # a 64 MiB block is not an mmap there, as it is here (glibc's default)
        assert os.environ.get("GLIBC_TUNABLES") != MALLOC_KEEP and mmapped_blocks_holding(64 << 20) >= 1
        assert ray.get(g.ranks[0].__ray_call__.remote(lambda _: mmapped_blocks_holding(64 << 20))) == 0
        holder = hold(live)         # a build that is still running (or hung)
        said = ray.get(g.ranks[0].progress.remote())
        assert said.startswith("rank 0 (pid ") and ": set up, for " in said, said
        assert f"build lock {live} held by pid {holder.pid}" in said, said
    finally:
        g.kill()
        if holder is not None:
            holder.kill()
            holder.wait()
    assert live.exists()            # a live holder's lock is never removed
    assert holder is not None and wait_gone([holder.pid]) == []


@pytest.mark.timeout(600)
def test_a_rank_that_cannot_be_placed_fails_set_up_at_its_deadline_naming_it(ray_local, untrained_tiny_model_dir):
    from learner.worker import LearnerGroup

    cfg = Config()
    # Ray has 2 CPUs: rank 1 never starts; the deadline leaves rank 0 (placed) time to start on a loaded box
    cfg.learner.num_ranks, cfg.cluster.learner_cpus, cfg.learner.setup_timeout_s = 2, 2, 20
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        LearnerGroup(cfg, untrained_tiny_model_dir)
    assert type(e.value).__name__ == "LearnerSetupTimeout"   # learner.worker's
    assert time.monotonic() - t0 < 20 + 60   # a hang guard (the probe waits 10 s), not a timing claim
    msg = str(e.value)
    assert msg.startswith("learner set-up did not finish within learner.setup_timeout_s = 20 s: "), msg
    assert "rank 1: no answer (its actor process has not started: waiting for CPUs/GPUs" in msg, msg
    # rank 0 is named too, whether it was still starting (the port call timed out) or already set up
    assert msg.index("rank 0") < msg.index("rank 1"), msg
