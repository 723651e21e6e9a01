"""LearnerGroup set-up on a real local Ray (1 rank, the tiny model): a JIT build lock that a killed build
left behind is removed, not waited on forever; a lock that a live process holds makes set-up fail at
learner.setup_timeout_s with an error naming the lock, its holder and the phase.

The lock is torch's own FileBaton (what DeepSpeed's op build takes) in a private TORCH_EXTENSIONS_DIR:
$FORKRL_CACHE points at a directory whose other caches link to the real ones."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from cluster.config import Config
from cluster.runtime import cache_dir
from tests.integration.test_grader_workers import wait_gone

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
    built = real / "torch_extensions" / "deepspeed_shm_comm"
    if built.is_dir():   # no rebuild (minutes); the lock is what is tested
        shutil.copytree(built, ext / "deepspeed_shm_comm", ignore=shutil.ignore_patterns("lock"))
    (ext / "deepspeed_shm_comm").mkdir(parents=True, exist_ok=True)
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


def group(model: str, timeout_s: float):
    from learner.worker import LearnerGroup

    cfg = Config()
    cfg.learner.setup_timeout_s = timeout_s
    return LearnerGroup(cfg, model)


@pytest.mark.timeout(600)
def test_a_lock_left_by_a_killed_build_is_removed(private_extensions, ray_local, untrained_tiny_model_dir):
    lock = private_extensions / "deepspeed_shm_comm" / "lock"
    builder = hold(lock)
    builder.send_signal(signal.SIGKILL)
    builder.wait()
    assert lock.exists()           # what a killed build leaves behind
    g = group(untrained_tiny_model_dir, 480)
    try:
        assert [i["rank"] for i in g.info] == [0] and not lock.exists()
    finally:
        g.kill()


@pytest.mark.timeout(600)
def test_a_held_lock_fails_set_up_at_its_deadline_naming_it(private_extensions, ray_local,
                                                           untrained_tiny_model_dir):
    lock = private_extensions / "deepspeed_shm_comm" / "lock"
    builder = hold(lock)           # a build that is still running (or hung)
    try:
        t0 = time.monotonic()
        with pytest.raises(RuntimeError) as e:
            group(untrained_tiny_model_dir, 30)
        assert type(e.value).__name__ == "LearnerSetupTimeout"   # learner.worker's
        assert time.monotonic() - t0 < 30 + 60   # a hang guard (the probe waits 10 s), not a timing claim
        msg = str(e.value)
        assert "learner.setup_timeout_s = 30 s" in msg and "rank 0" in msg and "joining the process group" in msg
        assert f"build lock {lock} held by pid {builder.pid}" in msg
        assert lock.exists()        # a live holder's lock is never removed
    finally:
        builder.kill()
        builder.wait()
    assert wait_gone([builder.pid]) == []
