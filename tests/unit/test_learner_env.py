"""learner.worker.rank_env: a CPU rank keeps freed blocks in glibc's heap between steps (cluster.runtime
.MALLOC_KEEP, read by ld.so at exec); a GPU rank does not, so its host memory is given back. Both get the
cache variables and learner.threads. tests/integration/test_learner_setup checks a real rank's process."""

from __future__ import annotations

from cluster.config import Config
from cluster.runtime import MALLOC_KEEP, runtime_env_vars
from learner.worker import rank_env


def test_a_cpu_rank_keeps_freed_blocks_and_a_gpu_rank_does_not():
    cfg = Config()
    cfg.learner.threads = 3
    cpu = rank_env(cfg)
    assert cpu == {**runtime_env_vars(), "OMP_NUM_THREADS": "3", "GLIBC_TUNABLES": MALLOC_KEEP}
    cfg.cluster.learner_gpus = 0.5
    assert rank_env(cfg) == {**runtime_env_vars(), "OMP_NUM_THREADS": "3"}
